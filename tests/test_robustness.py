"""Robustness of bnlib under bad input and hard numerics, against torch and a float64 reference.

The matrix: bnlib.norm.reference (NumPy), bnlib.norm.functional (eager; the compiled backend where noted),
bnlib.BatchNorm1d/2d, and the alternative norms of bnlib.norm, each against its torch.nn
counterpart, under:

- wrong number of dimensions, channel mismatch, non-float input, an empty batch, one value per
  channel in training (N = 1 with H x W > 1 is legal; N x H x W = 1 is not);
- NaN and Inf in the input (propagated as torch propagates them);
- a zero-variance channel (eps keeps everything finite);
- float16 and bfloat16 input (statistics in float32; outputs close to a float64 reference);
- large-mean float32 input (|mean| / std of 1e4 to 1e6);
- non-contiguous and channels_last input, requires_grad on any subset of input/weight/bias;
- double backward (supported, or a clear error);
- property tests (hypothesis) against float64 over random shapes, scales and offsets.

Where bnlib differs from torch on purpose, the test says so in its name or docstring
(``test_differs_...`` here); the list, with those shown in tests/test_dropin.py, is :data:`DIFFERENCES_FROM_TORCH`.
The layers' parity with torch.nn (training, eval, state_dicts, flags) is tests/test_dropin.py's table.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnlib
from bnlib import norm
from bnlib.norm import compiled
from bnlib.norm import functional as F
from bnlib.norm import reference as ref
from tests.test_dropin import BY_NAME as PARITY_ROWS

torch.set_num_threads(1)

DIFFERENCES_FROM_TORCH = {
    "channel mismatch": "bnlib raises ValueError naming the expected channels; torch raises RuntimeError",
    "fewer than 2 dimensions": "bnlib.norm.functional raises ValueError; torch raises IndexError or RuntimeError",
    "non-float input": "bnlib raises ValueError; torch raises NotImplementedError",
    "eps = 0 in training": "bnlib.norm.functional accepts it (the book uses it for exact identities); torch raises "
    "ValueError",
    "eps <= 0 at construction": "bnlib's layers raise ValueError at once; torch accepts it and raises at the first "
    "training forward, so a torch model with eps = 0 can be evaluated but not converted to bnlib "
    "(tests/test_dropin.py)",
    "instance norm, wrong channel count without affine": "bnlib raises ValueError; torch warns and normalizes",
    "instance norm, track_running_stats switched off after training": "bnlib stops updating the running "
    "statistics and normalizes each instance with its own; torch keeps updating them, in eval mode too",
    "torch.func and TorchScript": "bnlib's layers run a custom autograd Function: torch.func.grad/vmap/jvp and "
    "torch.jit.script fail on them; torch's layers support them",
    "isinstance checks": "bnlib.BatchNorm1d/2d/3d are not subclasses of torch's: code that tests "
    "isinstance(m, nn.BatchNorm2d) skips them (bnlib.norm.modules.is_batch_norm recognizes both)",
    "eps <= 0 in instance norm": "bnlib refuses it at construction, as for batch norm; torch's instance norm accepts "
    "it (tests/test_dropin.py)",
    "num_features < 1, momentum outside [0, 1]": "bnlib's layers raise ValueError at construction; torch accepts "
    "num_features = 0 and any momentum (tests/test_dropin.py)",
    "mixed dtypes": "bnlib casts weight/bias/buffers to the compute dtype; torch's CPU kernel raises RuntimeError",
    "double backward in training": "bnlib raises RuntimeError (the compact backward is once-differentiable); "
    "torch differentiates twice",
    "zero-variance channel": "bnlib returns beta exactly; torch's CPU kernel folds the mean into the shift and "
    "loses digits (about 1e-4 off at eps = 1e-5)",
    "empty batch in instance norm": "bnlib returns the empty output and keeps the running statistics; torch raises "
    "IndexError with affine parameters and overwrites the running statistics with NaN when training",
}

FLOAT_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def _close(a, b, tol=1e-5, equal_nan=False):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=equal_nan)


# -- float64 reference (bnlib.norm.reference in NumPy) -------------------------------------------------


def reference64(x: torch.Tensor, weight, bias, dy=None, eps: float = 1e-5):
    """Training-mode output (and dx, dweight, dbias for ``dy``) of x's values in float64, by bnlib.norm.reference."""
    xd = x.detach().double().cpu()
    c = xd.shape[1]
    w = np.ones(c) if weight is None else weight.detach().double().cpu().numpy()
    b = np.zeros(c) if bias is None else bias.detach().double().cpu().numpy()
    x4 = xd.reshape(xd.shape[0], c, -1, 1).numpy()  # (N, C, ...) as (N, C, S, 1)
    out, cache = ref.spatial_batchnorm_forward(x4, w, b, eps)
    out = torch.from_numpy(out).reshape(xd.shape)
    if dy is None:
        return out
    d4 = dy.detach().double().cpu().reshape(x4.shape).numpy()
    dx, dw, db = ref.spatial_batchnorm_backward(d4, cache)
    return out, torch.from_numpy(dx).reshape(xd.shape), torch.from_numpy(dw), torch.from_numpy(db)


