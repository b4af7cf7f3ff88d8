r"""Why Transformers use layer normalization: a tiny Transformer with batch or layer normalization.

The task ships with the code: sequences of random tokens of varied length, padded to a common
length, and for every real token the label "does this token occur elsewhere in its sequence?"
(token classification; one attention layer can solve it by matching equal tokens).

The model is a pre-norm Transformer encoder (Xiong et al. 2020) with one of three normalizations
at every norm position (:data:`NORMS`):

- ``"batch"``: the naive code, ``BatchNorm1d`` over the ``N * T`` token vectors, padding included;
- ``"masked_batch"``: :class:`bnlib.norm.sequence.MaskedBatchNorm1d`, statistics over real tokens;
- ``"layer"``: ``LayerNorm`` over the channels of each token (Ba et al. 2016; Vaswani et al. 2017).

The probes measure what batch statistics do here: how they move with the padding fraction
(:func:`padding_sweep`), how one sequence's output moves when its batch-mates change
(:func:`batch_mate_change`), and how evaluation with batch statistics differs from evaluation with
running statistics on batches whose lengths differ from training (:func:`accuracy`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnlib.norm.sequence import MaskedBatchNorm1d, real_tokens

__all__ = [
    "NORMS",
    "PAD",
    "Batch",
    "duplicate_tokens",
    "pad_to",
    "pad_rows",
    "rows_for_padding",
    "SequenceNorm",
    "SelfAttention",
    "TinyTransformer",
    "train_transformer",
    "statistics_drift",
    "accuracy",
    "padding_sweep",
    "batch_mate_change",
    "BUCKETS",
    "SWEEP_FRACTIONS",
    "evaluation_batches",
    "run_seed",
]

#: the values of :class:`SequenceNorm`'s ``kind``
NORMS = ("batch", "masked_batch", "layer")
#: the padding token (real tokens are 1 ... vocab)
PAD = 0


@dataclass(frozen=True)
class Batch:
    """Padded sequences with their labels.

    Args:
        tokens: ``(N, T)`` token ids, :data:`PAD` at padding.
        labels: ``(N, T)`` class per token, -100 (ignored by the loss) at padding.
        padding_mask: ``(N, T)`` booleans, True at padding.
    """

    tokens: Tensor
    labels: Tensor
    padding_mask: Tensor

    @property
    def padding_fraction(self) -> float:
        """The fraction of the ``N * T`` positions that are padding."""
        return float(self.padding_mask.float().mean())


def duplicate_tokens(
    n: int, lengths: tuple[int, int], vocab: int, generator: torch.Generator, length: int | None = None
) -> Batch:
    """``n`` random sequences, lengths uniform in ``lengths``; label 1 where a token occurs twice or more.

    Sequences are padded to the longest one in the batch, or to ``length`` when given.

    Args:
        n: number of sequences.
        lengths: the shortest and longest length (inclusive).
        vocab: number of real tokens (ids 1 ... vocab).
        generator: the random generator (the batch is a function of its state).
        length: pad every sequence to this length (at least the longest); None: to the longest.
    """
    low, high = lengths
    if not 2 <= low <= high:
        raise ValueError(f"need 2 <= shortest <= longest, got {lengths}")
    if vocab < 2:
        raise ValueError(f"need at least 2 tokens, got vocab={vocab}")
    lens = torch.randint(low, high + 1, (n,), generator=generator)
    width = int(lens.max()) if length is None else length
    if width < int(lens.max()):
        raise ValueError(f"length {length} is shorter than the longest sequence {int(lens.max())}")
    mask = torch.arange(width)[None, :] >= lens[:, None]
    tokens = torch.randint(1, vocab + 1, (n, width), generator=generator).masked_fill(mask, PAD)
    same = (tokens[:, :, None] == tokens[:, None, :]) & ~mask[:, None, :]
    same &= ~torch.eye(width, dtype=torch.bool)
    labels = same.any(-1).long().masked_fill(mask, -100)
    return Batch(tokens, labels, mask)


def pad_to(batch: Batch, length: int) -> Batch:
    """The same sequences with padding columns appended up to ``length``.

    Args:
        batch: padded sequences.
        length: the new padded length (at least the current one).
    """
    extra = length - batch.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"length {length} is shorter than the batch ({batch.tokens.shape[1]})")
    n = batch.tokens.shape[0]
    return Batch(
        torch.cat([batch.tokens, batch.tokens.new_full((n, extra), PAD)], 1),
        torch.cat([batch.labels, batch.labels.new_full((n, extra), -100)], 1),
        torch.cat([batch.padding_mask, batch.padding_mask.new_ones((n, extra))], 1),
    )


def pad_rows(batch: Batch, rows: int) -> Batch:
    """The same sequences with ``rows`` sequences of padding only appended.

    The padded length, and so the range of positions, stays the same.

    Args:
        batch: padded sequences.
        rows: how many all-padding sequences to add (>= 0).
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    t = batch.tokens.shape[1]
    return Batch(
        torch.cat([batch.tokens, batch.tokens.new_full((rows, t), PAD)]),
        torch.cat([batch.labels, batch.labels.new_full((rows, t), -100)]),
        torch.cat([batch.padding_mask, batch.padding_mask.new_ones((rows, t))]),
    )


