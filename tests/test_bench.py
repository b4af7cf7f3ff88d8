"""bnlib.bench.timing: the benchmark's pieces on tiny shapes (what is timed, what is counted), not its timings."""

import itertools
import time
from types import SimpleNamespace

import pytest
import torch
from torch.utils import benchmark

from bnlib.bench import timing

torch.set_num_threads(1)


@pytest.mark.parametrize("impl", ["native", "bnlib", "from ops", "numpy"])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 2, 2)])
def test_train_steps_give_the_same_gradients(impl, shape):
    grads = timing.make_step(impl, "train", shape)()
    expected = timing.make_step("native", "train", shape)()
    for got, want in zip(grads, expected):
        torch.testing.assert_close(torch.as_tensor(got).float(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (6, 3, 2, 2), (2, 3, 2, 2, 2)])
def test_batch_norm_from_ops_matches_torch(shape):
    x = torch.randn(shape)
    w, b = torch.rand(3), torch.randn(3)
    torch.testing.assert_close(
        timing.batch_norm_from_ops(x, w, b), torch.nn.functional.batch_norm(x, None, None, w, b, True)
    )


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 2, 2)])
def test_eval_steps_give_the_same_output(shape):
    impls = ["native", "bnlib", "from ops"] + (["numpy"] if len(shape) == 2 else [])
    outs = [torch.as_tensor(timing.make_step(i, "eval", shape)()).float() for i in impls]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "impl, shape, expected",
    [
        ("native", (8, 4, 3, 3), (1.0, 0.0)),  # the input itself, nothing new
        ("bnlib", (8, 4, 3, 3), (1.0, 1.0)),  # the centred input
        ("from ops", (8, 4, 3, 3), (3.0, 3.0)),  # x - mean (twice: once per use) and x_hat
        ("numpy", (8, 4, 3, 3), (2.0, 2.0)),  # rows copy of x and x_hat
        ("numpy", (256, 4), (2.0, 1.0)),  # x itself and x_hat
    ],
)
def test_saved_for_backward_in_input_sizes(impl, shape, expected):
    total, new = timing.saved_for_backward(impl, shape)
    assert total == pytest.approx(expected[0], abs=0.1) and new == pytest.approx(expected[1], abs=0.1)


def _busy(seconds: float, calls: list, name: str):
    """A step that takes at least ``seconds`` of wall time and records that it ran."""

    def step():
        calls.append(name)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return step


class _Probe:
    """Stands in for a Timer whose ``blocked_autorange`` picks ``number_per_run`` and measures ``median`` per call."""

    def __init__(self, number_per_run: int, median: float):
        self.measured = SimpleNamespace(number_per_run=number_per_run, median=median)

    def blocked_autorange(self, min_run_time: float):
        return self.measured


def test_block_size_fills_min_block_s_or_takes_the_timers_block_when_larger():
    assert timing.block_size(_Probe(1, 1e-3), min_block_s=0.0105) == 11
    assert timing.block_size(_Probe(1000, 1e-3), min_block_s=0.01) == 1000
    calls = []
    busy = benchmark.Timer("step()", globals={"step": _busy(1e-3, calls, "a")})
    assert 5 <= timing.block_size(busy, 0.01) <= 10 and len(calls) >= 5  # measured, and warmed up on the way


def test_interleaved_timing_takes_one_block_of_each_step_per_round():
    calls, durations, min_block_s = [], {"a": 1e-3, "b": 2e-3}, 0.01
    steps = {name: _busy(seconds, calls, name) for name, seconds in durations.items()}
    samples = timing.time_interleaved(steps, rounds=3, min_block_s=min_block_s)
    # the timed blocks are the last 2 x 3 runs of calls: a, b, a, b, a, b (warm-up and sizing come before)
    timed = [(name, len(list(run))) for name, run in itertools.groupby(calls)][-6:]
    assert [name for name, _ in timed] == ["a", "b"] * 3
    for name, seconds in durations.items():
        sizes = {size for n, size in timed if n == name}
        assert len(sizes) == 1, f"{name}: one block size, set before the rounds, got {sizes}"
        block = sizes.pop()
        assert block * seconds >= min_block_s / 2, f"{name}: a block of {block} calls does not fill min_block_s"
        assert len(samples[name]) == 3
        # a sample is the time per call: at least the step's duration, far below a whole block's
        assert all(seconds <= s < block * seconds for s in samples[name]), (name, block, samples[name])