# -- 1. bad input: functional and modules ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (5,)])
@pytest.mark.parametrize("training", [True, False])
def test_differs_fewer_than_two_dimensions_is_a_value_error(shape, training):
    """torch: IndexError or RuntimeError (not a defined behaviour); bnlib: ValueError."""
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        F.batch_norm(x, torch.zeros(1), torch.ones(1), training=training)
    with pytest.raises((IndexError, RuntimeError)):
        nn.functional.batch_norm(x, torch.zeros(5), torch.ones(5), training=training)


@pytest.mark.parametrize(
    "ours, theirs, shape",
    [
        (bnlib.BatchNorm1d, nn.BatchNorm1d, (4, 3, 2, 2)),
        (bnlib.BatchNorm1d, nn.BatchNorm1d, (3,)),
        (bnlib.BatchNorm2d, nn.BatchNorm2d, (4, 3)),
        (bnlib.BatchNorm2d, nn.BatchNorm2d, (4, 3, 2)),
        (bnlib.BatchNorm2d, nn.BatchNorm2d, (4, 3, 2, 2, 2)),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_module_wrong_dimensions_same_error_as_torch(ours, theirs, shape, training):
    x = torch.randn(shape)
    for cls in (ours, theirs):
        with pytest.raises(ValueError, match=r"expected .*D input \(got \d+D input\)"):
            cls(3).train(training)(x)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("where", ["running stats", "weight", "module"])
def test_differs_channel_mismatch_is_a_value_error(where, training):
    """torch raises RuntimeError ("running_mean should contain 3 elements not 5"); bnlib ValueError."""
    x = torch.randn(4, 3)
    if where == "module":
        calls = [lambda m: m(5).train(training)(x)]
        ours, theirs = bnlib.BatchNorm1d, nn.BatchNorm1d
        message = "expected 5 channels"
    else:
        args = (
            (torch.zeros(5), torch.ones(5), None)
            if where == "running stats"
            else (torch.zeros(3), torch.ones(3), torch.ones(5))
        )
        calls = [lambda f: f(x, *args, training=training)]
        ours, theirs = F.batch_norm, nn.functional.batch_norm
        message = "must have shape \\(3,\\)"
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call(ours)
        with pytest.raises(RuntimeError):
            call(theirs)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_differs_non_float_input_is_a_value_error(dtype):
    x = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(ValueError, match="floating-point"):
        F.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="floating-point"):
        bnlib.BatchNorm1d(3)(x)
    with pytest.raises((NotImplementedError, RuntimeError)):
        nn.functional.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4), (2, 3, 0, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_as_torch(shape, training):
    """An empty batch gives an empty output, zero parameter gradients, unchanged running statistics."""
    c = shape[1]
    outs = []
    for fn in (F.batch_norm, nn.functional.batch_norm):
        x = torch.randn(shape, requires_grad=True)
        w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        rm, rv = torch.full((c,), 0.5), torch.full((c,), 2.0)
        y = fn(x, rm, rv, w, b, training, 0.5)
        y.sum().backward()
        outs.append((y.shape, x.grad.shape, w.grad, b.grad, rm, rv))
    (ys, xgs, wg, bg, rm, rv), (ys2, xgs2, wg2, bg2, rm2, rv2) = outs
    assert ys == ys2 == torch.Size(shape) and xgs == xgs2 == torch.Size(shape)
    for a, b_ in [(wg, wg2), (bg, bg2), (rm, rm2), (rv, rv2)]:
        _close(a, b_)


def test_zero_channels_give_an_empty_output():
    """torch's functional fails here with an IndexError (it reads weight[0]); bnlib returns the empty result."""
    for training in (True, False):
        y = F.batch_norm(torch.randn(4, 0), torch.zeros(0), torch.ones(0), torch.ones(0), torch.zeros(0), training)
        assert y.shape == (4, 0)


@pytest.mark.parametrize("cls, shape", [(1, (0, 3)), (1, (0, 3, 5)), (2, (0, 3, 4, 4))])
def test_module_empty_batch_behaves_as_torch(cls, shape):
    ours = (bnlib.BatchNorm1d if cls == 1 else bnlib.BatchNorm2d)(3)
    theirs = (nn.BatchNorm1d if cls == 1 else nn.BatchNorm2d)(3)
    for m in (ours, theirs):
        assert m(torch.randn(shape)).shape == torch.Size(shape)
    for name in ["running_mean", "running_var", "num_batches_tracked"]:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_is_an_error_as_in_torch(shape):
    x = torch.randn(shape)
    for fn in (F.batch_norm, nn.functional.batch_norm):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fn(x, None, None, training=True)
    module = {2: bnlib.BatchNorm1d, 3: bnlib.BatchNorm1d, 4: bnlib.BatchNorm2d}[len(shape)]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(3)(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # batch statistics in eval too
        module(3, track_running_stats=False).eval()(x)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (1, 3, 5), (2, 3, 1, 1), (2, 3)])
