"""The reading copies: bnlib.norm.reference (forward values, gradient checks, the two backward passes,
the two variance formulas, bad input) and bnlib.norm.functional.algorithm_1 against batch_norm."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlib.lab.gradcheck import numeric_gradient, numeric_jacobian, rel_error
from bnlib.norm import functional
from bnlib.norm import reference as ref


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_forward_normalizes_each_feature(rng):
    x = rng.normal(3.0, 5.0, size=(64, 7))
    out, _ = ref.batchnorm_forward(x, np.ones(7), np.zeros(7), eps=0.0)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=0), 1.0, rtol=1e-12)


def test_gamma_beta_can_undo_normalization(rng):
    x = rng.normal(-2.0, 3.0, size=(16, 4))
    eps = 1e-5
    gamma = np.sqrt(x.var(axis=0) + eps)
    out, _ = ref.batchnorm_forward(x, gamma, x.mean(axis=0), eps=eps)
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_backward_matches_numeric_gradient(rng, eps):
    x = rng.normal(1.0, 2.0, size=(6, 5))
    gamma, beta = rng.normal(size=5), rng.normal(size=5)
    dout = rng.normal(size=(6, 5))
    _, cache = ref.batchnorm_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = ref.batchnorm_backward(dout, cache)
    assert rel_error(dx, numeric_gradient(lambda v: ref.batchnorm_forward(v, gamma, beta, eps)[0], x, dout)) < 1e-8
    assert rel_error(dgamma, numeric_gradient(lambda g: ref.batchnorm_forward(x, g, beta, eps)[0], gamma, dout)) < 1e-8
    assert rel_error(dbeta, numeric_gradient(lambda b: ref.batchnorm_forward(x, gamma, b, eps)[0], beta, dout)) < 1e-8


def test_graph_backward_agrees_with_compact(rng):
    x = rng.normal(size=(10, 3))
    _, cache = ref.batchnorm_forward(x, rng.normal(size=3), rng.normal(size=3))
    dout = rng.normal(size=(10, 3))
    for a, b in zip(ref.batchnorm_backward(dout, cache), ref.batchnorm_backward_graph(dout, cache)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_spatial_matches_per_channel_rows(rng):
    x = rng.normal(size=(3, 4, 5, 6))
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    out, cache = ref.spatial_batchnorm_forward(x, gamma, beta)
    for c in range(4):
        v = x[:, c]
        expected = gamma[c] * (v - v.mean()) / np.sqrt(v.var() + 1e-5) + beta[c]
        np.testing.assert_allclose(out[:, c], expected, rtol=1e-10, atol=1e-12)
    dout = rng.normal(size=x.shape)
    dx, _, _ = ref.spatial_batchnorm_backward(dout, cache)
    num = numeric_gradient(lambda v: ref.spatial_batchnorm_forward(v, gamma, beta)[0], x, dout)
    assert rel_error(dx, num) < 1e-8


@pytest.mark.parametrize("eps", [0.0, 1e-3, 1.0])
def test_jacobian_is_exact_for_every_eps(rng, eps):
    x = rng.normal(size=8)

    def normalize(v):
        return (v - v.mean()) / np.sqrt(v.var() + eps)

    np.testing.assert_allclose(ref.batchnorm_jacobian(x, eps), numeric_jacobian(normalize, x), atol=1e-8)


def test_jacobian_is_zero_for_two_values_without_eps():
    np.testing.assert_allclose(ref.batchnorm_jacobian([0.3, 1.7], eps=0.0), 0.0, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, (0, 2)])
def test_batch_mean_var_is_mean_then_mean_of_squared_deviations(rng, axis):
    x = rng.normal(2.0, 3.0, size=(6, 5, 4))
    mean, var = ref.batch_mean_var(x, axis=axis)
    np.testing.assert_allclose(mean, x.mean(axis=axis), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=axis), rtol=1e-13)  # numpy's var is biased (ddof=0)


def test_the_two_variance_formulas_agree_in_float64(rng):
    x = rng.normal(1e3, 1.0, size=(500, 3))
    for got, want in zip(ref.batch_mean_var(x), ref.batch_mean_var_shifted(x)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def _relative_variance_errors(formula, mean: float, seeds=range(20)) -> list[float]:
    """Relative error of ``formula``'s variance of float32 data, spread 1 around ``mean``, per seed."""
    errors = []
    for seed in seeds:
        v = (mean + np.random.default_rng(seed).normal(size=4096)).astype(np.float32)
        exact = v.astype(np.float64).var()
        errors.append(abs(float(formula(v)[1]) - exact) / exact)
    return errors