def rows_for_padding(batch: Batch, fraction: float) -> int:
    """The fewest all-padding rows (:func:`pad_rows`) that make ``batch`` at least ``fraction`` padding.

    Args:
        batch: padded sequences.
        fraction: the padding fraction wanted, below 1; 0 rows if the batch already has it.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n, t = batch.tokens.shape
    padding = int(batch.padding_mask.sum())
    # (padding + t k) / (t (n + k)) >= fraction  <=>  k >= (fraction t n - padding) / (t (1 - fraction))
    need = (fraction * t * n - padding) / (t * (1 - fraction))
    return max(0, math.ceil(need - 1e-9))


class SequenceNorm(nn.Module):
    """One normalization of ``(N, T, C)`` token vectors, chosen by ``kind`` (see :data:`NORMS`).

    Args:
        kind: ``"batch"`` (``torch.nn.BatchNorm1d`` on the flattened tokens, padding included,
            the naive code; ``bnlib.BatchNorm1d`` computes the same and costs more per call),
            ``"masked_batch"`` (:class:`~bnlib.norm.sequence.MaskedBatchNorm1d`, statistics over
            the real tokens) or ``"layer"`` (``torch.nn.LayerNorm``, per token).
        d_model: channels C.

    Shape:
        Input: ``(N, T, C)`` and a ``padding_mask`` ``(N, T)``, True at padding.
        Output: ``(N, T, C)``.
    """

    def __init__(self, kind: str, d_model: int) -> None:
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"kind must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        layers = {"batch": nn.BatchNorm1d, "masked_batch": MaskedBatchNorm1d, "layer": nn.LayerNorm}
        self.norm = layers[kind](d_model)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        if self.kind == "batch":
            return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        if self.kind == "masked_batch":
            return self.norm(x, padding_mask)
        return self.norm(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention in which padding positions are never attended to.

    Args:
        d_model: channels per token (divisible by ``heads``).
        heads: attention heads.

    Shape:
        Input: ``(N, T, C)`` and a ``padding_mask`` ``(N, T)``, True at padding.
        Output: ``(N, T, C)``.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # (N, 1, 1, T): which keys each query may see; a sequence of padding only (no real key)
        # attends to its own padding, so that it gives numbers instead of NaN
        keep = ~(padding_mask & ~padding_mask.all(1, keepdim=True))[:, None, None, :]
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(a.transpose(1, 2).reshape(n, t, d))


class TinyTransformer(nn.Module):
    """A pre-norm Transformer encoder with a per-token classifier.

    ``h = embed(tokens) + position``; each layer adds ``attention(norm(h))`` (padding masked as
    keys) and ``mlp(norm(h))``; a last norm and a linear read-out give per-token logits.

    Args:
        kind: the normalization at every norm position, one of :data:`NORMS`.
        vocab: real tokens (ids 1 ... vocab; 0 is :data:`PAD`).
        d_model: channels per token.
        heads: attention heads.
        layers: encoder layers.
        max_length: the longest padded length it accepts (learned position embeddings).
        classes: outputs per token.

    Shape:
        Input: tokens ``(N, T)`` and ``padding_mask`` ``(N, T)``, True at padding.
        Output: logits ``(N, T, classes)``.
    """

    def __init__(
        self,
        kind: str,
        vocab: int = 16,
        d_model: int = 32,
        heads: int = 2,
        layers: int = 1,
        max_length: int = 256,
        classes: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, d_model, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(max_length, d_model) * 0.5)
        self.attention = nn.ModuleList(SelfAttention(d_model, heads) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(SequenceNorm(kind, d_model) for _ in range(2 * layers + 1))
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> Tensor:
        if tokens.shape[1] > self.position.shape[0]:
            raise ValueError(f"sequences of length {tokens.shape[1]} exceed max_length={self.position.shape[0]}")
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for i, (attention, mlp) in enumerate(zip(self.attention, self.mlp)):
            h = h + attention(self.norms[2 * i](h, padding_mask), padding_mask)
            h = h + mlp(self.norms[2 * i + 1](h, padding_mask))
        return self.head(self.norms[-1](h, padding_mask))


def train_transformer(
    kind: str,
    seed: int,
    steps: int = 300,
    batch_size: int = 32,
    lengths: tuple[int, int] = (2, 16),
    vocab: int = 16,
    lr: float = 3e-3,
    pad_length: int | None = None,
    **model_args,
) -> tuple[TinyTransformer, dict[str, list[float]]]:
    """Train a :class:`TinyTransformer` with Adam on fresh batches of :func:`duplicate_tokens`.

    The seed fixes the initialization and every batch.

    Args:
        kind: the normalization, one of :data:`NORMS`.
        seed: the seed.
        steps: optimizer steps.
        batch_size: sequences per batch.
        lengths: the shortest and longest training length.
        vocab: real tokens.
        lr: Adam's learning rate.
        pad_length: pad every training batch to this length; None: to its longest sequence.
        **model_args: further arguments of :class:`TinyTransformer`.

    Returns:
        The model (in eval mode) and its training history, a dict of per-step lists with the
        keys ``loss``, ``padding_fraction`` (of the batch), ``mean_drift`` and ``std_drift``
        (:func:`statistics_drift`, averaged over the norm layers; NaN for ``"layer"``).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyTransformer(kind, vocab=vocab, **model_args)
    generator = torch.Generator().manual_seed(10_000 + seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict[str, list[float]] = {
        "loss": [], "padding_fraction": [], "mean_drift": [], "std_drift": []
    }
    drifts: list[tuple[float, float]] = []

    def record(norm: nn.Module, inputs: tuple[Tensor, Tensor]) -> None:
        if norm.kind != "layer":
            drifts.append(statistics_drift(norm, *inputs))

    hooks = [norm.register_forward_pre_hook(record) for norm in model.norms]
    model.train()
    for _ in range(steps):
        batch = duplicate_tokens(batch_size, lengths, vocab, generator, pad_length)
        drifts.clear()
        logits = model(batch.tokens, batch.padding_mask)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        history["padding_fraction"].append(batch.padding_fraction)
        for i, name in enumerate(("mean_drift", "std_drift")):
            history[name].append(sum(d[i] for d in drifts) / len(drifts) if drifts else math.nan)
    for hook in hooks:
        hook.remove()
    return model.eval(), history


@torch.no_grad()
def statistics_drift(norm: SequenceNorm, x: Tensor, padding_mask: Tensor) -> tuple[float, float]:
    """How far this batch's statistics lie from a batch-norm layer's running ones, before its update.

    The batch statistics are those the layer normalizes with: over every position for
    ``"batch"``, over the real tokens for ``"masked_batch"``. In units of the running standard
    deviation s per channel, returns the root-mean-square over channels of
    ``(mean_B - running_mean) / s`` and of ``(std_B - s) / s`` (std_B with Bessel's correction, as
    the running variance is). Shen et al. (2020) plot a distance of this kind over training.

    Args:
        norm: a :class:`SequenceNorm` of kind ``"batch"`` or ``"masked_batch"``.
        x: its input ``(N, T, C)``.
        padding_mask: ``(N, T)``, True at padding.
    """
    if norm.kind == "layer":
        raise ValueError("layer norm keeps no running statistics")
    tokens = x.reshape(-1, x.shape[-1]) if norm.kind == "batch" else real_tokens(x, padding_mask)
    s = norm.norm.running_var.sqrt()
    mean_part = (tokens.mean(0) - norm.norm.running_mean) / s
    std_part = (tokens.std(0) - s) / s
    return float(mean_part.square().mean().sqrt()), float(std_part.square().mean().sqrt())


def _with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in training mode (batch statistics); the original is untouched."""
    return copy.deepcopy(model).train()


def _with_running_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode (running statistics), or a copy if it is in training mode."""
    return copy.deepcopy(model).eval() if model.training else model


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[Batch], batch_statistics: bool = False) -> float:
    """The fraction of real tokens classified correctly, over ``batches``.

    Args:
        model: a trained :class:`TinyTransformer`.
        batches: the evaluation batches, each normalized as one batch.
        batch_statistics: normalize with each batch's own statistics (as in training) instead of
            the running averages (eval mode). The model itself is left as it is.
    """
    net = _with_batch_statistics(model) if batch_statistics else _with_running_statistics(model)
    right = total = 0
    for b in batches:
        pred = net(b.tokens, b.padding_mask).argmax(-1)
        real = ~b.padding_mask
        right += int((pred[real] == b.labels[real]).sum())
        total += int(real.sum())
    return right / total