def test_one_example_with_several_values_per_channel_is_legal(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    if len(shape) == 4:
        module, twin = bnlib.BatchNorm2d(3), nn.BatchNorm2d(3)
    else:
        module, twin = bnlib.BatchNorm1d(3), nn.BatchNorm1d(3)
    _close(module(x), twin(x))
    _close(module.running_var, twin.running_var)


def test_one_example_in_eval_mode_is_legal():
    x = torch.randn(1, 3)
    ours, theirs = bnlib.BatchNorm1d(3).eval(), nn.BatchNorm1d(3).eval()
    _close(ours(x), theirs(x))


def test_differs_eps_zero_is_accepted_in_training():
    """torch >= 2.x refuses eps <= 0 in training; bnlib accepts 0 (exact scale invariance in the book)."""
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps"):
        nn.functional.batch_norm(x, None, None, training=True, eps=0.0)
    y = F.batch_norm(x, None, None, training=True, eps=0.0)
    _close(y.var(0, unbiased=False), torch.ones(3, dtype=torch.float64), 1e-12)


def test_differs_mixed_dtypes_are_cast():
    """torch's CPU kernel refuses float64 input with float32 parameters; bnlib casts them."""
    x = torch.randn(8, 3, dtype=torch.float64)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        nn.functional.batch_norm(x, None, None, w, b, training=True)
    y = F.batch_norm(x, None, None, w, b, training=True)
    assert y.dtype == torch.float64
    _close(y, reference64(x, w, b), 1e-6)


# -- 1b. bad input: the NumPy reference ----------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ref.batchnorm_forward(np.ones(5), np.ones(5), np.zeros(5)), "shape \\(N, D\\)"),
        (lambda: ref.batchnorm_forward(np.ones((2, 3, 4)), np.ones(3), np.zeros(3)), "shape \\(N, D\\)"),
        (lambda: ref.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3)), "more than 1 value"),
        (lambda: ref.batchnorm_forward(np.ones((0, 3)), np.ones(3), np.zeros(3)), "more than 1 value"),
        (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(2), np.zeros(3)), "gamma must have shape"),
        (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), eps=-1), "eps"),
        (lambda: ref.spatial_batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3)), "\\(N, C, H, W\\)"),
        (lambda: ref.spatial_batchnorm_forward(np.ones((1, 3, 1, 1)), np.ones(3), np.zeros(3)), "more than 1"),
        (lambda: ref.batchnorm_inference(np.ones(3), np.zeros(3), np.ones(3), np.ones(3), np.zeros(3)), "\\(N, D\\)"),
    ],
)
def test_reference_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_reference_one_example_with_spatial_extent_is_legal():
    x = np.random.default_rng(0).normal(size=(1, 3, 4, 4))
    out, _ = ref.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3))
    theirs = nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    np.testing.assert_allclose(out, theirs.numpy(), atol=1e-10)


# -- 2. NaN and Inf ------------------------------------------------------------------------------


