"""bnlib.lab.experiments.transformers: the padded sequence task, the tiny Transformer and its probes."""

import pytest
import torch

from bnlib.lab.experiments import transformers as tr

torch.set_num_threads(1)


def _batch(seed=0, n=6, lengths=(2, 9)):
    return tr.duplicate_tokens(n, lengths, 5, torch.Generator().manual_seed(seed))


def _model(kind, seed=0):
    torch.manual_seed(seed)
    return tr.TinyTransformer(kind, vocab=5, d_model=8, heads=2, layers=2, max_length=40)


def test_labels_mark_tokens_that_occur_elsewhere_in_their_sequence():
    b = _batch()
    for tokens, labels, mask in zip(b.tokens, b.labels, b.padding_mask):
        real = tokens[~mask].tolist()
        assert labels[~mask].tolist() == [int(real.count(t) > 1) for t in real]
        assert (tokens[mask] == tr.PAD).all() and (labels[mask] == -100).all()
        assert not mask[: len(real)].any() and mask[len(real) :].all()  # padding at the end
    assert b.tokens.shape[1] == int((~b.padding_mask).sum(1).max())  # padded to the longest


def test_duplicate_tokens_and_pad_to_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="2 <= shortest"):
        tr.duplicate_tokens(3, (1, 4), 5, g)
    with pytest.raises(ValueError, match="shorter"):
        tr.duplicate_tokens(3, (4, 6), 5, g, length=5)
    with pytest.raises(ValueError, match="shorter"):
        tr.pad_to(_batch(), 2)
    with pytest.raises(ValueError, match="kind"):
        tr.SequenceNorm("group", 8)


def test_pad_to_adds_padding_only():
    b = _batch()
    wide = tr.pad_to(b, 20)
    assert wide.tokens.shape == (6, 20) and wide.padding_fraction > b.padding_fraction
    assert torch.equal(wide.tokens[:, : b.tokens.shape[1]], b.tokens)
    assert (wide.tokens[:, b.tokens.shape[1] :] == tr.PAD).all()


@pytest.mark.parametrize("kind", ["masked_batch", "layer"])
def test_extra_padding_changes_nothing_with_masked_statistics(kind):
    model = _model(kind).train()
    b = _batch()
    wide = tr.pad_to(b, 30)
    y = model(b.tokens, b.padding_mask)[~b.padding_mask]
    torch.testing.assert_close(model(wide.tokens, wide.padding_mask)[~wide.padding_mask], y, rtol=1e-5, atol=1e-5)


def test_extra_padding_moves_naive_batch_norm():
    model = _model("batch").train()
    b = _batch()
    wide = tr.pad_to(b, 30)
    y = model(b.tokens, b.padding_mask)[~b.padding_mask]
    assert (model(wide.tokens, wide.padding_mask)[~wide.padding_mask] - y).abs().max() > 0.05


def test_self_attention_ignores_padding_keys():
    torch.manual_seed(0)
    attention = tr.SelfAttention(8, 2)
    x = torch.randn(3, 6, 8)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 4:] = True
    y = attention(x, mask)
    x2 = x.clone()
    x2[:, 4:] = 100.0
    torch.testing.assert_close(attention(x2, mask)[:, :4], y[:, :4])
    with pytest.raises(ValueError, match="divisible"):
        tr.SelfAttention(7, 2)


def test_batch_mate_change_is_zero_only_without_batch_statistics():
    batches = [_batch(seed) for seed in range(3)]
    for kind in tr.NORMS:
        model = _model(kind)
        assert tr.batch_mate_change(model, batches, batch_statistics=False)["max_change"] == 0.0
        change = tr.batch_mate_change(model, batches)["max_change"]
        if kind == "layer":
            assert change < 1e-5
        else:
            assert change > 1e-3, kind
    with pytest.raises(ValueError, match="two batches"):
        tr.batch_mate_change(_model("layer"), batches[:1])


def test_accuracy_leaves_the_model_as_it_was():
    model = _model("batch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = [_batch()]
    acc_batch = tr.accuracy(model, b, batch_statistics=True)
    acc_running = tr.accuracy(model, b)
    assert 0.0 <= acc_batch <= 1.0 and 0.0 <= acc_running <= 1.0 and model.training  # mode kept
    assert acc_running == tr.accuracy(model.eval(), b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_padding_sweep_reports_the_padding_shift_of_the_statistics():
    model = _model("batch")
    b = _batch()
    sweep = tr.padding_sweep(model, b, [b.tokens.shape[1], 20, 40])
    p = sweep["padding_fraction"]
    assert p[0] < p[1] < p[2]
    assert sweep["stat_shift"][0] < sweep["stat_shift"][2]
    assert len(sweep["normalized"]) == 3 and sweep["normalized"][0].shape == (int((~b.padding_mask).sum()), 8)


def test_training_is_a_function_of_the_seed_and_lowers_the_loss():
    kwargs = {"steps": 40, "batch_size": 16, "lengths": (2, 8), "vocab": 5, "d_model": 16, "max_length": 16}
    m1, l1 = tr.train_transformer("layer", 3, **kwargs)
    m2, l2 = tr.train_transformer("layer", 3, **kwargs)
    assert l1 == l2 and not m1.training
    assert sum(l1[-10:]) < sum(l1[:10])
    _, l3 = tr.train_transformer("layer", 4, **kwargs)
    assert l3 != l1
