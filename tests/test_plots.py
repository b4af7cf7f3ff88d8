"""bnlib.present.plots: the statistics cube."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from bnlib.present.plots import draw_statistics_cube  # noqa: E402


def test_draw_statistics_cube_draws_the_three_faces():
    """C*S front cells, C*N top cells, N*S right cells; the True cells in the colour."""
    n, c, s = 4, 6, 9
    mask = np.zeros((n, c, s), dtype=bool)
    mask[:, 0, :] = True  # batch norm: one channel across examples and positions
    fig, ax = plt.subplots()
    draw_statistics_cube(ax, mask, "#0072B2")
    (cube,) = [a for a in ax.collections if isinstance(a, PolyCollection)]
    assert len(cube.get_paths()) == c * s + c * n + n * s
    coloured = sum(tuple(f) != tuple(matplotlib.colors.to_rgba("#f2f2f2")) for f in cube.get_facecolors())
    assert coloured == s + n  # channel 0: its front column and its top row; the right face is channel 5
    plt.close(fig)


def test_draw_statistics_cube_rejects_a_bad_mask():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError):
        draw_statistics_cube(ax, np.ones((4, 6), dtype=bool), "red")
    with pytest.raises(ValueError):
        draw_statistics_cube(ax, np.ones((0, 6, 9), dtype=bool), "red")
    plt.close(fig)
