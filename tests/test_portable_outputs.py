"""The portable notebook comparison: tolerances for measured glue, exact comparison for the rest."""

from types import SimpleNamespace

from nbformat import NotebookNode

from tests.portable_outputs import MEASURED_TAG, compare_glued, portable_compare

PREFIX = "application/papermill.record/"


def glued(name, text, tol=None, mime="text/plain"):
    meta = {"scrapbook": {"name": name, "mime_prefix": PREFIX}}
    if tol is not None:
        meta["bnbook"] = {"tolerance": tol}
    return NotebookNode(output_type="display_data", data={PREFIX + mime: text}, metadata=meta)


def stream(text, name="stdout"):
    return NotebookNode(output_type="stream", name=name, text=text)


def test_a_measured_value_passes_within_its_tolerance_and_fails_outside():
    assert compare_glued("acc", glued("acc", "0.91", 0.02), glued("acc", "0.925")) is None
    problem = compare_glued("acc", glued("acc", "0.91", 0.02), glued("acc", "0.95"))
    assert "differs by 0.04 > tolerance 0.02" in problem


def test_a_value_without_tolerance_is_compared_exactly():
    assert compare_glued("n", glued("n", "66"), glued("n", "66")) is None
    assert "compared exactly" in compare_glued("n", glued("n", "0.5"), glued("n", "0.5000001"))


def test_a_glued_figure_is_never_compared_byte_for_byte():
    assert compare_glued("fig", glued("fig", "AAAA", mime="image/png"), glued("fig", "BBBB", mime="image/png")) is None


def test_a_tolerance_on_text_is_an_error():
    assert "must be a number" in compare_glued("t", glued("t", "'< 1e-12'", 1.0), glued("t", "'< 1e-12'"))


def _cell(tags=()):
    cell = SimpleNamespace(metadata={"tags": list(tags)})
    parent = SimpleNamespace(skip_compare=("metadata", "image/png"), sanitize_patterns={})
    item = SimpleNamespace(cell=cell, parent=parent, colors=SimpleNamespace(FAIL="", ENDC="", OKBLUE=""))
    item.sanitize = lambda s: s
    item.format_output_compare = lambda key, left, right: item.comparison_traceback.append(f"{key}: {left} != {right}")
    return item


def test_measured_cells_compare_glue_but_not_printed_text():
    item = _cell([MEASURED_TAG])
    ref = [stream("acc 0.910\n"), glued("acc", "0.91", 0.02)]
    assert portable_compare(item, [stream("acc 0.921\n"), glued("acc", "0.921")], ref)
    assert not portable_compare(item, [stream("acc 0.999\n"), glued("acc", "0.999")], ref)
    assert "tolerance" in item.comparison_traceback[-1]
    assert not portable_compare(item, [stream("acc 0.910\n")], ref), "a glue that is no longer produced fails"
    assert not portable_compare(item, [*ref, stream("DeprecationWarning\n", "stderr")], ref), "a new warning fails"


def test_untagged_cells_keep_exact_comparison_of_printed_text():
    item = _cell()
    ref = [stream("max error < 1e-12\n")]
    assert portable_compare(item, [stream("max error < 1e-12\n")], ref)
    assert not portable_compare(item, [stream("max error < 1e-11\n")], ref)