@torch.no_grad()
def padding_sweep(model: TinyTransformer, batch: Batch, fractions: list[float]) -> dict[str, list]:
    """The same sequences with more and more all-padding rows: padding fraction, statistics, accuracy.

    Padding is added as whole sequences of padding (:func:`pad_rows`), so the padded length and
    the positions stay those of the batch: no position embedding outside the trained range enters.

    For the first norm layer's input, ``stat_shift`` is the root-mean-square over channels of the
    difference between the mean taken over *all* positions (what naive batch norm uses) and the
    mean over the real tokens, in units of the real tokens' standard deviation; ``std_ratio`` is
    the average over channels of the all-position standard deviation over the real tokens' one.
    ``accuracy`` is the accuracy with batch statistics, and ``normalized`` the first norm layer's
    output at the real tokens (``(m, C)`` per length).

    Args:
        model: a trained :class:`TinyTransformer`.
        batch: padded sequences.
        fractions: the padding fractions to reach (each rounded up to whole rows; one at or
            below the batch's own fraction adds no row).
    """
    net = _with_batch_statistics(model)
    out: dict[str, list] = {
        "padding_fraction": [], "rows": [], "stat_shift": [], "std_ratio": [], "accuracy": [],
        "normalized": [],
    }
    for fraction in fractions:
        rows = rows_for_padding(batch, fraction)
        b = pad_rows(batch, rows)
        out["rows"].append(rows)
        x = net.embed(b.tokens) + net.position[: b.tokens.shape[1]]
        every, real = x.reshape(-1, x.shape[-1]), real_tokens(x, b.padding_mask)
        sd = real.std(0, unbiased=False)
        out["padding_fraction"].append(b.padding_fraction)
        out["stat_shift"].append(float(((every.mean(0) - real.mean(0)) / sd).square().mean().sqrt()))
        out["std_ratio"].append(float((every.std(0, unbiased=False) / sd).mean()))
        out["accuracy"].append(accuracy(net, [b], batch_statistics=True))
        out["normalized"].append(real_tokens(net.norms[0](x, b.padding_mask), b.padding_mask))
    return out


