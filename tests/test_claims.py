"""bnlib.present.claims, and the verdicts the chapters glue for the claims page."""

import ast
import json
import re
from pathlib import Path

import pytest

from bnlib.present import claims

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"


def _notebook(cells: list[dict]) -> dict:
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _verdict_output(key: str, verdict: str) -> dict:
    return {
        "output_type": "display_data",
        "data": {"application/papermill.record/text/plain": repr(verdict)},
        "metadata": {"scrapbook": {"name": f"verdict-{key}", "mime_prefix": "application/papermill.record/"}},
    }


def _fake_book(tmp_path: Path, verdicts: dict[str, str]) -> Path:
    for chapter in {c.chapter for c in claims.CLAIMS}:
        owned = [c.key for c in claims.CLAIMS if c.chapter == chapter and c.key in verdicts]
        outputs = [_verdict_output(key, verdicts[key]) for key in owned]
        cell = {"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs, "execution_count": 1}
        (tmp_path / f"{chapter}.ipynb").write_text(json.dumps(_notebook([cell])))
    return tmp_path


def test_glue_verdict_accepts_only_known_claims_and_verdicts():
    assert claims.glue_verdict("unit-range", "wrong") == "wrong"
    with pytest.raises(KeyError, match="unknown claim"):
        claims.glue_verdict("no-such-claim", "holds")
    with pytest.raises(ValueError, match="verdict must be one of"):
        claims.glue_verdict("unit-range", "mostly true")


def test_keys_are_distinct_and_every_claim_has_words_sources_and_a_chapter():
    keys = [c.key for c in claims.CLAIMS]
    assert len(keys) == len(set(keys))
    for c in claims.CLAIMS:
        assert c.claim and re.search(r"[\uac00-\ud7a3]", c.korean), c.key
        assert c.sources and set(c.sources) <= set(claims.SOURCES), c.key
        assert (BOOK / f"{c.chapter}.ipynb").exists(), f"{c.key}: no chapter {c.chapter}"
        assert "|" not in c.claim + c.korean, f"{c.key}: a '|' would break the table"


def test_read_verdicts_round_trips_and_refuses_missing_or_foreign_verdicts(tmp_path):
    verdicts = {c.key: claims.VERDICTS[i % len(claims.VERDICTS)] for i, c in enumerate(claims.CLAIMS)}
    assert claims.read_verdicts(_fake_book(tmp_path, verdicts)) == verdicts
    table = claims.verdict_table(tmp_path)
    rows = table.splitlines()[2:]
    assert len(rows) == len(claims.CLAIMS)
    for c, row in zip(claims.CLAIMS, rows):
        assert f"**{verdicts[c.key]}**" in row and f"{{ref}}`claim-{c.key}`" in row
    missing = dict(verdicts)
    del missing["per-channel"]
    with pytest.raises(ValueError, match="no verdict glued for: per-channel"):
        claims.read_verdicts(_fake_book(tmp_path, missing))
    book = _fake_book(tmp_path, verdicts)
    nb = json.loads((book / "formulas.ipynb").read_text())
    nb["cells"][0]["outputs"].append(_verdict_output("regularizes", "holds"))  # benefits' claim
    (book / "formulas.ipynb").write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="not one of its claims"):
        claims.read_verdicts(book)


# --------------------------------------------------------------------------------------------------
# the executed book


def _cells(chapter: str) -> list[dict]:
    return json.loads((BOOK / f"{chapter}.ipynb").read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("claim", claims.CLAIMS, ids=lambda c: c.key)
def test_each_claim_is_decided_in_a_labelled_section_by_a_computed_verdict(claim):
    cells = _cells(claim.chapter)
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    label = claims.claim_label(claim.key)
    assert re.search(rf"^\({re.escape(label)}\)=\n#+ ", markdown, re.M), f"no ({label})= before a heading"
    calls = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            name = getattr(node, "func", None) and getattr(node.func, "id", getattr(node.func, "attr", ""))
            if isinstance(node, ast.Call) and name == "glue_verdict":
                if isinstance(node.args[0], ast.Constant) and node.args[0].value == claim.key:
                    calls.append((cell, node))
    assert len(calls) == 1, f"{claim.key}: {len(calls)} glue_verdict calls, want one"
    cell, call = calls[0]
    assert not isinstance(call.args[1], ast.Constant), f"{claim.key}: the verdict is typed, not computed"
    assert "assert" in "".join(cell["source"]), f"{claim.key}: the cell that glues the verdict has no check"


def test_claims_page_shows_the_verdicts_stored_in_the_chapters():
    """The page's stored table is the one the chapters' stored verdicts give (run it after them)."""
    cells = _cells("claims")
    shown = [
        "".join(o["data"]["text/markdown"])
        for c in cells
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "text/markdown" in o.get("data", {})
    ]
    assert shown == [claims.verdict_table(BOOK)], "re-execute book/claims.ipynb after the chapters"


def test_claims_page_opened_alone_says_it_needs_the_chapters(tmp_path):
    with pytest.raises(FileNotFoundError, match="reads the executed chapters beside it"):
        claims.read_verdicts(tmp_path)