def test_shifted_variance_keeps_float32_digits_where_the_plain_one_loses_them():
    """At mean 1e5 and spread 1 the float32 mean is off by up to half an ulp (0.004), and that error
    enters the plain formula's variance squared; the shifted formula takes it back out."""
    assert max(_relative_variance_errors(ref.batch_mean_var_shifted, 1e5)) < 1e-6
    assert max(_relative_variance_errors(ref.batch_mean_var, 1e5)) > 1e-5  # what the correction is for
    assert max(_relative_variance_errors(ref.batch_mean_var, 1.0)) < 1e-6  # and a centred batch needs none


def test_variance_keeps_digits_with_large_mean():
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(size=(1000, 2))).astype(np.float32)
    _, var = ref.batch_mean_var_shifted(x)
    exact = x.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(var, exact, rtol=1e-5)


def test_forward_uses_the_shifted_statistics():
    x = (1e5 + np.random.default_rng(3).normal(size=(4096, 1))).astype(np.float32)
    mean, var = ref.batch_mean_var_shifted(x)
    _, cache = ref.batchnorm_forward(x, np.ones(1), np.zeros(1))
    np.testing.assert_array_equal(cache.mean, mean)
    np.testing.assert_array_equal(cache.var, var)


@pytest.mark.parametrize("shape", [(16, 3), (8, 3, 5), (4, 3, 5, 6)])
@pytest.mark.parametrize("affine", [True, False])
def test_algorithm_1_is_what_batch_norm_computes(shape, affine):
    gen = torch.Generator().manual_seed(0)
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    weight = torch.rand(3, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_() if affine else None
    bias = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    params = [t for t in (x, weight, bias) if t is not None]

    plain = functional.algorithm_1(x, weight, bias, eps=1e-5)
    fast = functional.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fast, params, dy), torch.autograd.grad(plain, params, dy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_algorithm_1_agrees_with_the_numpy_reading_copy(rng):
    x = rng.normal(-1.0, 4.0, size=(10, 4))
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    want, _ = ref.batchnorm_forward(x, gamma, beta, eps=1e-3)
    got = functional.algorithm_1(torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_inference_is_the_affine_map(rng):
    x = rng.normal(size=(5, 3))
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    out = ref.batchnorm_inference(x, mean, var, gamma, beta)
    np.testing.assert_allclose(out, gamma * (x - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    d=st.integers(1, 5),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_property_output_is_standardized(n, d, scale, offset, seed):
    x = np.random.default_rng(seed).normal(offset, scale, size=(n, d))
    out, cache = ref.batchnorm_forward(x, np.ones(d), np.zeros(d), eps=0.0)
    spread = x.std(axis=0)
    ok = spread > 1e-6 * max(1.0, abs(offset))  # features that are not constant to working precision
    np.testing.assert_allclose(out.mean(axis=0)[ok], 0.0, atol=1e-6)
    np.testing.assert_allclose(out.std(axis=0)[ok], 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ref.batchnorm_forward(np.ones((4, 3, 2)), np.ones(3), np.zeros(3)), "shape \\(N, D\\)"),
        (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(2), np.zeros(3)), "gamma must have shape \\(3,\\)"),
        (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros((3, 1))), "beta must have shape"),
        (lambda: ref.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3)), "more than 1 value"),
        (lambda: ref.spatial_batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3)), "\\(N, C, H, W\\)"),
        (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), eps=-1), "eps"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