@torch.no_grad()
def batch_mate_change(model: TinyTransformer, batches: list[Batch], batch_statistics: bool = True) -> dict[str, float]:
    """How much the first sequence's logits change when the other sequences of its batch change.

    The first sequence of ``batches[0]`` is put in front of the other sequences of every batch
    (all batches padded to one length, so the padding of the first sequence is the same).

    Args:
        model: a trained :class:`TinyTransformer`.
        batches: at least two batches of the same size; the sequences after the first are the batch-mates.
        batch_statistics: normalize with batch statistics (training mode) or running averages.

    Returns:
        A dict with ``max_change``, the largest absolute change of a logit of the first
        sequence's real tokens, and ``flipped``, the fraction of its (token, batch) predictions
        that differ from those in ``batches[0]``.
    """
    if len(batches) < 2:
        raise ValueError("need at least two batches")
    net = _with_batch_statistics(model) if batch_statistics else _with_running_statistics(model)
    length = max(b.tokens.shape[1] for b in batches)
    first = pad_to(batches[0], length)
    real = ~first.padding_mask[0]
    reference = net(first.tokens, first.padding_mask)[0][real]
    changes, flips = [], []
    for b in batches[1:]:
        b = pad_to(b, length)
        tokens = torch.cat([first.tokens[:1], b.tokens[1:]])
        mask = torch.cat([first.padding_mask[:1], b.padding_mask[1:]])
        logits = net(tokens, mask)[0][real]
        changes.append(float((logits - reference).abs().max()))
        flips.append(float((logits.argmax(-1) != reference.argmax(-1)).float().mean()))
    return {"max_change": max(changes), "flipped": sum(flips) / len(flips)}


