"""bnlib.bench.roofline: the byte and flop counts, the pass counter, and the roofline's arithmetic (not timings)."""

import pytest
import torch

from bnlib.bench import roofline, timing

torch.set_num_threads(1)

SHAPE = (2, 3, 4, 4)  # 96 elements, 384 bytes in float32


@pytest.mark.parametrize(
    "kernel, compulsory, expected",
    [("forward", False, 3 * 384), ("backward", False, 5 * 384), ("eval", False, 2 * 384),
     ("forward", True, 2 * 384), ("backward", True, 3 * 384), ("eval", True, 2 * 384)],
)
def test_min_bytes_are_the_passes_times_the_input(kernel, compulsory, expected):
    assert roofline.min_bytes(kernel, SHAPE, compulsory=compulsory) == expected


def test_the_compulsory_traffic_is_never_more_than_the_minimum():
    assert all(roofline.COMPULSORY_PASSES[k] <= roofline.MIN_PASSES[k] for k in roofline.KERNELS)


def test_intensity_is_flops_per_byte_of_the_minimum_traffic():
    assert roofline.intensity("forward") == pytest.approx(5 / 12)
    assert roofline.intensity("backward") == pytest.approx(7 / 20)
    assert roofline.intensity("eval") == pytest.approx(2 / 8)
    assert roofline.intensity("eval", element_size=2) == pytest.approx(2 / 4)


def test_unknown_kernel_raises():
    with pytest.raises(ValueError, match="unknown kernel"):
        roofline.min_bytes("train", SHAPE)
    with pytest.raises(ValueError, match="kernel_steps"):
        roofline.kernel_steps("numpy", SHAPE)


def test_count_passes_counts_distinct_input_sized_reads_and_writes():
    a, b, out = torch.randn(SHAPE), torch.randn(SHAPE), torch.empty(SHAPE)
    n = a.numel()
    assert roofline.count_passes(lambda: a.view(-1).t(), n) == (0, 0)  # views move nothing
    assert roofline.count_passes(lambda: a * a, n) == (1, 1)  # one tensor read twice: one pass
    assert roofline.count_passes(lambda: a + b, n) == (2, 1)
    assert roofline.count_passes(lambda: torch.add(a, b, out=out), n) == (2, 1)  # out= is written only
    assert roofline.count_passes(lambda: out.mul_(2), n) == (1, 1)  # in place: read and written
    assert roofline.count_passes(lambda: out.copy_(a), n) == (1, 1)  # copy_ overwrites out unread
    assert roofline.count_passes(lambda: a.sum((0, 2, 3)), n) == (1, 0)
    assert roofline.count_passes(lambda: a.sum((0, 2, 3)) * 2, n) == (1, 0)  # per-channel work is free


def test_count_passes_of_the_from_ops_forward_is_the_exercise_count():
    steps = roofline.kernel_steps("from ops", SHAPE)
    assert roofline.count_passes(steps["forward"], 96) == (8, 6)


@pytest.mark.parametrize("impl", ["bnlib", "from ops"])
def test_eager_implementations_make_at_least_the_minimum_passes(impl):
    steps = roofline.kernel_steps(impl, SHAPE)
    for kernel, step in steps.items():
        assert sum(roofline.count_passes(step, 96)) >= roofline.MIN_PASSES[kernel], kernel


def test_a_fused_kernel_is_one_operation_to_the_counter():
    steps = roofline.kernel_steps("native", SHAPE)
    assert roofline.count_passes(steps["forward"], 96) == (1, 1)
    assert roofline.count_passes(steps["backward"], 96) == (2, 1)


@pytest.mark.parametrize("impl", ["bnlib", "from ops"])
def test_kernel_steps_backward_repeats_and_matches_native(impl):
    got, want = roofline.kernel_steps(impl, SHAPE), roofline.kernel_steps("native", SHAPE)
    first, again, expected = got["backward"](), got["backward"](), want["backward"]()
    for g, a, e in zip(first, again, expected):
        torch.testing.assert_close(g, a)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["forward"](), want["forward"](), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["eval"](), want["eval"](), rtol=1e-5, atol=1e-5)


