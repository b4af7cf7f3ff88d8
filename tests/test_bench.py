"""bnlib.bench.timing: the benchmark's pieces on tiny shapes (what is timed, what is counted), not its timings."""

import pytest
import torch
from bnlib.bench import timing

torch.set_num_threads(1)


@pytest.mark.parametrize("impl", ["native", "bnlib", "from ops", "numpy"])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 2, 2)])
def test_train_steps_give_the_same_gradients(impl, shape):
    grads = timing.make_step(impl, "train", shape)()
    expected = timing.make_step("native", "train", shape)()
    for got, want in zip(grads, expected):
        torch.testing.assert_close(torch.as_tensor(got).float(), want, rtol=1e-4, atol=1e-4)


def test_batch_norm_from_ops_matches_torch():
    x = torch.randn(6, 3, 2, 2)
    w, b = torch.rand(3), torch.randn(3)
    torch.testing.assert_close(
        timing.batch_norm_from_ops(x, w, b), torch.nn.functional.batch_norm(x, None, None, w, b, True)
    )


def test_eval_steps_give_the_same_output():
    impls = ["native", "bnlib", "from ops", "numpy"]
    outs = [torch.as_tensor(timing.make_step(i, "eval", (8, 3))()).float() for i in impls]
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


def test_interleaved_timing_returns_one_sample_per_round():
    samples = timing.time_interleaved({"a": lambda: None, "b": lambda: sum(range(10))}, rounds=3, min_block_s=1e-4)
    assert set(samples) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in samples.values())


def test_bandwidth_bound_counts_passes():
    assert timing.bandwidth_bound((10, 10), "train", bandwidth=400.0) == pytest.approx(timing.TRAIN_PASSES)
    assert timing.bandwidth_bound((10, 10), "eval", bandwidth=400.0) == pytest.approx(timing.EVAL_PASSES)


def test_run_reports_ratios_against_native():
    impls = ["native", "bnlib", "numpy"]
    results = timing.run([(8, 3)], ["train", "eval"], impls, rounds=2)
    assert {(r.mode, r.impl) for r in results} == {(m, i) for m in ["train", "eval"] for i in impls}
    assert all(r.ratio == 1.0 for r in results if r.impl == "native")
    assert all((r.saved is None) == (r.mode == "eval") for r in results)


def test_fold_speedup_keeps_the_output():
    f = timing.fold_speedup(channels=4, batch=2, size=6, rounds=2)
    assert f["max_diff"] < 1e-5 and f["speedup"] > 0


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
