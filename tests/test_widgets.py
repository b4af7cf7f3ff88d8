"""bnlib.present.widgets: frames, linked slider, per-layer histograms."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnlib.present import widgets  # noqa: E402


def _png():
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    png = widgets.figure_png(fig)
    plt.close(fig)
    return png


def test_frame_slider_links_slider_and_stack():
    pytest.importorskip("ipywidgets")
    png = _png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    box = widgets.frame_slider([png, png], ["0", "100"], value=1)
    slider, stack = box.children
    assert slider.index == 1 and stack.selected_index == 1
    assert [c.value for c in stack.children] == [png, png]
    with pytest.raises(ValueError, match="one label per frame"):
        widgets.frame_slider([png], ["0", "1"])
    with pytest.raises(ValueError, match="distinct"):
        widgets.frame_slider([png, png], ["0", "0"])


def test_plot_layer_distributions_draws_one_outline_per_network():
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, 3)
    samples = {"a": rng.normal(size=(3, 50)), "b": rng.normal(size=(3, 50)) * 20}
    widgets.plot_layer_distributions(axes, samples, {"a": "red", "b": "blue"}, titles=["1", "2", "3"])
    assert all(len(ax.patches) == 2 for ax in axes) and axes[2].get_title() == "3"
    with pytest.raises(ValueError, match="layers"):
        widgets.plot_layer_distributions(axes[:2], samples, {"a": "red", "b": "blue"})
    plt.close(fig)


def test_stack_pngs_puts_frames_one_above_the_other():
    from io import BytesIO

    from PIL import Image

    def frame(width, height, colour):
        buf = BytesIO()
        Image.new("RGB", (width, height), colour).save(buf, format="png")
        return buf.getvalue()

    stacked = Image.open(BytesIO(widgets.stack_pngs([frame(4, 2, "red"), frame(3, 5, "blue"), _png()])))
    last = Image.open(BytesIO(_png()))
    assert stacked.size == (max(4, last.width), 2 + 5 + last.height)
    shown = Image.open(BytesIO(widgets.stack_pngs([_png(), _png()])))
    assert round(shown.info["dpi"][0]) == round(last.info["dpi"][0]), "the frames' resolution is kept"
    pixels = stacked.convert("RGB")
    assert pixels.getpixel((0, 0)) == (255, 0, 0) and pixels.getpixel((0, 2)) == (0, 0, 255)
    assert pixels.getpixel((3, 2)) == (255, 255, 255)  # the narrower second frame is padded with white
    with pytest.raises(ValueError, match="at least one"):
        widgets.stack_pngs([])
