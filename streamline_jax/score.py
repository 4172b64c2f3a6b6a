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
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .backend import jit_by_config
from .models import transformer
from .models.config import ModelConfig, Segment
from .models.model import Model, _prepare
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
    unit = h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, axis=-1, keepdims=True), 1e-30))
    mask = attention_mask.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    cosine = jnp.einsum("ibtd,jbtd->ij", unit * mask[None, :, :, None], unit, precision=hi)
    # each sequence's last real token (left or right padding alike)
    t = attention_mask.shape[1]
    last = t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    real = jnp.any(attention_mask > 0, axis=1)
    last_unit = jnp.take_along_axis(unit, last[None, :, None, None], axis=2)[:, :, 0]  # [L+1, B, D]
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
        ids, mask = _prepare(model, *_as_arrays(batch))
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
        total = _size(segments[f"seg_{i}"])
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
    return _size(transformer.abstract_params(one)["segments"]["seg_0"])


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
    if (length is None) == (sparsity is None):
        raise ValueError("give exactly one of length or sparsity")
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r}; expected one of {REPLACEMENTS}")
    if config is None:
        raise ValueError("choose_span needs the model config (scores from score_spans carry it)")
    if config.depth != scores.num_layers:
        raise ValueError(f"scores are for {scores.num_layers} layers but the config has {config.depth}")
    depth = config.depth
    _check_protect(depth, protect_first, protect_last)
    if sparsity is not None:
        length, starts = spans_for_sparsity(config, sparsity, replacement, mlp_width, protect_first, protect_last)
    else:
        if length < 1 or length > depth - protect_first - protect_last:
            raise ValueError(f"span length {length} does not fit: the model has {depth} layers"
                             + (f", {protect_first} first and {protect_last} last protected"
                                if protect_first or protect_last else ""))
        if replacement == "none" and length == depth:
            raise ValueError("pruning every layer with replacement='none' leaves no layers")
        starts = None
    metric = scores.span_metric
    table = scores.table(metric)[:, length]
    if starts is None:
        start = scores.best_start(length, protect_first, protect_last)
    else:  # among the spans of that length that reach the sparsity (all of them when the layers are alike)
        key = -table[starts] if metric == "cosine" else table[starts]
        start = starts[int(np.argmin(key))]
    total = _size(transformer.abstract_params(config))
    pruned = prune_config(config, start, length, replacement, mlp_width)
    removed = total - _size(transformer.abstract_params(pruned))
    return SpanChoice(start, length, replacement, float(table[start]), removed, total)


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