def _poisoned(shape, seed=0):
    """Float64 input with a NaN in channel 0, +Inf in channel 1, -Inf in channel 2; channel 3 clean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    for channel, value in enumerate([float("nan"), float("inf"), float("-inf")]):
        x[(0, channel) + (0,) * (x.dim() - 2)] = value
    return x


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_propagate_as_in_torch(shape, training):
    x = _poisoned(shape)
    c = shape[1]
    g = torch.Generator().manual_seed(1)
    w0, b0 = torch.rand(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    rm0, rv0 = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64)
    results = []
    for fn in (F.batch_norm, nn.functional.batch_norm):
        xi = x.clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        y = fn(xi, rm, rv, w, b, training, 0.1, 1e-5)
        y.backward(torch.ones_like(y))
        results.append([y, xi.grad, w.grad, b.grad, rm, rv])
    for name, a, b_ in zip(["out", "dx", "dw", "db", "running_mean", "running_var"], *results):
        assert torch.equal(a.isnan(), b_.isnan()), f"{name}: NaN pattern differs from torch"
        assert torch.equal(a.isinf(), b_.isinf()), f"{name}: Inf pattern differs from torch"
        _close(a, b_, 1e-6, equal_nan=True)
    if training:  # the clean channel is untouched by its poisoned neighbours
        assert results[0][0].select(1, 3).isfinite().all()


def test_nan_in_reference_propagates_without_error():
    x = np.random.default_rng(0).normal(size=(6, 3))
    x[0, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        out, cache = ref.batchnorm_forward(x, np.ones(3), np.zeros(3))
        dx, _, _ = ref.batchnorm_backward(np.ones_like(x), cache)
    assert np.isnan(out[:, 1]).all() and np.isfinite(out[:, [0, 2]]).all()
    assert np.isnan(dx[:, 1]).all() and np.isfinite(dx[:, [0, 2]]).all()


# -- 3. a zero-variance channel ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 3, 3)])
def test_zero_variance_channel_stays_finite(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x.select(1, 1).fill_(5.0)
    x.requires_grad_()
    w, b = torch.full((3,), 2.0, requires_grad=True), torch.full((3,), 1.0, requires_grad=True)
    y = F.batch_norm(x, None, None, w, b, training=True)
    (y**2).sum().backward()
    assert y.isfinite().all() and x.grad.isfinite().all() and w.grad.isfinite().all()
    assert torch.equal(y.select(1, 1), torch.ones_like(y.select(1, 1))), "x_hat = 0 exactly, so y = beta"
    out, cache = ref.spatial_batchnorm_forward(
        x.detach().double().reshape(shape[0], 3, -1, 1).numpy(), np.full(3, 2.0), np.ones(3)
    )
    assert np.isfinite(out).all() and np.isfinite(ref.spatial_batchnorm_backward(out, cache)[0]).all()


def test_differs_zero_variance_channel_is_exact():
    """torch's CPU kernel computes y = x * (w * inv_std) + (b - mean * w * inv_std): at eps = 1e-5 the
    two large terms cancel and leave an error; bnlib subtracts the mean first and returns beta exactly."""
    x = torch.full((6, 1), 5.0)
    w, b = torch.full((1,), 2.0), torch.ones(1)
    ours = F.batch_norm(x, None, None, w, b, training=True)
    theirs = nn.functional.batch_norm(x, None, None, w, b, training=True)
    assert torch.equal(ours, torch.ones_like(ours))
    assert (theirs - 1).abs().max() < 1e-3  # close, not exact


def test_zero_variance_with_eps_zero_gives_nan_not_an_exception():
    y = F.batch_norm(torch.full((4, 2), 3.0), None, None, training=True, eps=0.0)
    assert y.isnan().all()


# -- 4. float16 and bfloat16 ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 4, 4)])
def test_half_precision_close_to_float64_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 10).to(dtype).requires_grad_()
    w = (torch.rand(3, generator=g) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(3, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    y = F.batch_norm(x, None, None, w, b, training=True)
    y.backward(dy)
    ey, edx, edw, edb = reference64(x, w, b, dy)
    theirs = nn.functional.batch_norm(x.detach(), None, None, w.detach(), b.detach(), training=True)
    assert y.dtype == theirs.dtype == dtype and x.grad.dtype == w.grad.dtype == dtype
    eps = FLOAT_EPS[dtype]
    # rounding the result to the dtype is the only error left: about eps/2 relative
    torch.testing.assert_close(y.double(), ey, rtol=eps, atol=eps)
    scale = edx.abs().max().item()
    torch.testing.assert_close(x.grad.double(), edx, rtol=4 * eps, atol=4 * eps * scale)
    torch.testing.assert_close(w.grad.double(), edw, rtol=4 * eps, atol=4 * eps * edw.abs().max().item())
    torch.testing.assert_close(b.grad.double(), edb, rtol=4 * eps, atol=4 * eps * edb.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_are_accumulated_in_float32(dtype):
    """4096 values near 100 sum to 4e5, beyond float16's range (65504): float32 sums get the mean right."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 2, generator=g) + 100).to(dtype)
    rm, rv = torch.zeros(2), torch.ones(2)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    xd = x.double()
    _close(rm.double(), xd.mean(0), 1e-6)
    _close(rv.double(), xd.var(0), 1e-4)
    module = bnlib.BatchNorm1d(2, momentum=1.0)
    module(x)
    _close(module.running_mean.double(), xd.mean(0), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_eval_and_module_match_torch(dtype):
    torch.manual_seed(0)
    ours, theirs = bnlib.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = (torch.randn(4, 3, 5, 5) * 2 + 3).to(dtype)
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        a, b = ours(x), theirs(x)
        assert a.dtype == b.dtype == dtype
        _close(a.double(), b.double(), 2 * FLOAT_EPS[dtype])


def test_reference_float16_is_computed_in_float32():
    x = (np.random.default_rng(0).normal(size=(4096, 2)) + 100).astype(np.float16)
    out, cache = ref.batchnorm_forward(x, np.ones(2), np.zeros(2))
    assert out.dtype == np.float32
    np.testing.assert_allclose(cache.mean, x.astype(np.float64).mean(0), rtol=1e-6)


# -- 5. large means in float32 -------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(256, 3), (16, 3, 4, 4)])
def test_large_mean_float32_close_to_float64(ratio, shape):
    """|mean|/std up to 1e6: the error is what float32 rounding of the mean itself costs (eps * ratio),
    and no worse than torch's own kernel."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + ratio).float().requires_grad_()
    dy = torch.randn(shape, generator=g)
    w, b = torch.ones(3), torch.zeros(3)
    ey, edx, _, _ = reference64(x, w, b, dy)
    ours = F.batch_norm(x, None, None, w, b, training=True)
    (dx,) = torch.autograd.grad(ours, x, dy)
    theirs = nn.functional.batch_norm(x, None, None, w, b, training=True)
    (tdx,) = torch.autograd.grad(theirs, x, dy)
    err, terr = (ours.double() - ey).abs().max().item(), (theirs.double() - ey).abs().max().item()
    bound = 8 * FLOAT_EPS[torch.float32] * ratio + 1e-5
    assert err <= bound, f"output error {err:.2e} above {bound:.2e}"
    assert err <= 2 * terr + 1e-6, f"output error {err:.2e} worse than torch's {terr:.2e}"
    dx_err, tdx_err = (dx.double() - edx).abs().max().item(), (tdx.double() - edx).abs().max().item()
    assert dx_err <= 8 * FLOAT_EPS[torch.float32] * ratio * edx.abs().max().item() + 1e-5
    assert dx_err <= 2 * tdx_err + 1e-6, f"dx error {dx_err:.2e} worse than torch's {tdx_err:.2e}"


@pytest.mark.parametrize("ratio", [1e4, 1e6])
def test_reference_large_mean_float32(ratio):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(512, 3)) + ratio).astype(np.float32)
    out, cache = ref.batchnorm_forward(x, np.ones(3), np.zeros(3))
    exact, _ = ref.batchnorm_forward(x.astype(np.float64), np.ones(3), np.zeros(3))
    assert np.abs(out - exact).max() <= 8 * 2.0**-23 * ratio
    assert (cache.var > 0).all(), "the two-pass variance never goes negative"


# -- 6. layouts and partial requires_grad ----------------------------------------------------------

LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "strided": lambda x: torch.cat([x, x], dim=3)[..., ::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("needs", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 0), (0, 0, 0)])
@pytest.mark.parametrize("training", [True, False])
def test_layouts_and_partial_requires_grad_match_torch(layout, needs, training):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 5, 6, generator=g) * 2 + 1
    dy = LAYOUTS[layout](torch.randn(4, 3, 5, 6, generator=g))
    w0, b0 = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    rm0, rv0 = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    results = []
    for fn in (F.batch_norm, nn.functional.batch_norm):
        x = LAYOUTS[layout](base.clone()).requires_grad_(bool(needs[0]))
        w, b = w0.clone().requires_grad_(bool(needs[1])), b0.clone().requires_grad_(bool(needs[2]))
        rm, rv = rm0.clone(), rv0.clone()
        y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
        leaves = [t for t in (x, w, b) if t.requires_grad]
        grads = torch.autograd.grad(y, leaves, dy) if leaves else ()
        results.append((y, grads, y.is_contiguous(memory_format=torch.channels_last), y.requires_grad, rm, rv))
    (y1, g1, cl1, rg1, rm1, rv1), (y2, g2, cl2, rg2, rm2, rv2) = results
    _close(y1, y2)
    _close(rm1, rm2)
    _close(rv1, rv2)
    assert rg1 == rg2 == any(needs)
    for a, b_ in zip(g1, g2):
        _close(a, b_, 1e-4)
    if layout == "channels_last":
        assert cl1 == cl2, "output memory format differs from torch's"


def test_expanded_upstream_gradient():
    """The gradient of y.sum() arrives as an expanded (stride 0) tensor."""
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    (ours,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True).sum() * 2, x)
    (theirs,) = torch.autograd.grad(nn.functional.batch_norm(x, None, None, training=True).sum() * 2, x)
    _close(ours, theirs)


# -- 7. double backward ----------------------------------------------------------------------------


def test_differs_double_backward_in_training_is_a_clear_error():
    """torch differentiates its batch norm twice; bnlib's compact backward is once-differentiable."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((F.batch_norm(x, None, None, training=True) ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    (g2,) = torch.autograd.grad(
        (nn.functional.batch_norm(x, None, None, training=True) ** 3).sum(), x, create_graph=True
    )
    g2.sum().backward()  # torch: fine


