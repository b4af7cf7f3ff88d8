"""The book's scale switch, read in one place: ``BNBOOK_SCALE=quick`` (the default: every chapter in
well under a minute on two CPU cores) or ``BNBOOK_SCALE=full`` (more steps, data and seeds)."""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "SCALES", "full_scale", "scale"]

#: the environment variable that sets the scale
ENV_VAR = "BNBOOK_SCALE"
#: the scales :func:`scale` accepts; the first is the default
SCALES = ("quick", "full")


def scale() -> str:
    """The scale this run uses, ``"quick"`` or ``"full"``, from :data:`ENV_VAR`; ValueError for any other setting."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "quick"
    if value not in SCALES:
        raise ValueError(f"{ENV_VAR} must be one of {SCALES} (or unset for quick), got {os.environ[ENV_VAR]!r}")
    return value


def full_scale() -> bool:
    """Whether this run is at the full scale (``BNBOOK_SCALE=full``)."""
    return scale() == "full"
