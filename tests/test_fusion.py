"""bnlib.norm.fusion against torch.nn.utils.fusion and against the unfolded network."""

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnlib
from bnlib.lab import models
from bnlib.norm import fusion
from bnlib.norm.modules import is_batch_norm

torch.set_num_threads(1)


def _trained_bn(bn: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Give a BN layer non-trivial gamma, beta and running statistics, then switch it to eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    bn.train()
    for _ in range(3):
        bn(torch.randn(shape, generator=g) * 2 + 1)
    return bn.eval()


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnlib.BatchNorm2d])
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_matches_torch_fusion_and_unfolded(bn_cls, conv_bias, affine):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias).eval()
    bn = _trained_bn(bn_cls(5, affine=affine), (8, 5, 4, 4))
    ours = fusion.fuse_conv_bn(conv, bn)
    x = torch.randn(4, 3, 6, 6)
    expected = bn(conv(x))
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    if bn_cls is nn.BatchNorm2d:
        theirs = fuse_conv_bn_eval(conv, bn)
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-6, atol=1e-6)
    assert ours is not conv and ours.bias is not None
    assert (conv.bias is not None) == conv_bias  # the original layer is untouched


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, bnlib.BatchNorm1d])
def test_linear_matches_torch_fusion(bn_cls):
    torch.manual_seed(1)
    linear = nn.Linear(7, 4).eval()
    bn = _trained_bn(bn_cls(4), (16, 4))
    ours = fusion.fuse_linear_bn(linear, bn)
    x = torch.randn(10, 7)
    torch.testing.assert_close(ours(x), bn(linear(x)), rtol=1e-5, atol=1e-5)
    if bn_cls is nn.BatchNorm1d:
        theirs = fuse_linear_bn_eval(linear, bn)
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "conv_cls, bn_cls, shape", [(nn.Conv1d, nn.BatchNorm1d, (2, 3, 9)), (nn.Conv3d, nn.BatchNorm3d, (2, 3, 4, 4, 4))]
)
def test_other_conv_dimensions(conv_cls, bn_cls, shape):
    torch.manual_seed(2)
    conv = conv_cls(3, 6, 3, padding=1).eval()
    bn = _trained_bn(bn_cls(6), (4, 6) + shape[2:])
    x = torch.randn(shape)
    torch.testing.assert_close(fusion.fuse_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_transposed_conv_matches_torch():
    torch.manual_seed(3)
    conv = nn.ConvTranspose2d(3, 5, 3, stride=2).eval()
    bn = _trained_bn(nn.BatchNorm2d(5), (8, 5, 4, 4))
    x = torch.randn(2, 3, 4, 4)
    ours = fusion.fuse_conv_bn(conv, bn)
    torch.testing.assert_close(ours(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    theirs = fuse_conv_bn_eval(conv, bn, transpose=True)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-6)


def test_grouped_conv():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 8, 3, groups=2, padding=1).eval()
    bn = _trained_bn(bnlib.BatchNorm2d(8), (8, 8, 3, 3))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(fusion.fuse_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [bnlib.BatchNorm2d, nn.BatchNorm2d])
def test_fuse_model_small_cnn(norm):
    g = torch.Generator().manual_seed(0)
    net = models.small_cnn(channels=(4, 8), image_size=8, norm=norm, generator=g)
    net.train()
    for _ in range(3):
        net(torch.randn(16, 1, 8, 8))
    net.eval()
    folded = fusion.fuse_model(net)
    assert not any(is_batch_norm(m) for m in folded.modules())
    assert any(is_batch_norm(m) for m in net.modules())  # the original is untouched
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    assert not folded.training


def test_fuse_model_nested_and_mlp():
    g = torch.Generator().manual_seed(1)
    mlp = models.mlp([6, 5, 4, 3], norm=bnlib.BatchNorm1d, generator=g)
    net = nn.Sequential(nn.Identity(), mlp)
    net.train()
    net(torch.randn(32, 6) * 3)
    net.eval()
    folded = fusion.fuse_model(net)
    assert sum(is_batch_norm(m) for m in folded.modules()) == 0
    x = torch.randn(7, 6)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_bn_not_after_a_linear_layer_is_kept():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    folded = fusion.fuse_model(net)
    assert is_batch_norm(folded[0])


def test_fold_weights_formula_float64():
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    mu, var = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    gamma, beta = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    w2, b2 = fusion.fold_weights(w, b, mu, var, 1e-3, gamma, beta)
    s = gamma / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(w2, w * s[:, None])
    torch.testing.assert_close(b2, (b - mu) * s + beta)


def test_errors():
    conv = nn.Conv2d(3, 5, 3).eval()
    bn = nn.BatchNorm2d(5)
    with pytest.raises(ValueError, match="eval"):
        fusion.fuse_conv_bn(conv, bn)  # bn still in training mode
    with pytest.raises(ValueError, match="features"):
        fusion.fuse_conv_bn(conv, nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match="running statistics"):
        fusion.fuse_conv_bn(conv, nn.BatchNorm2d(5, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="convolution"):
        fusion.fuse_conv_bn(nn.Linear(3, 5), bn.eval())
    with pytest.raises(ValueError, match="Linear"):
        fusion.fuse_linear_bn(conv, nn.BatchNorm1d(5).eval())
    with pytest.raises(ValueError, match="BatchNorm"):
        fusion.fuse_linear_bn(nn.Linear(3, 5), nn.LayerNorm(5))
    with pytest.raises(ValueError, match="model.eval"):
        fusion.fuse_model(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)))
    with pytest.raises(ValueError, match="dimension"):
        fusion.fold_weights(torch.ones(4, 3), None, torch.zeros(3), torch.ones(3), 1e-5)