def test_run_reports_ratios_against_native():
    impls = ["native", "bnlib", "numpy"]
    results = timing.run([(8, 3)], ["train", "eval"], impls, rounds=2)
    assert {(r.mode, r.impl) for r in results} == {(m, i) for m in ["train", "eval"] for i in impls}
    assert all(r.ratio == 1.0 for r in results if r.impl == "native")
    assert all((r.saved is None) == (r.mode == "eval") for r in results)


def test_copy_ratio_is_the_time_in_copies():
    r = timing.Result("eval", (8, 3), "native", median_s=3.0, ratio=1.0, saved=None, copy_s=2.0)
    assert r.copy_ratio == 1.5
    assert r.bound_s == 2.0  # eval: two transfers, one copy's time


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 2, 2), (2, 3, 2, 2, 2)])
def test_two_pass_statistics_match_var_mean(shape):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    var, mean = timing.two_pass_var_mean(x)
    dims = [d for d in range(x.dim()) if d != 1]
    want_var, want_mean = torch.var_mean(x, dim=dims, correction=0)
    torch.testing.assert_close(var, want_var)
    torch.testing.assert_close(mean, want_mean)


def test_fold_pair_folds_bn_away():
    pair, folded, x = timing.fold_pair(channels=4, batch=2, size=6, groups=4)
    assert isinstance(folded, torch.nn.Conv2d) and folded.groups == 4
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pair(x), rtol=1e-5, atol=1e-5)


def test_fold_speedup_keeps_the_output():
    f = timing.fold_speedup(channels=4, batch=2, size=6, rounds=2)
    assert f["max_diff"] < 1e-5 and f["max_diff_default"] < 1e-5 and f["speedup"] > 0


@pytest.mark.parametrize("start", [True, False])
def test_without_tf32_turns_tf32_off_and_restores_the_flags(start):
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = start
    try:
        with pytest.raises(RuntimeError, match="inside"), timing.without_tf32():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("inside")  # the flags come back even when the block raises
        assert torch.backends.cudnn.allow_tf32 is start
        assert torch.backends.cuda.matmul.allow_tf32 is start
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def test_running_statistics_checks_see_the_bookkeeping_and_leave_the_layer_alone():
    pair, _, x = timing.fold_pair(channels=4, batch=2, size=6)
    conv, bn = pair[0], pair[1]
    with torch.no_grad():
        z = conv(x)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    assert timing.running_statistics_checks(bn, z) == {
        "stored": True, "mode matters": True, "eval uses them": True
    }
    assert not bn.training
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k  # the running statistics were restored


def test_running_statistics_checks_find_nothing_without_running_statistics():
    bn = torch.nn.BatchNorm2d(4, track_running_stats=False)
    assert timing.running_statistics_checks(bn, torch.randn(2, 4, 3, 3)) == {
        "stored": False, "mode matters": False, "eval uses them": False
    }


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: timing.make_step("cudnn", "train", (4, 3)), "unknown implementation"),
        (lambda: timing.make_step("bnlib", "test", (4, 3)), "mode"),
        (lambda: timing.make_step("bnlib", "train", (4,)), "shape"),
        (lambda: timing.make_step("numpy", "eval", (4, 3, 2, 2)), "evaluation mode for \\(N, D\\)"),
        (lambda: timing.make_step("compiled", "eval", (4, 3)), "eagerly"),
        (lambda: timing.run([(4, 3)], impls=["bnlib"]), "native"),
        (lambda: timing.time_interleaved({"a": lambda: None}, rounds=0), "rounds"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
