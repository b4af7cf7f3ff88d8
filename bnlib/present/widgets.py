"""Interactive explorers that keep working on the static site.

The book's site has no kernel, so a widget that recomputes in Python would freeze there. These
explorers are built from pre-rendered frames instead: a slider whose position is linked *in the
browser* (``jslink``) to a ``Stack`` of images. When the notebook is executed, the widget state
(with the images) is stored in the notebook and embedded in the page, so scrubbing works offline.

- :func:`frame_slider`: a slider over pre-rendered figures.
- :func:`stack_pngs`: some of those frames one above the other, as one static image (for pages
  and printouts without the widget), without drawing them again.
- :func:`plot_layer_distributions`: one row of per-layer histograms, plain vs BN, the frame the
  covariate-shift chapter scrubs through (also used for its static figure).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["figure_png", "frame_slider", "plot_layer_distributions", "stack_pngs"]


def figure_png(fig: Figure, dpi: int = 60) -> bytes:
    """The figure as PNG bytes (light: low dpi). The figure is not closed.

    Args:
        fig: a matplotlib figure.
        dpi: the resolution of the PNG.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def frame_slider(frames: Sequence[bytes], labels: Sequence[str], description: str = "step", value: int = 0):
    """A slider that shows ``frames[i]`` (PNG bytes) at position ``labels[i]``, linked in the browser.

    Returns an ``ipywidgets.VBox``; display it as the last expression of a cell.

    Args:
        frames: the PNG images, one per slider position.
        labels: the distinct label of each position.
        description: the slider's title.
        value: the position shown first.
    """
    import ipywidgets as w

    if len(frames) != len(labels) or not frames:
        raise ValueError(f"need one label per frame and at least one frame, got {len(frames)} and {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    images = [w.Image(value=png, format="png") for png in frames]
    stack = w.Stack(images, selected_index=value)
    slider = w.SelectionSlider(options=list(labels), index=value, description=description, continuous_update=True)
    w.jslink((slider, "index"), (stack, "selected_index"))
    return w.VBox([slider, stack])


def stack_pngs(frames: Sequence[bytes]) -> bytes:
    """PNG frames (e.g. those of :func:`frame_slider`) one above the other, as one PNG.

    Frames narrower than the widest are padded on the right with white; the result keeps the first
    frame's resolution (dpi). Returns PNG bytes, for ``IPython.display.Image(data=...)``.

    Args:
        frames: at least one PNG image.
    """
    from PIL import Image

    if not frames:
        raise ValueError("need at least one frame")
    images = [Image.open(io.BytesIO(png)).convert("RGBA") for png in frames]
    width = max(im.width for im in images)
    out = Image.new("RGBA", (width, sum(im.height for im in images)), (255, 255, 255, 255))
    top = 0
    for im in images:
        out.paste(im, (0, top))
        top += im.height
    buf = io.BytesIO()
    dpi = images[0].info.get("dpi")  # keep the frames' resolution, so the page sizes it alike
    out.save(buf, format="png", **({"dpi": dpi} if dpi else {}))
    return buf.getvalue()


def plot_layer_distributions(
    axes: Sequence[Axes],
    samples: Mapping[str, np.ndarray],
    colors: Mapping[str, str],
    bins: np.ndarray | None = None,
    titles: Sequence[str] | None = None,
) -> None:
    """Histograms of each layer's inputs, one axes per layer, one outline per network.

    Args:
        axes: one axes per layer.
        samples: network label -> array (layers, values...) of that network's layer inputs.
        colors: network label -> colour.
        bins: histogram bin edges shared by all panels (default: 60 bins over -8..8).
        titles: one title per layer.
    """
    bins = np.linspace(-8, 8, 61) if bins is None else np.asarray(bins)
    for label, values in samples.items():
        if len(values) != len(axes):
            raise ValueError(f"{label!r} has {len(values)} layers but there are {len(axes)} axes")
    for i, ax in enumerate(axes):
        for label, values in samples.items():
            v = np.clip(np.asarray(values[i]).ravel(), bins[0], bins[-1])  # outliers land in the end bins
            ax.hist(v, bins=bins, density=True, histtype="step", color=colors[label], label=label, linewidth=1.3)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
        ax.set_yticks([])
