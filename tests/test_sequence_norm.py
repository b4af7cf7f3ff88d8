"""bnlib.norm.sequence: batch normalization of padded sequences over the real tokens only."""

import pytest
import torch

import bnlib
from bnlib.norm.sequence import MaskedBatchNorm1d, real_tokens

torch.set_num_threads(1)


def _sequences(n=5, t=7, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, t, c, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 1.5).to(dtype)
    lengths = torch.tensor([7, 3, 5, 1, 6])[:n]
    mask = torch.arange(t)[None, :] >= lengths[:, None]  # True at padding
    return x, mask


def _pair(reference_cls, momentum=0.1, dtype=torch.float64):
    torch.manual_seed(0)
    ours = MaskedBatchNorm1d(4, momentum=momentum, dtype=dtype)
    ref = reference_cls(4, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        for layer in (ours, ref):
            layer.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.7]))
            layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    return ours, ref


@pytest.mark.parametrize("reference_cls", [torch.nn.BatchNorm1d, bnlib.BatchNorm1d])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_padding_it_is_batchnorm1d_on_the_flattened_tokens(reference_cls, momentum):
    ours, ref = _pair(reference_cls, momentum)
    for seed in range(3):  # training steps: outputs, gradients, running statistics
        x, _ = _sequences(seed=seed)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), ref(x2.reshape(-1, 4)).reshape(x.shape)
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
        (y1 * torch.arange(y1.numel()).reshape(y1.shape)).sum().backward()
        (y2 * torch.arange(y2.numel()).reshape(y2.shape)).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    ours.eval(), ref.eval()
    x, _ = _sequences(seed=9)
    torch.testing.assert_close(ours(x), ref(x.reshape(-1, 4)).reshape(x.shape), rtol=1e-12, atol=1e-12)


def test_with_padding_it_is_batchnorm1d_on_the_real_tokens_only():
    ours, ref = _pair(torch.nn.BatchNorm1d)
    for seed in range(3):
        x, mask = _sequences(seed=seed)
        y = ours(x, mask)
        torch.testing.assert_close(y[~mask], ref(x[~mask]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    ours.eval(), ref.eval()
    x, mask = _sequences(seed=5)
    torch.testing.assert_close(ours(x, mask), ref(x.reshape(-1, 4)).reshape(x.shape), rtol=1e-12, atol=1e-12)


def test_padding_values_and_extra_padding_do_not_change_the_real_outputs():
    layer = MaskedBatchNorm1d(4, dtype=torch.float64)
    x, mask = _sequences()
    y = layer(x, mask)
    x_junk = torch.where(mask[..., None], torch.full_like(x, 1e3), x)  # other padding values
    torch.testing.assert_close(layer(x_junk, mask)[~mask], y[~mask], rtol=1e-12, atol=1e-12)
    wider = torch.cat([x, torch.zeros(5, 9, 4, dtype=x.dtype)], 1)  # 9 more padding columns
    wider_mask = torch.cat([mask, torch.ones(5, 9, dtype=torch.bool)], 1)
    torch.testing.assert_close(layer(wider, wider_mask)[~wider_mask], y[~mask], rtol=1e-12, atol=1e-12)
    naive = torch.nn.BatchNorm1d(4, dtype=torch.float64)  # the naive layer is not invariant
    y_wide = naive(wider.reshape(-1, 4))[~wider_mask.reshape(-1)]
    assert (y_wide - naive(x.reshape(-1, 4))[~mask.reshape(-1)]).abs().max() > 0.1


def test_outputs_still_depend_on_the_other_sequences_in_training_mode():
    layer = MaskedBatchNorm1d(4, dtype=torch.float64)
    x, mask = _sequences()
    y = layer(x, mask)
    x2 = x.clone()
    x2[1:] = x2[1:] * 2 + 1  # new batch-mates for sequence 0
    assert (layer(x2, mask)[0] - y[0]).abs().max() > 0.1
    layer.eval()
    torch.testing.assert_close(layer(x2, mask)[0], layer(x, mask)[0], rtol=0, atol=0)


def test_low_precision_input_keeps_its_dtype():
    layer = MaskedBatchNorm1d(4)
    x, mask = _sequences(dtype=torch.bfloat16)
    y = layer(x, mask)
    assert y.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32


def test_errors():
    layer = MaskedBatchNorm1d(4)
    x, mask = _sequences(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        layer(x[0])
    with pytest.raises(ValueError, match="channels"):
        layer(x[..., :3], mask)
    with pytest.raises(ValueError, match="shape"):
        layer(x, mask[:, :3])
    with pytest.raises(ValueError, match="boolean"):
        layer(x, mask.long())
    one_real = torch.ones_like(mask)
    one_real[0, 0] = False
    with pytest.raises(ValueError, match="more than 1 real token"):
        layer(x, one_real)
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        real_tokens(x[0], None)


def test_too_few_real_tokens_raise_whenever_batch_statistics_are_needed():
    x, mask = _sequences(dtype=torch.float64)
    all_padding = torch.ones_like(mask)
    untracked = MaskedBatchNorm1d(4, track_running_stats=False, dtype=torch.float64).eval()
    with pytest.raises(ValueError, match="more than 1 real token"):
        untracked(x, all_padding)  # eval, no running statistics: would be NaN otherwise
    tracked = MaskedBatchNorm1d(4, dtype=torch.float64).eval()
    assert torch.isfinite(tracked(x, all_padding)).all()  # running statistics: defined


def test_gradients_with_padding_are_batchnorm1d_gradients_on_the_real_tokens():
    ours, ref = _pair(torch.nn.BatchNorm1d)
    x, mask = _sequences()
    x1, x2 = x.clone().requires_grad_(), x[~mask].clone().requires_grad_()
    y1, y2 = ours(x1, mask), ref(x2)
    w = torch.linspace(-1, 2, y2.numel(), dtype=x.dtype).reshape(y2.shape)
    (y1[~mask] * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad[~mask], x2.grad, rtol=1e-10, atol=1e-10)
    assert (x1.grad[mask] == 0).all()  # padding gets no gradient through the statistics
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