def test_eval_mode_keeps_float64_precision():
    """Evaluation in float64 is computed in float64 (it once went through float32 statistics)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    w, b = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    exact = ref.batchnorm_inference(x.numpy(), rm.numpy(), rv.numpy(), w.numpy(), b.numpy())
    _close(F.batch_norm(x, rm, rv, w, b, False), torch.from_numpy(exact), 1e-14)


def test_double_backward_in_eval_matches_torch():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    hess = []
    for fn in (F.batch_norm, nn.functional.batch_norm):
        (g,) = torch.autograd.grad((fn(x, rm, rv, w, None, False) ** 3).sum(), x, create_graph=True)
        hess.append(torch.autograd.grad(g.sum(), (x, w)))
    for a, b in zip(*hess):
        _close(a, b, 1e-10)
    assert torch.autograd.gradgradcheck(lambda x, w: F.batch_norm(x, rm, rv, w, None, False), (x, w))


# -- 8. the compiled backend -----------------------------------------------------------------------


def test_compiled_backend_falls_back_with_a_clear_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    compiled.reset()
    monkeypatch.setattr(torch, "compile", broken)
    try:
        x = torch.randn(8, 3, 2, 2, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="could not compile batch norm.*no C\\+\\+ compiler.*eager"):
            F.batch_norm(x, None, None, training=True, backend="compiled")
        assert compiled.available() == (False, "RuntimeError: no C++ compiler found")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every call
            y2 = F.batch_norm(x, None, None, training=True, backend="compiled")
        eager = F.batch_norm(x, None, None, training=True)
        _close(y2, eager)
        _close(torch.autograd.grad((y2**2).sum(), x)[0], torch.autograd.grad((eager**2).sum(), x)[0])
    finally:
        compiled.reset()


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cuda")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, raised while compiling
def test_compiled_backend_matches_eager_and_torch():
    """One compile (about 10-30 s on a small CPU): forward, backward, running statistics, half input."""
    compiled.reset()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 4, 4, generator=g) * 3 + 2).requires_grad_()
    w, b = (torch.rand(3, generator=g) + 0.5).requires_grad_(), torch.randn(3, generator=g).requires_grad_()
    dy = torch.randn(8, 3, 4, 4, generator=g)
    out = {}
    for name, fn in [
        ("compiled", lambda *a: F.batch_norm(*a, backend="compiled")),
        ("torch", nn.functional.batch_norm),
    ]:
        rm, rv = torch.zeros(3), torch.ones(3)
        y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
        out[name] = [y, *torch.autograd.grad(y, (x, w, b), dy), rm, rv]
    assert compiled.available()[0], f"compiling failed here: {compiled.available()[1]}"
    for a, b_ in zip(out["compiled"], out["torch"]):
        _close(a, b_, 1e-4)
    # saves the input itself, nothing new input-sized
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.data_ptr()) or t, lambda t: t):
        F.batch_norm(x, None, None, w, b, True, backend="compiled")
    assert x.data_ptr() in sizes


# -- 9. property tests against float64 ----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(2, 1), (7, 3), (64, 2), (3, 2, 5), (2, 3, 3, 3), (1, 2, 3, 2), (5, 1, 1, 1)]),
    log_scale=st.floats(-3, 3),
    rel_offset=st.floats(-1e3, 1e3),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_functional_forward_and_backward_match_float64(shape, log_scale, rel_offset, affine, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + rel_offset * scale).float().requires_grad_()
    c = shape[1]
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g).requires_grad_() if affine else None
    dy = torch.randn(shape, generator=g)
    # eps relative to the variance, so that tiny scales are normalized rather than swamped by eps
    eps = 1e-5 * scale**2
    y = F.batch_norm(x, None, None, w, b, training=True, eps=eps)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    ey, edx, edw, edb = reference64(x, w, b, dy, eps=eps)
    tol = 1e-4 * (1 + abs(rel_offset))  # float32 rounding of the mean: eps * |mean| / std
    torch.testing.assert_close(y.double(), ey, rtol=tol, atol=tol)
    size = dy.abs().max().item() * (1.5 if affine else 1.0) / math.sqrt(scale**2 * 1e-5 + x.double().var().item())
    torch.testing.assert_close(grads[0].double(), edx, rtol=tol, atol=tol * max(size, edx.abs().max().item()))
    if affine:
        for got, exact in zip(grads[1:], (edw, edb)):
            torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol * (1 + exact.abs().max().item()))


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(4, 3), (32, 2), (2, 3, 4, 4), (1, 2, 3, 3)]),
    scale=st.floats(0.05, 50),
    offset=st.floats(-200, 200),
    seed=st.integers(0, 2**16),
)
def test_property_half_precision_matches_float64(dtype, shape, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + offset).to(dtype)
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    if bool((xd.amax(dim=dims) == xd.amin(dim=dims)).any()):
        return  # a channel rounded to one value: covered by the zero-variance tests
    y = F.batch_norm(x, None, None, training=True)
    ey = reference64(x, None, None)
    assert y.dtype == dtype
    eps = FLOAT_EPS[dtype]
    # float32 statistics of the rounded input: their error (float32 eps * |offset| / std) is far below
    # the final rounding to the dtype, except when the input's own spread is tiny against its mean
    std = xd.std().item()
    tol = eps + 1e-6 * (1 + abs(offset) / max(std, 1e-30))
    torch.testing.assert_close(y.double(), ey, rtol=tol, atol=tol)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(8, 3), (4, 3, 5), (3, 3, 2, 4)]),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    log_eps=st.floats(-8, -1),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_modules_match_torch(shape, momentum, log_eps, steps, seed):
    g = torch.Generator().manual_seed(seed)
    cls = (bnlib.BatchNorm2d, nn.BatchNorm2d) if len(shape) == 4 else (bnlib.BatchNorm1d, nn.BatchNorm1d)
    ours, theirs = cls[0](3, eps=10.0**log_eps, momentum=momentum), cls[1](3, eps=10.0**log_eps, momentum=momentum)
    for _ in range(steps):
        x = torch.randn(shape, generator=g) * 5 + 3
        _close(ours(x), theirs(x), 1e-4)
    for name in ["running_mean", "running_var"]:
        _close(getattr(ours, name), getattr(theirs, name), 1e-4)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=g)
    _close(ours(x), theirs(x), 1e-4)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 64),
    d=st.integers(1, 5),
    log_scale=st.floats(-3, 3),
    rel_offset=st.floats(-1e4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_property_reference_float32_matches_float64(n, d, log_scale, rel_offset, seed):
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    x = (rng.normal(size=(n, d)) * scale + rel_offset * scale).astype(np.float32)
    if (x.max(axis=0) == x.min(axis=0)).any():
        return  # a feature rounded to one value
    eps = 1e-5 * scale**2
    out, cache = ref.batchnorm_forward(x, np.ones(d), np.zeros(d), eps=eps)
    exact, ecache = ref.batchnorm_forward(x.astype(np.float64), np.ones(d), np.zeros(d), eps=eps)
    tol = 1e-5 * (1 + abs(rel_offset))
    np.testing.assert_allclose(out, exact, rtol=tol, atol=tol)
    dout = rng.normal(size=(n, d)).astype(np.float32)
    dx, _, _ = ref.batchnorm_backward(dout, cache)
    edx, _, _ = ref.batchnorm_backward(dout.astype(np.float64), ecache)
    # dx's natural size is |dout| / std (it can cancel to nearly 0: with n = 2 it is exactly 0)
    size = np.abs(dout).max() / ecache.std.min()
    np.testing.assert_allclose(dx, edx, rtol=tol, atol=tol * size)


# -- 10. the alternative norms (bnlib.norm) against torch.nn ------------------------------------

#: the alternative norms with a torch.nn counterpart: rows of the parity table in tests/test_dropin.py
NORM_NAMES = [
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "RMSNorm",
    "GhostBatchNorm",
    "BatchRenorm (r=1, d=0)",
]


def _norm_pair(name, dtype=torch.float32, seed=0):
    row = PARITY_ROWS[name]
    ours, theirs = (m.to(dtype) for m in row.make())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, row.shape


@pytest.mark.parametrize("name", NORM_NAMES)
def test_norms_nan_and_inf_propagate_as_in_torch(name):
    ours, theirs, shape = _norm_pair(name, torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x.view(-1)[0] = float("nan")
    x.view(-1)[7] = float("inf")
    a, b = ours(x), theirs(x)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    _close(a, b, 1e-8, equal_nan=True)


@pytest.mark.parametrize("name", NORM_NAMES)
def test_norms_zero_variance_stays_finite(name):
    ours, theirs, shape = _norm_pair(name)
    x = torch.full(shape, 7.0, requires_grad=True)
    y = ours(x)
    (y**2).sum().backward()
    assert y.isfinite().all() and x.grad.isfinite().all()
    _close(y, theirs(x.detach()), 1e-3)


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norms_half_precision_close_to_float64(name, dtype):
    ours, theirs, shape = _norm_pair(name)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 20).to(dtype)
    exact = _norm_pair(name, torch.float64)[1](x.double())
    y = ours(x)
    torch.testing.assert_close(y.double(), exact, rtol=2 * FLOAT_EPS[dtype], atol=4 * FLOAT_EPS[dtype])


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's RMSNorm
@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_norms_half_precision_output_dtype_as_torch(name, dtype, training):
    """float32 parameters do not promote a half input's output: it keeps the input's dtype, as in torch."""
    ours, theirs, shape = _norm_pair(name)
    ours.train(training), theirs.train(training)
    x = torch.randn(shape).to(dtype)
    assert ours(x).dtype == theirs(x).dtype == dtype


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norms_full_precision_keeps_its_numerics(name, dtype):
    """The float32/float64 paths compute in the input's dtype, exactly the plain formula (no casts)."""
    ours, _, shape = _norm_pair(name, dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3 + 1
    y = ours(x)
    assert y.dtype == dtype
    if name in ("LayerNorm", "RMSNorm"):
        dims = (-2, -1) if name == "LayerNorm" else (-1,)
        if name == "LayerNorm":
            mean = x.mean(dims, keepdim=True)
            plain = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(dims, keepdim=True) + ours.eps)
            plain = plain * ours.weight + ours.bias
        else:
            plain = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + ours.eps) * ours.weight
        assert torch.equal(y, plain)


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("ratio", [1e4, 1e6])
def test_norms_large_mean_float32_close_to_float64(name, ratio):
    ours, _, shape = _norm_pair(name)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + ratio).float()
    exact = _norm_pair(name, torch.float64)[1](x.double())
    if name == "RMSNorm":  # no centring: a large mean is just a large scale, nothing cancels
        ratio = 1.0
    err = (ours(x).double() - exact).abs().max().item()
    assert err <= 8 * FLOAT_EPS[torch.float32] * ratio * 3 + 1e-5, f"error {err:.2e}"


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("needs", [(1, 1), (1, 0), (0, 1)])
def test_norms_layouts_and_partial_requires_grad_match_torch(name, layout, needs):
    ours, theirs, shape = _norm_pair(name)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 2 + 1
    dy = torch.randn(shape, generator=g)
    if len(shape) == 4 and layout == "channels_last":
        base, dy = base.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    elif layout == "strided":
        base = torch.cat([base, base], dim=-1)[..., ::2]
    grads = []
    # torch's side runs on a contiguous copy: torch 2.13's nn.GroupNorm crashes (segmentation fault)
    # in backward for channels_last input that does not require grad; its values do not depend on layout
    for m, inp in ((ours, base), (theirs, base.contiguous())):
        for p in m.parameters():
            p.requires_grad_(bool(needs[1]))
        x = inp.clone().requires_grad_(bool(needs[0]))
        y = m(x)
        leaves = ([x] if needs[0] else []) + [p for p in m.parameters() if p.requires_grad]
        grads.append((y, torch.autograd.grad(y, leaves, dy) if leaves else ()))
    _close(grads[0][0], grads[1][0], 1e-4)
    for a, b in zip(grads[0][1], grads[1][1]):
        _close(a, b, 1e-4)


