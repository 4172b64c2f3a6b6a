"""Stage 2, score: how much each span of consecutive layers changes the hidden state, and which span to prune.

One pass over the calibration batches scores every (start s, length n) at once. Per batch, one jitted step runs the
forward without the LM head, normalises every hidden state h[0..L] over the model width, and reduces them to sums:

- `cosine` (LLM-Streamline): sum over real tokens of cos(h[s], h[s+n]) for every pair of layer boundaries, one Gram
  matrix over the layer axis (the attention mask zeroes padding);
- `angular` (Gromov et al.): sum over sequences of arccos(cos)/pi at each sequence's last real token;
- `block_influence` (ShortGPT): 1 - mean cos(h[i], h[i+1]), read off the cosine table.

Only these [L+1, L+1] sums cross from one batch to the next. h[L] is the last layer's output before the final norm.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .backend import jit_by_config
from .models import transformer
from .models.config import ModelConfig, Segment
from .models.model import Model, prepare_inputs, stack_hidden
from .pruning import REPLACEMENTS, prune_config

METRICS = ("cosine", "angular", "block_influence")


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@jit_by_config(static_argnames=("config",))
def score_sums(config: ModelConfig, params, input_ids, attention_mask):
    """One batch's sums: (cosine [L+1, L+1], real tokens, angular [L+1, L+1], sequences with a real token)."""
    hidden = transformer.apply(config, params, input_ids, attention_mask, collect_hidden=True,
                               return_logits=False)["hidden"]
    h = hidden.astype(jnp.float32)  # [L+1, B, T, D]
    hi = jax.lax.Precision.HIGHEST
    # each token's Gram matrix over the layer axis, then cosines from its diagonal: one read of the hidden states,
    # where normalising them first writes another [L+1, B, T, D] array (scripts/bench_score.py: a third less time)
    flat = h.reshape(h.shape[0], -1, h.shape[-1])  # [L+1, B*T, D]
    gram = jnp.einsum("ind,jnd->nij", flat, flat, precision=hi)
    inv_norm = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(gram, axis1=1, axis2=2), 1e-30))  # [B*T, L+1]
    mask = attention_mask.astype(jnp.float32).reshape(-1)
    cosine = jnp.einsum("nij,ni,nj,n->ij", gram, inv_norm, inv_norm, mask, precision=hi)
    # each sequence's last real token (left or right padding alike)
    t = attention_mask.shape[1]
    last = t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    real = jnp.any(attention_mask > 0, axis=1)
    last_h = jnp.take_along_axis(h, last[None, :, None, None], axis=2)[:, :, 0]  # [L+1, B, D]
    last_unit = last_h * jax.lax.rsqrt(jnp.maximum(jnp.sum(last_h * last_h, axis=-1, keepdims=True), 1e-30))
    cos_last = jnp.einsum("ibd,jbd->bij", last_unit, last_unit, precision=hi)
    angular = jnp.einsum("bij,b->ij", jnp.arccos(jnp.clip(cos_last, -1.0, 1.0)) / jnp.pi,
                         real.astype(jnp.float32), precision=hi)
    # counts in int32: exact past float32's 2**24 over a long calibration set
    return cosine, jnp.sum(attention_mask > 0, dtype=jnp.int32), angular, jnp.sum(real, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class SpanScores:
    """Scores of every span of consecutive layers, from one calibration pass.

    Tables are indexed [start, length] with shape [L, L+1]; entries with length 0 or start + length > L are NaN.
    `metric` says which table `to_numpy`, `str` and `choose_span` use; all are kept, since one pass gives them all.
    """

    metric: str
    cosine: np.ndarray  # mean cos(h[s], h[s+n]) over real tokens
    angular: np.ndarray  # mean arccos(cos)/pi over sequences, at the last real token
    num_tokens: int
    num_sequences: int
    config: ModelConfig | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")

    @classmethod
    def from_sums(cls, metric, cosine_sum, num_tokens, angular_sum, num_sequences, config=None) -> "SpanScores":
        if num_tokens <= 0:
            raise ValueError("no real (unmasked) tokens in the calibration batches")
        return cls(metric, _span_table(np.asarray(cosine_sum, np.float64) / num_tokens),
                   _span_table(np.asarray(angular_sum, np.float64) / num_sequences), int(num_tokens),
                   int(num_sequences), config)

    def with_metric(self, metric: str) -> "SpanScores":
        """The same scores, ranked and printed by another metric (no rescoring)."""
        return dataclasses.replace(self, metric=metric)

    @property
    def num_layers(self) -> int:
        return self.cosine.shape[0]

    @property
    def block_influence(self) -> np.ndarray:
        """ShortGPT's BI_i = 1 - mean cos(h[i], h[i+1]), one value per layer: [L]."""
        return 1.0 - self.cosine[:, 1]

    def table(self, metric: str | None = None) -> np.ndarray:
        metric = metric or self.metric
        if metric == "block_influence":
            return self.block_influence
        return {"cosine": self.cosine, "angular": self.angular}[metric]

    def to_numpy(self) -> np.ndarray:
        """The chosen metric: [L, L+1] indexed [start, length] (NaN where undefined), or [L] for block_influence."""
        return self.table().copy()

    @property
    def span_metric(self) -> str:
        """The table spans are ranked by: the metric itself, or cosine when the metric is per layer."""
        return "cosine" if self.metric == "block_influence" else self.metric

    def __getitem__(self, start_length) -> float:
        s, n = start_length
        return float(self.table(self.span_metric)[s, n])

    def best_start(self, length: int, protect_first: int = 0, protect_last: int = 0) -> int:
        """The most redundant start for spans of `length` layers (highest cosine, lowest angular distance)."""
        metric = self.span_metric
        values = self.table(metric)[:, length].copy()
        valid = np.zeros_like(values, bool)
        valid[protect_first:max(self.num_layers - protect_last - length + 1, protect_first)] = True
        valid &= ~np.isnan(values)
        if not valid.any():
            raise ValueError(f"no span of {length} layers fits in {self.num_layers} layers with the first "
                             f"{protect_first} and last {protect_last} protected")
        key = -values if metric == "cosine" else values
        return int(np.argmin(np.where(valid, key, np.inf)))

    def __str__(self) -> str:
        lines = [f"{self.metric} scores of {self.num_layers} layers over {self.num_tokens} tokens "
                 f"({self.num_sequences} sequences)"]
        if self.metric == "block_influence":
            bi = self.block_influence
            lines.append("layer  " + " ".join(f"{i:>6d}" for i in range(len(bi))))
            lines.append("BI     " + " ".join(f"{v:6.4f}" for v in bi))
            lines.append("lowest first: " + " ".join(str(i) for i in np.argsort(bi, kind="stable")))
            return "\n".join(lines)
        table = self.table()
        lines.append("rows: length n; columns: start s; '*' marks the best start of each length")
        lines.append("  n \\ s" + "".join(f"{s:>8d} " for s in range(self.num_layers)).rstrip())
        for n in range(1, self.num_layers + 1):
            best = self.best_start(n)
            cells = [(f"{table[s, n]:7.4f}" + ("*" if s == best else " ")) if s + n <= self.num_layers else ""
                     for s in range(self.num_layers - n + 1)]
            lines.append(f"{n:>7d} " + "".join(f"{c:<9s}" for c in cells).rstrip())
        return "\n".join(lines)


def _span_table(pair: np.ndarray) -> np.ndarray:
    """[L+1, L+1] values between boundaries i < j -> [L, L+1] table over (start=i, length=j-i)."""
    size = pair.shape[0] - 1
    table = np.full((size, size + 1), np.nan)
    for n in range(1, size + 1):
        s = np.arange(size - n + 1)
        table[s, n] = pair[s, s + n]
    return table


def _as_arrays(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    return batch, None


def score_spans(model: Model, batches: Iterable, metric: str = "cosine", *, progress: bool = False) -> SpanScores:
    """Score every span (start, length) of `model`'s layers over calibration `batches`.

    `batches`: dicts with `input_ids` [B, T] and optionally `attention_mask` [B, T] (as `data.batches` yields), or
    (ids, mask) pairs. Padding (mask 0) never counts.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("no calibration batches: the calibration set is empty")
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="scoring spans", unit="batch", initial=1)
    sums = None
    for batch in itertools.chain([first], it):
        ids, mask = prepare_inputs(model, *_as_arrays(batch))
        out = score_sums(model.config, model.params, ids, mask)
        # sums stay on device; waiting for the previous batch keeps one step in flight and the progress bar honest
        jax.block_until_ready(sums)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    cosine, tokens, angular, sequences = (np.asarray(x, np.float64) for x in sums)
    return SpanScores.from_sums(metric, cosine, float(tokens), angular, float(sequences), model.config)


# ----------------------------------------------------------------------------------------------------------------
# Parameter arithmetic


def _size(tree) -> int:
    return transformer.count_params(tree)


def layer_param_counts(config: ModelConfig) -> list[int]:
    """Parameters of each current layer (a replacement block counts as one layer), from abstract shapes."""
    segments = transformer.abstract_params(config)["segments"]
    counts = []
    for i, seg in enumerate(config.layout):
        total = _size(segments[transformer.segment_key(i)])
        counts += [total // seg.num_layers] * seg.num_layers
    return counts


def replacement_param_count(config: ModelConfig, replacement: str, mlp_width: int | None = None) -> int:
    """Parameters of one replacement block, from the abstract shapes of a one-block model (no weights)."""
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r}; expected one of {REPLACEMENTS}")
    if replacement == "none":
        return 0
    segment = Segment(replacement, width=(mlp_width or config.intermediate_size) if replacement == "mlp" else None)
    one = config.one_block(segment)
    return _size(transformer.abstract_params(one)["segments"][transformer.segment_key(0)])


@dataclasses.dataclass(frozen=True)
class SpanChoice:
    """The span to prune, and exactly how many parameters pruning it removes net of its replacement."""

    start: int
    length: int
    replacement: str
    score: float | None
    params_removed: int  # removed layers minus the replacement's own parameters
    params_total: int  # of the model before pruning

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def sparsity(self) -> float:
        return self.params_removed / self.params_total

    def __str__(self):
        score = "" if self.score is None else f", score {self.score:.4f}"
        return (f"layers [{self.start}, {self.end}) -> {self.replacement}{score}: {self.params_removed:,} of "
                f"{self.params_total:,} parameters removed net ({self.sparsity:.4%})")


def _net_removed(counts, start, length, block) -> int:
    return sum(counts[start:start + length]) - block


def _check_sparsity(sparsity):
    if not (isinstance(sparsity, (int, float)) and 0 < sparsity < 1):
        raise ValueError(f"sparsity must lie strictly between 0 and 1, got {sparsity!r}")


def _check_protect(depth, protect_first, protect_last):
    if protect_first < 0 or protect_last < 0:
        raise ValueError(f"protect_first/protect_last must be non-negative, got {protect_first}/{protect_last}")
    if protect_first + protect_last >= depth:
        raise ValueError(f"protecting the first {protect_first} and last {protect_last} layers leaves none of the "
                         f"{depth} layers to prune")


def spans_for_sparsity(config: ModelConfig, sparsity: float, replacement: str = "layer",
                       mlp_width: int | None = None, protect_first: int = 0, protect_last: int = 0):
    """The smallest length n whose spans reach `sparsity`, and the starts that reach it: (n, [starts]).

    Needs only the config, so a sparsity that cannot be reached is an error before any scoring.
    """
    _check_sparsity(sparsity)
    depth = config.depth
    _check_protect(depth, protect_first, protect_last)
    counts = layer_param_counts(config)
    total = _size(transformer.abstract_params(config))
    block = replacement_param_count(config, replacement, mlp_width)
    lo, hi = protect_first, depth - protect_last
    most = 0
    for n in range(1, min(hi - lo, depth - 1 if replacement == "none" else depth) + 1):
        net = {s: _net_removed(counts, s, n, block) for s in range(lo, hi - n + 1)}
        most = max(most, *net.values())
        starts = [s for s, removed in net.items() if removed >= sparsity * total]
        if starts:
            return n, starts
    raise ValueError(f"sparsity {sparsity} cannot be reached with replacement={replacement!r}: pruning every "
                     f"prunable layer ({hi - lo} of {depth}) removes at most {most / total:.4%} of the "
                     f"{total:,} parameters (embeddings and head stay)")


def choose_span(scores: SpanScores, length: int | None = None, sparsity: float | None = None,
                replacement: str = "layer", protect_first: int = 0, protect_last: int = 0,
                mlp_width: int | None = None, config: ModelConfig | None = None) -> SpanChoice:
    """The most redundant span of `length` layers, or of the smallest length reaching `sparsity`.

    `sparsity` is the net fraction of the model's parameters removed once the replacement's own parameters are
    counted back in. `protect_first`/`protect_last` keep the first/last k layers out of every candidate span.
    The achieved fraction is exact, counted on the abstract parameters of the pruned config.
    """
    config = config or scores.config
    if config is None:
        raise ValueError("choose_span needs the model config (scores from score_spans carry it)")
    if config.depth != scores.num_layers:
        raise ValueError(f"scores are for {scores.num_layers} layers but the config has {config.depth}")
    length, starts = candidate_starts(config, length, sparsity, replacement, protect_first, protect_last, mlp_width)
    if sparsity is None:
        starts = None
    metric = scores.span_metric
    table = scores.table(metric)[:, length]
    if starts is None:
        start = scores.best_start(length, protect_first, protect_last)
    else:  # among the spans of that length that reach the sparsity (all of them when the layers are alike)
        key = -table[starts] if metric == "cosine" else table[starts]
        start = starts[int(np.argmin(key))]
    return span_choice(config, start, length, replacement, mlp_width, float(table[start]))


def candidate_starts(config: ModelConfig, length: int | None, sparsity: float | None, replacement: str = "layer",
                     protect_first: int = 0, protect_last: int = 0, mlp_width: int | None = None):
    """(length, [starts]): every start a span of `length` layers may take between the protected layers, or the
    smallest length reaching `sparsity` and the starts that reach it."""
    if (length is None) == (sparsity is None):
        raise ValueError("give exactly one of length or sparsity")
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r}; expected one of {REPLACEMENTS}")
    depth = config.depth
    _check_protect(depth, protect_first, protect_last)
    if sparsity is not None:
        return spans_for_sparsity(config, sparsity, replacement, mlp_width, protect_first, protect_last)
    if length < 1 or length > depth - protect_first - protect_last:
        raise ValueError(f"span length {length} does not fit: the model has {depth} layers"
                         + (f", {protect_first} first and {protect_last} last protected"
                            if protect_first or protect_last else ""))
    if replacement == "none" and length == depth:
        raise ValueError("pruning every layer with replacement='none' leaves no layers")
    return length, list(range(protect_first, depth - protect_last - length + 1))


def span_choice(config: ModelConfig, start: int, length: int, replacement: str, mlp_width: int | None,
                score: float | None) -> SpanChoice:
    """The SpanChoice of layers [start, start+length), its parameters counted on the pruned config's shapes."""
    total = _size(transformer.abstract_params(config))
    pruned = prune_config(config, start, length, replacement, mlp_width)
    removed = total - _size(transformer.abstract_params(pruned))
    return SpanChoice(start, length, replacement, score, removed, total)


def _even_lengths(total: int, count: int) -> list[int]:
    """`total` layers in `count` spans as even as possible, longer ones first."""
    return [total // count + (i < total % count) for i in range(count)]


def _place_spans(scores: SpanScores, lengths: list[int], lo: int, hi: int) -> list[tuple[int, int]] | None:
    """Spans of `lengths`, each the best-scoring start that neither overlaps nor touches those placed before
    (touching spans would be one longer span); None where one does not fit."""
    metric = scores.span_metric
    taken: list[tuple[int, int]] = []
    for n in lengths:
        table = scores.table(metric)[:, n]
        free = [s for s in range(lo, hi - n + 1) if all(s + n < a or a + m < s for a, m in taken)]
        if not free:
            return None
        taken.append((max(free, key=lambda s: table[s]) if metric == "cosine" else
                      min(free, key=lambda s: table[s]), n))
    return taken


def choose_spans(scores: SpanScores, count: int, length: int | None = None, sparsity: float | None = None,
                 replacement: str = "layer", protect_first: int = 0, protect_last: int = 0,
                 mlp_width: int | None = None, config: ModelConfig | None = None) -> list[SpanChoice]:
    """`count` disjoint, non-adjacent spans, each replaced by its own block, sorted by start.

    `length` layers in all (split as evenly as possible), or the smallest total whose spans reach `sparsity` net of
    the blocks. Spans are placed best first on the dense model's scores, which are not re-scored after each cut:
    a span's score is the similarity of the dense hidden states around it, and removing a distant span changes
    what flows into it only through the layers between. `count=1` is `choose_span`.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of spans must be a positive integer, got {count!r}")
    if count == 1:
        return [choose_span(scores, length, sparsity, replacement, protect_first, protect_last, mlp_width, config)]
    config = config or scores.config
    if (length is None) == (sparsity is None):
        raise ValueError("give exactly one of length or sparsity")
    if sparsity is not None:
        _check_sparsity(sparsity)
    _check_protect(config.depth, protect_first, protect_last)
    lo, hi = protect_first, config.depth - protect_last
    total = _size(transformer.abstract_params(config))
    counts = layer_param_counts(config)
    block = replacement_param_count(config, replacement, mlp_width)
    for n in ([length] if length is not None else range(count, hi - lo + 1)):
        placed = _place_spans(scores, _even_lengths(n, count), lo, hi) if n >= count else None
        if placed is None:
            if length is not None:
                raise ValueError(f"{count} spans of {length} layers in all do not fit apart from each other in the "
                                 f"{hi - lo} prunable layers")
            continue
        pruned = config
        for start, m in sorted(placed, reverse=True):  # later spans first: earlier starts stay valid
            pruned = prune_config(pruned, start, m, replacement, mlp_width)
        if length is not None or total - _size(transformer.abstract_params(pruned)) >= sparsity * total:
            table = scores.table(scores.span_metric)
            return [SpanChoice(s, m, replacement, float(table[s, m]), _net_removed(counts, s, m, block), total)
                    for s, m in sorted(placed)]
    raise ValueError(f"sparsity {sparsity} cannot be reached with {count} spans of replacement={replacement!r}")


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """ShortGPT's baseline: individual layers with the lowest block influence, removed without replacement."""

    layers: tuple[int, ...]
    block_influence: tuple[float, ...]
    params_removed: int
    params_total: int

    @property
    def sparsity(self) -> float:
        return self.params_removed / self.params_total

    def __str__(self):
        return (f"layers {list(self.layers)} (lowest block influence): {self.params_removed:,} of "
                f"{self.params_total:,} parameters removed ({self.sparsity:.4%})")


def choose_layers(scores: SpanScores, count: int | None = None, sparsity: float | None = None,
                  protect_first: int = 0, protect_last: int = 0, config: ModelConfig | None = None) -> LayerChoice:
    """ShortGPT: the `count` layers with the lowest block influence, contiguous or not (or the fewest reaching
    `sparsity`, lowest influence first). Remove them with `prune.prune_layers`."""
    config = config or scores.config
    if (count is None) == (sparsity is None):
        raise ValueError("give exactly one of count or sparsity")
    if config is None:
        raise ValueError("choose_layers needs the model config (scores from score_spans carry it)")
    depth = config.depth
    _check_protect(depth, protect_first, protect_last)
    allowed = np.arange(protect_first, depth - protect_last)
    bi = scores.block_influence
    order = allowed[np.argsort(bi[allowed], kind="stable")]
    counts = layer_param_counts(config)
    total = _size(transformer.abstract_params(config))
    limit = min(len(order), depth - 1)  # at least one layer must stay
    if sparsity is not None:
        _check_sparsity(sparsity)
        removed = np.cumsum([counts[i] for i in order[:limit]])
        reached = np.nonzero(removed >= sparsity * total)[0]
        if not len(reached):
            raise ValueError(f"sparsity {sparsity} cannot be reached by removing layers: at most "
                             f"{removed[-1] / total:.4%} of {total:,} parameters")
        count = int(reached[0]) + 1
    if count < 1 or count > limit:
        raise ValueError(f"cannot remove {count} layers: {limit} of the {depth} layers may be removed")
    layers = tuple(sorted(int(i) for i in order[:count]))
    return LayerChoice(layers, tuple(float(bi[i]) for i in layers), sum(counts[i] for i in layers), total)


# ----------------------------------------------------------------------------------------------------------------
# Span choice by what the model loses (SLEB, BlockPruner), and the drop-the-last-layers baseline

LOSS_METRICS = ("perplexity", "last", "heal")  # heal: the top cosine spans healed a little (span_heal.py)
SPAN_METRICS = METRICS + LOSS_METRICS  # what the pipeline's score.metric may name


@jit_by_config(static_argnames=("config",))
def suffix_nll(config: ModelConfig, params, x, input_ids, attention_mask, first):
    """(summed next-token NLL over real tokens, their count) of the dense model run on from hidden state x [B, T, D]
    entering layer `first`: layers first..L-1, then the head. `first` is traced, so one compile serves every span."""
    stack = params["segments"][transformer.segment_key(0)]
    attn, positions = transformer.causal_masks(config, attention_mask)
    one = Segment("layers", 1)

    def layer(i, h):
        params_i = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), stack)
        return transformer.run_segment(config, one, params_i, h, attn, positions)[0]

    x = jax.lax.fori_loop(first, config.depth, layer, x)
    nll, real = transformer.next_token_nll(transformer.head(config, params, x), input_ids, attention_mask)
    return jnp.sum(jnp.where(real, nll, 0.0)), jnp.sum(real, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class SpanCosts:
    """Mean next-token loss over the real calibration tokens of the model with each candidate span removed."""

    length: int
    losses: dict  # start -> mean NLL (nats per token)
    dense_loss: float
    num_tokens: int

    def best_start(self) -> int:
        return min(self.losses, key=lambda s: (self.losses[s], s))

    def to_dict(self) -> dict:
        return {"length": self.length, "dense_loss": self.dense_loss, "num_tokens": self.num_tokens,
                "losses": {str(s): v for s, v in self.losses.items()}}

    def __str__(self) -> str:
        best = self.best_start()
        lines = [f"calibration loss with layers [s, s+{self.length}) removed, over {self.num_tokens} tokens "
                 f"(dense: {self.dense_loss:.4f}, perplexity {math.exp(self.dense_loss):.2f}); '*' the lowest",
                 "  start     loss  perplexity"]
        lines += [f"{s:>7d} {v:8.4f} {math.exp(min(v, 700)):11.2f}" + (" *" if s == best else "")
                  for s, v in sorted(self.losses.items())]
        return "\n".join(lines)


def span_losses(model: Model, batches: Iterable, length: int, starts: Iterable[int], *,
                progress: bool = False) -> SpanCosts:
    """The calibration loss of `model` (dense) without layers [s, s+length), for every s in `starts`.

    Per batch, one forward gives every layer's input h[s] (the prefix all spans share); then each candidate runs only
    the layers after its span, from h[s], and the head (`suffix_nll`, compiled once for every start).
    """
    if not model.config.is_dense:
        raise ValueError("span_losses removes spans from a dense model; this one is already pruned")
    starts = sorted(set(int(s) for s in starts))
    if not starts or starts[0] < 0 or starts[-1] + length > model.config.depth or length < 1:
        raise ValueError(f"spans of {length} layers at starts {starts} do not fit in {model.config.depth} layers")
    it = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="span losses", unit="batch")
    total, count = np.zeros(len(starts) + 1), 0
    for batch in it:
        ids, mask = prepare_inputs(model, *_as_arrays(batch))
        hidden = stack_hidden(model.config, model.params, ids, mask)
        out = [suffix_nll(model.config, model.params, hidden[0], ids, mask, 0)]  # the dense model itself
        out += [suffix_nll(model.config, model.params, hidden[s], ids, mask, s + length) for s in starts]
        total += np.asarray(jnp.stack([o[0] for o in out]), np.float64)
        count += int(out[0][1])
    if count == 0:
        raise ValueError("no calibration batches, or no real next-token pairs in them")
    losses = total / count
    return SpanCosts(length, {s: float(v) for s, v in zip(starts, losses[1:])}, float(losses[0]), count)


def choose_span_by_loss(model: Model, batches: Iterable, length: int | None = None, sparsity: float | None = None,
                        replacement: str = "layer", protect_first: int = 0, protect_last: int = 0,
                        mlp_width: int | None = None, progress: bool = False) -> tuple[SpanChoice, SpanCosts]:
    """The span whose removal costs the least calibration loss (`score.metric=perplexity`), among the spans of
    `length` layers or those of the smallest length reaching `sparsity`; and every candidate's cost."""
    if model.config.layer_types:  # suffix_nll walks the stack with a traced index; the types need a static one
        raise ValueError(f"score.metric=perplexity does not handle models with per-layer attention types "
                         f"({model.config.model_type}) yet; use score.metric=cosine")
    length, starts = candidate_starts(model.config, length, sparsity, replacement, protect_first, protect_last,
                                      mlp_width)
    costs = span_losses(model, batches, length, starts, progress=progress)
    start = costs.best_start()
    return span_choice(model.config, start, length, replacement, mlp_width, costs.losses[start]), costs


def choose_last_span(config: ModelConfig, length: int | None = None, sparsity: float | None = None,
                     replacement: str = "layer", protect_first: int = 0, protect_last: int = 0,
                     mlp_width: int | None = None) -> SpanChoice:
    """The depth-pruning papers' baseline (`score.metric=last`): the last layers before the final norm (the last
    unprotected ones when protect_last > 0)."""
    length, starts = candidate_starts(config, length, sparsity, replacement, protect_first, protect_last, mlp_width)
    return span_choice(config, max(starts), length, replacement, mlp_width, None)