def test_stream_steps_move_what_they_say():
    steps = roofline.stream_steps(SHAPE)
    assert {k: n for k, (_, n) in steps.items()} == {
        "read": 384, "copy": 768, "scale": 768, "add": 1152, "triad": 1152
    }
    for name, (step, nbytes) in steps.items():
        reads, writes = roofline.count_passes(step, 96)
        assert (reads + writes) * 384 == nbytes, name


def test_the_phases_add_up_to_the_passes():
    for kernel in roofline.KERNELS:
        assert sum(n for _, n in roofline.PHASES[kernel]) == roofline.MIN_PASSES[kernel]
        assert sum(n for _, n in roofline.COMPULSORY_PHASES[kernel]) == roofline.COMPULSORY_PASSES[kernel]
        for mix, _ in roofline.PHASES[kernel] + roofline.COMPULSORY_PHASES[kernel]:
            assert mix in roofline.MIXES


def test_the_mixes_name_stream_steps_with_that_traffic():
    steps = roofline.stream_steps(SHAPE)
    passes = {"read": (1, 0), "read+write": (1, 1), "2 reads+write": (2, 1)}
    for mix, names in roofline.MIXES.items():
        for name in names:
            assert roofline.count_passes(steps[name][0], 96) == passes[mix], name


def test_roofline_arithmetic():
    # 100 elements of float32: 400 bytes per input-sized pass
    seconds = {"read": 1.0, "copy": 2.0, "scale": 4.0, "add": 3.0, "triad": 6.0, "matmul": 2.0}
    seconds |= {"native eval": 4.0, "native forward": 10.0, "native backward": 14.0}
    nbytes = {"read": 400, "copy": 800, "scale": 800, "add": 1200, "triad": 1200}
    roof = roofline.Roofline((10, 10), seconds, nbytes, matmul_flops=1000)
    assert roof.bandwidth == 400  # the fastest stream step, the read
    assert roof.mix_bandwidth("read+write") == 400 and roof.mix_bandwidth("2 reads+write") == 400
    assert roof.flops_per_s == 500 and roof.balance == pytest.approx(1.25)
    assert roof.floor_s("eval", matched=False) == pytest.approx(2 * 400 / 400)
    assert roof.over_floor("native", "eval", matched=False) == pytest.approx(2.0)
    assert roof.floor_s("forward", compulsory=True, matched=False) == pytest.approx(2.0)
    # matched mixes: copy's rate for read+write phases, add's for 2 reads+write
    roof.seconds |= {"copy": 4.0, "add": 6.0}  # now 200 B/s each, the read stays at 400
    assert roof.floor_s("eval") == pytest.approx(2 * 400 / 200)
    assert roof.floor_s("forward") == pytest.approx(1 * 400 / 400 + 2 * 400 / 200)
    assert roof.floor_s("backward") == pytest.approx(2 * 400 / 400 + 3 * 400 / 200)
    assert roof.floor_s("backward", compulsory=True) == pytest.approx(3 * 400 / 200)
    assert roof.over_floor("native", "forward") == pytest.approx(10.0 / 5.0)
    assert roof.over_floor("native", "backward", matched=False) == pytest.approx(14.0 / 5.0)


def test_run_times_every_step_once_per_name():
    extra = {"nothing": lambda: None}
    roof = roofline.run(SHAPE, ("native", "bnlib"), rounds=1, matmul_n=16, extra=extra)
    kernels = {f"{i} {k}" for i in ("native", "bnlib") for k in roofline.KERNELS}
    assert kernels | {"read", "copy", "scale", "add", "triad", "matmul", "nothing"} == set(roof.seconds)
    assert all(t > 0 for t in roof.seconds.values())
    assert roof.matmul_flops == 2 * 16**3 and roof.bandwidth > 0


def test_statistics_steps_agree():
    steps = timing.statistics_steps(SHAPE)
    (var1, mean1), (var2, mean2) = steps["torch.var_mean"](), steps["two-pass"]()
    torch.testing.assert_close(var2, var1)
    torch.testing.assert_close(mean2, mean1)
