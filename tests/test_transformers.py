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


def test_padding_sweep_adds_rows_of_padding_and_reports_the_shift_of_the_statistics():
    model = _model("batch")
    b = _batch()
    sweep = tr.padding_sweep(model, b, [0.0, 0.7, 0.9])
    p = sweep["padding_fraction"]
    assert p[0] == b.padding_fraction and 0.7 <= p[1] < p[2] and 0.9 <= p[2]
    assert sweep["rows"][0] == 0 and sweep["rows"][1] < sweep["rows"][2]
    assert sweep["stat_shift"][0] < sweep["stat_shift"][2]
    assert len(sweep["normalized"]) == 3 and sweep["normalized"][0].shape == (int((~b.padding_mask).sum()), 8)


def test_pad_rows_keeps_the_length_and_reaches_the_fraction():
    b = _batch()
    for fraction in (0.0, 0.6, 0.8, 0.95):
        rows = tr.rows_for_padding(b, fraction)
        wide = tr.pad_rows(b, rows)
        assert wide.tokens.shape == (6 + rows, b.tokens.shape[1])
        assert torch.equal(wide.tokens[:6], b.tokens) and wide.padding_mask[6:].all()
        assert wide.padding_fraction >= fraction
        if rows:  # the fewest rows: one less falls short
            assert tr.pad_rows(b, rows - 1).padding_fraction < fraction
    with pytest.raises(ValueError, match="rows"):
        tr.pad_rows(b, -1)
    with pytest.raises(ValueError, match="fraction"):
        tr.rows_for_padding(b, 1.0)


@pytest.mark.parametrize("kind", tr.NORMS)
def test_rows_of_padding_only_give_finite_outputs(kind):
    model = _model(kind).train()
    b = _batch()
    wide = tr.pad_rows(b, 4)
    logits = model(wide.tokens, wide.padding_mask)
    assert torch.isfinite(logits).all()
    if kind != "batch":  # statistics without padding: the real tokens do not move
        y = model(b.tokens, b.padding_mask)[~b.padding_mask]
        torch.testing.assert_close(logits[~wide.padding_mask], y, rtol=1e-5, atol=1e-5)


def test_statistics_drift_measures_batch_against_running_statistics():
    b = _batch()
    x = torch.randn(*b.tokens.shape, 8, generator=torch.Generator().manual_seed(1)) * 2 + 3
    for kind in ("batch", "masked_batch"):
        norm = tr.SequenceNorm(kind, 8)
        tokens = x.reshape(-1, 8) if kind == "batch" else x[~b.padding_mask]
        mean_drift, std_drift = tr.statistics_drift(norm, x, b.padding_mask)  # running: 0 and 1
        assert abs(mean_drift - tokens.mean(0).square().mean().sqrt()) < 1e-5
        assert abs(std_drift - (tokens.std(0) - 1).square().mean().sqrt()) < 1e-5
        with torch.no_grad():
            norm.norm.running_mean.copy_(tokens.mean(0))
            norm.norm.running_var.copy_(tokens.var(0))
        assert max(tr.statistics_drift(norm, x, b.padding_mask)) < 1e-5
    with pytest.raises(ValueError, match="running"):
        tr.statistics_drift(tr.SequenceNorm("layer", 8), x, b.padding_mask)


def test_training_is_a_function_of_the_seed_and_lowers_the_loss():
    kwargs = {"steps": 40, "batch_size": 16, "lengths": (2, 8), "vocab": 5, "d_model": 16, "max_length": 16}
    m1, h1 = tr.train_transformer("layer", 3, **kwargs)
    m2, h2 = tr.train_transformer("layer", 3, **kwargs)
    l1 = h1["loss"]
    assert l1 == h2["loss"] and not m1.training and len(l1) == 40
    assert sum(l1[-10:]) < sum(l1[:10])
    _, h3 = tr.train_transformer("layer", 4, **kwargs)
    assert h3["loss"] != l1
    assert all(d != d for d in h1["mean_drift"])  # NaN: layer norm has no running statistics
    assert all(0 < p < 1 for p in h1["padding_fraction"])


def test_training_history_logs_the_drift_of_batch_statistics():
    kwargs = {"steps": 30, "batch_size": 16, "lengths": (2, 8), "vocab": 5, "d_model": 16, "max_length": 16}
    model, h = tr.train_transformer("batch", 0, **kwargs)
    assert len(h["mean_drift"]) == len(h["std_drift"]) == 30
    assert h["mean_drift"][0] > 0.1  # running statistics start at mean 0, variance 1
    assert all(d == d and d >= 0 for d in h["mean_drift"] + h["std_drift"])