#: the shortest and longest length of each kind of test batch (training uses lengths 2 to 16)
BUCKETS = {"mixed": (2, 16), "short": (2, 5), "long": (13, 16)}


def evaluation_batches(lengths: tuple[int, int], count: int = 8, batch_size: int = 32, seed: int = 999) -> list[Batch]:
    """Fixed test batches (the same for every training seed), padded to their longest sequence.

    Args:
        lengths: the shortest and longest length.
        count: number of batches.
        batch_size: sequences per batch.
        seed: the seed of the test generator (distinct from every training seed's stream).
    """
    generator = torch.Generator().manual_seed(seed)
    return [duplicate_tokens(batch_size, lengths, 16, generator) for _ in range(count)]


#: the padding fractions of the chapter's sweep (0 means the probed batch as it is)
SWEEP_FRACTIONS = (0.0, 0.43, 0.49, 0.6, 0.7, 0.8, 0.9, 0.97)


def run_seed(seed: int, steps: int = 300, sweep_fractions: tuple[float, ...] = SWEEP_FRACTIONS) -> dict:
    """Train one model per normalization on ``seed`` and run every probe of the chapter.

    Args:
        seed: the training seed (initialization and batches).
        steps: training steps per model.
        sweep_fractions: the padding fractions of :func:`padding_sweep`, run on the mixed test
            batch with the least padding.

    Returns:
        A dict with one entry per kind in :data:`NORMS`, each a dict holding ``history``
        (:func:`train_transformer`);
        ``accuracy`` (running statistics) and ``accuracy_batch_stats``, each per bucket of
        :data:`BUCKETS`; ``sweep`` (:func:`padding_sweep`); ``mates`` and ``mates_eval``
        (:func:`batch_mate_change` with batch and with running statistics).
    """
    tests = {name: evaluation_batches(lengths) for name, lengths in BUCKETS.items()}
    probed = min(tests["mixed"], key=lambda b: b.padding_fraction)
    out = {}
    for kind in NORMS:
        model, history = train_transformer(kind, seed, steps=steps)
        r = {"history": history}
        r["accuracy"] = {k: accuracy(model, b) for k, b in tests.items()}
        r["accuracy_batch_stats"] = {k: accuracy(model, b, batch_statistics=True) for k, b in tests.items()}
        r["sweep"] = padding_sweep(model, probed, list(sweep_fractions))
        r["mates"] = batch_mate_change(model, tests["mixed"])
        r["mates_eval"] = batch_mate_change(model, tests["mixed"], batch_statistics=False)
        out[kind] = r
    return out
