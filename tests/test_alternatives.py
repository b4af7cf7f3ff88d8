"""bnlib.lab.experiments.alternatives: the residual MLPs of the alternatives chapter and their training."""

import math

import pytest
import torch

from bnlib.lab.data import Split
from bnlib.lab.experiments import alternatives
from bnlib.norm.normalizer_free import NFResidual, WSLinear


def tiny_data(n_train: int = 192, n_test: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 20, generator=g) * 2
    y = torch.randint(0, 3, (n_train + n_test,), generator=g)
    x = centers[y] + torch.randn(n_train + n_test, 20, generator=g)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


SMALL = {"sizes": (20, 16, 3), "depth": 2}


@pytest.mark.parametrize("method", sorted(alternatives.METHODS))
def test_every_variant_builds_and_maps_to_logits(method):
    model = alternatives.residual_mlp(method, **SMALL, generator=torch.Generator().manual_seed(0))
    assert model(torch.randn(8, 20)).shape == (8, 3)
    assert len(model.stream(torch.randn(8, 20))) == SMALL["depth"] + 1


def test_variants_use_the_mechanisms_they_name():
    nf = alternatives.residual_mlp("nf", **SMALL)
    assert all(isinstance(b, NFResidual) for b in nf.blocks)
    assert [b.beta for b in nf.blocks] == pytest.approx([1.0, math.sqrt(1.04)])
    ws = alternatives.residual_mlp("ws_group", **SMALL)
    assert sum(isinstance(m, WSLinear) for m in ws.modules()) == 2 * SMALL["depth"]


def test_same_seed_same_initialization():
    a = alternatives.residual_mlp("batch", **SMALL, generator=torch.Generator().manual_seed(3))
    b = alternatives.residual_mlp("batch", **SMALL, generator=torch.Generator().manual_seed(3))
    c = alternatives.residual_mlp("batch", **SMALL, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.stem.weight, c.stem.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        alternatives.residual_mlp("weight")
    with pytest.raises(ValueError, match="depth"):
        alternatives.residual_mlp("batch", depth=0)
    with pytest.raises(ValueError, match="two examples"):
        alternatives.stream_variances(alternatives.residual_mlp("none", **SMALL), torch.randn(1, 20))


def test_fixup_network_starts_as_its_skip_path():
    model = alternatives.residual_mlp("fixup", sizes=(20, 32, 3), depth=5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(50, 20)
    stream = model.stream(x)
    assert all(torch.equal(h, stream[0]) for h in stream)
    assert torch.equal(model(x), torch.zeros(50, 3))
    v = alternatives.stream_variances(model, x)
    assert v == [v[0]] * len(v)


def test_stream_variance_signatures():
    x = torch.randn(500, 20)
    none = alternatives.stream_variances(
        alternatives.residual_mlp("none", sizes=(20, 128, 3), depth=6, generator=torch.Generator().manual_seed(0)), x
    )
    nf = alternatives.stream_variances(
        alternatives.residual_mlp(
            "nf", sizes=(20, 128, 3), depth=6, alpha=0.5, generator=torch.Generator().manual_seed(0)
        ),
        x,
    )
    assert none[-1] / none[0] > 10  # He initialization: the stream grows geometrically
    predicted = [1 + k * 0.25 for k in range(7)]
    assert all(abs(v / nf[0] / p - 1) < 0.15 for v, p in zip(nf, predicted))


def test_stream_variances_leave_running_statistics_alone():
    model = alternatives.residual_mlp("batch", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alternatives.stream_variances(model.eval(), torch.randn(10, 20))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_run_trains_reproducibly_and_counts_clipping():
    data = tiny_data()
    first = alternatives.run(data, "nf", seed=1, batch_size=32, epochs=2, lr=0.05, clipping=0.01, **SMALL)
    again = alternatives.run(data, "nf", seed=1, batch_size=32, epochs=2, lr=0.05, clipping=0.01, **SMALL)
    assert first["err"] == again["err"] and 0 < first["clipped"] <= 1
    free = alternatives.run(data, "nf", seed=1, batch_size=32, epochs=2, lr=0.05, **SMALL)
    assert free["clipped"] == 0.0
    assert free["err"] < 0.3  # three well-separated clusters
    # lambda = 0.01 clips most units (zero-initialized biases move by at most 1e-5 a step):
    # 12 steps learn less, but still beat chance (2/3)
    assert first["err"] < 0.5


def test_fit_leaves_the_classifier_unclipped():
    model = alternatives.residual_mlp("nf", **SMALL, generator=torch.Generator().manual_seed(0))
    data = tiny_data()
    head_before = model.head[-1].weight.detach().clone()
    batches = [torch.arange(32)]
    grads = {}
    model.head[-1].weight.register_hook(lambda g: grads.setdefault("head", g.clone()))
    alternatives.fit(model, data.x_train, data.y_train, batches, lr=0.1, clipping=1e-6, momentum=0.0, weight_decay=0.0)
    step = head_before - model.head[-1].weight.detach()
    assert torch.allclose(step, 0.1 * grads["head"], atol=1e-7)  # the full, unclipped gradient


def test_nf_branches_start_bias_free_with_learnable_gains():
    model = alternatives.residual_mlp("nf", **SMALL, generator=torch.Generator().manual_seed(0))
    layers = [m for b in model.blocks for m in b.branch if isinstance(m, WSLinear)]
    assert len(layers) == 2 * SMALL["depth"]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in layers + [model.stem])
    assert all(m.channel_gain is not None for m in layers)


def test_unit_variance_stem_gives_the_first_block_unit_variance():
    model = alternatives.residual_mlp("nf", **SMALL, generator=torch.Generator().manual_seed(0))
    x = tiny_data().x_train
    measured = float(model.stem(x).var(0, correction=0).mean())
    assert alternatives.unit_variance_stem_(model, x) == pytest.approx(measured, rel=1e-5)
    assert float(model.stem(x).var(0, correction=0).mean()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="scaled weight"):
        alternatives.unit_variance_stem_(alternatives.residual_mlp("none", **SMALL), x)