@pytest.mark.parametrize("name", NORM_NAMES)
def test_norms_double_backward_matches_torch(name):
    ours, theirs, shape = _norm_pair(name, torch.float64)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    second = []
    for m in (ours, theirs):
        (g,) = torch.autograd.grad((m(x) ** 3).sum(), x, create_graph=True)
        second.append(torch.autograd.grad((g**2).sum(), x)[0])
    _close(second[0], second[1], 1e-8)


@pytest.mark.parametrize("name", NORM_NAMES)
def test_norms_wrong_channels_or_shape_is_a_value_error(name):
    ours, _, shape = _norm_pair(name)
    bad = list(shape)
    bad[1 if name not in ("LayerNorm", "RMSNorm") else -1] += 1
    with pytest.raises(ValueError):
        ours(torch.randn(bad))


@pytest.mark.parametrize(
    "name",
    [n for n in NORM_NAMES if n != "InstanceNorm2d"],  # torch itself raises IndexError there (affine)
)
@pytest.mark.parametrize("training", [True, False])
def test_norms_empty_batch_behaves_as_torch(name, training):
    """An empty output, zero parameter gradients, and the same buffers as torch afterwards."""
    ours, theirs, shape = _norm_pair(name)
    for m in (ours, theirs):
        m.train(training)
        x = torch.randn(0, *shape[1:], requires_grad=True)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_differs_instance_norm_empty_batch_keeps_running_statistics(training, affine):
    """torch raises IndexError with affine parameters, and training sets the running statistics to NaN
    (the mean over no instances); bnlib returns the empty output and leaves them as they are."""
    ours = norm.InstanceNorm2d(4, affine=affine, track_running_stats=True).train(training)
    theirs = nn.InstanceNorm2d(4, affine=affine, track_running_stats=True).train(training)
    x = torch.randn(0, 4, 3, 3)
    assert ours(x).shape == x.shape
    _close(ours.running_mean, torch.zeros(4))
    _close(ours.running_var, torch.ones(4))
    if affine:
        with pytest.raises(IndexError):
            theirs(x)
    else:
        theirs(x)
        assert theirs.running_mean.isnan().all() == training


@pytest.mark.parametrize("cls", ["InstanceNorm1d", "InstanceNorm2d"])
@pytest.mark.parametrize("shape", [(2, 4), (4,), (0, 4)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_norms_instance_norm_over_one_position_is_an_error_as_in_torch(cls, shape, training, track):
    """Instance statistics over one position would make every output beta: torch raises whenever the input's own
    statistics are used (training, or eval without running statistics); eval with running statistics is legal."""
    d = 1 if cls == "InstanceNorm1d" else 2
    x = torch.randn(*shape, *(1,) * d)
    ours = getattr(norm, cls)(4, affine=True, track_running_stats=track).train(training)
    theirs = getattr(nn, cls)(4, affine=True, track_running_stats=track).train(training)
    if training or not track:
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            theirs(x)
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            ours(x)
    elif shape[0] == 0:  # torch raises IndexError here (an empty batch with affine parameters, see above)
        assert ours(x).shape == x.shape
    else:
        _close(ours(x), theirs(x))
