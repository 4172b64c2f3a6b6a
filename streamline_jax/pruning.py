"""Stage 3, prune: cut a span of consecutive layers out of the parameter tree and put one replacement block there.

Pure surgery on (config, params) -> (config, params). Span indices are layers of the *current* model (a replacement
block counts as one layer); the config records each span in original layer numbers (`pruned_spans`), so spans can
be pruned one after another. The layout after is stack(before), block, stack(after), empty stacks omitted and
neighbouring stacks merged, and the usual `transformer.apply` runs it.

Replacements: `layer` (a decoder layer initialised from layer `start`), `ffn` (layer `start`'s feed-forward
sub-block with its pre-norm and residual), `mlp` (x + fc2(relu(fc1(x))), fresh, fc2 zero so it starts as the
identity), `linear` (x + x W, one [D, D] map, W zero so it starts as the identity; `linear_fit.fit_linear` fits it
in closed form, no training), `none` (nothing).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import linen as nn

from .models import transformer
from .models.config import ModelConfig, Segment
from .models.model import Model

REPLACEMENTS = ("layer", "ffn", "mlp", "linear", "none")


def _check_span(config: ModelConfig, start: int, length: int, replacement: str, mlp_width):
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r}; expected one of {REPLACEMENTS}")
    if not all(isinstance(v, numbers.Integral) for v in (start, length)) or start < 0 or length < 1:
        raise ValueError(f"a span needs start >= 0 and length >= 1, got start={start!r}, length={length!r}")
    if start + length > config.depth:
        raise ValueError(f"span [{start}, {start + length}) runs past the last layer: the model has {config.depth} "
                         f"layers (0..{config.depth - 1})")
    if replacement == "none" and length == config.depth:
        raise ValueError("pruning every layer with replacement='none' leaves no layers")
    if mlp_width is not None and (replacement != "mlp" or mlp_width < 1):
        raise ValueError(f"mlp_width={mlp_width!r} needs replacement='mlp' and a positive width")


def original_ranges(config: ModelConfig) -> list[tuple[int, int]]:
    """The original layers [lo, hi) each current layer stands for (a replacement block: its whole span)."""
    spans = {s: (n, kind) for s, n, kind in config.pruned_spans}
    ranges, orig = [], 0
    while len(ranges) < config.depth:
        while orig in spans and spans[orig][1] == "none":
            orig += spans[orig][0]
        n = spans[orig][0] if orig in spans else 1
        ranges.append((orig, orig + n))
        orig += n
    return ranges


def _replacement_segment(config: ModelConfig, replacement: str, mlp_width) -> Segment | None:
    if replacement == "none":
        return None
    if replacement == "mlp":
        return Segment("mlp", width=mlp_width or config.intermediate_size)
    return Segment(replacement)


def _part(seg: Segment, seg_params, lo: int, hi: int):
    """(segment, params) of layers [lo, hi) of a segment (a block: itself); params None where seg_params is."""
    if seg.kind != "layers" or (lo, hi) == (0, seg.num_layers):
        return seg, seg_params
    return Segment("layers", hi - lo), None if seg_params is None else transformer.slice_layers(seg_params, lo, hi)


def _pruned_pieces(config: ModelConfig, start: int, end: int, block: Segment | None, params=None,
                   block_params=None) -> list[tuple[Segment, object]]:
    """The stack without layers [start, end), with `block` (and its params) in their place, as (segment, params)
    pieces: stack(before), block, stack(after), empty stacks omitted and neighbouring stacks merged. Params are None
    where `params` is None (the layout alone)."""
    before, after, layer = [], [], 0
    for i, seg in enumerate(config.layout):
        seg_params = None if params is None else params["segments"][transformer.segment_key(i)]
        first, last = layer, layer + seg.num_layers
        if first < start:
            before.append(_part(seg, seg_params, 0, min(last, start) - first))
        if last > end:
            after.append(_part(seg, seg_params, max(first, end) - first, seg.num_layers))
        layer = last
    merged: list = []
    for seg, p in before + ([(block, block_params)] if block else []) + after:
        if merged and seg.kind == "layers" and merged[-1][0].kind == "layers":
            prev_seg, prev = merged[-1]
            joined = None if p is None else jax.tree.map(lambda x, y: jnp.concatenate([x, y]), prev, p)
            merged[-1] = (Segment("layers", prev_seg.num_layers + seg.num_layers), joined)
        else:
            merged.append((seg, p))
    return merged


def prune_config(config: ModelConfig, start: int, length: int, replacement: str = "layer",
                 mlp_width: int | None = None) -> ModelConfig:
    """The config after pruning layers [start, start+length) of `config` and inserting `replacement`."""
    _check_span(config, start, length, replacement, mlp_width)
    start, length = int(start), int(length)
    end = start + length
    block = _replacement_segment(config, replacement, mlp_width)
    layout = tuple(seg for seg, _ in _pruned_pieces(config, start, end, block))
    ranges = original_ranges(config)
    lo, hi = ranges[start][0], ranges[end - 1][1]
    spans = [s for s in config.pruned_spans if not (lo <= s[0] and s[0] + s[1] <= hi)]
    spans = tuple(sorted(spans + [(lo, hi - lo, replacement)]))
    return config.replace(layout=layout, num_layers=sum(s.num_layers for s in layout), pruned_spans=spans,
                          layer_types=config.pruned_layer_types(start, end, block is not None))


def _block_params(config: ModelConfig, params, start: int, segment: Segment, rng):
    """Initial parameters of the replacement block, taken from layer `start` (or fresh for `mlp` and `linear`)."""
    if segment.kind in ("mlp", "linear"):
        module = transformer.block_module(config, segment)
        x = jnp.zeros((1, 1, config.hidden_size), jnp.float32)
        return nn.meta.unbox(module.init(rng, x)["params"])
    seg, source, first = transformer.segment_at(config, params, start)
    if seg.kind not in ("layers", "layer", segment.kind):
        raise ValueError(f"cannot initialise a {segment.kind!r} block from layer {start}, which is a {seg.kind!r} "
                         f"block")
    if segment.kind != "layer":  # ffn: the sub-block's own names (post_attention_layernorm + mlp, or fc1/fc2's)
        one = config.one_block(segment, start)
        source = {k: source[k] for k in transformer.abstract_params(one)["segments"][transformer.segment_key(0)]}
    # layer `start` copied one leaf at a time, each copy waited for: a 7B's layer is 0.4 GiB, and copies queued ahead
    # by asynchronous dispatch (or made in several steps: a slice, then a copy) would each hold another
    if seg.kind == "layers":
        return jax.tree.map(lambda a: jax.block_until_ready(a[start - first]), source)
    return jax.tree.map(lambda a: jax.block_until_ready(jnp.copy(a)), source)


def prune_params(config: ModelConfig, params, start: int, length: int, replacement: str = "layer",
                 mlp_width: int | None = None, rng=None):
    """Remove layers [start, start+length) of the current model and insert `replacement`: (config, params).

    A pure function: the input tree is not modified, and untouched layers keep their values exactly.
    """
    new_config = prune_config(config, start, length, replacement, mlp_width)
    start, length = int(start), int(length)
    end = start + length
    segment = _replacement_segment(config, replacement, mlp_width)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    block_params = _block_params(config, params, start, segment, rng) if segment else None
    merged = _pruned_pieces(config, start, end, segment, params, block_params)
    new_params = {k: v for k, v in params.items() if k != "segments"}
    new_params["segments"] = {transformer.segment_key(i): p for i, (_, p) in enumerate(merged)}
    _check_shapes(new_config, new_params)
    return new_config, new_params


def _check_shapes(config: ModelConfig, params):
    expected = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), transformer.abstract_params(config))
    got = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise AssertionError("pruned parameters do not match the pruned config's shapes")


def prune(model: Model, start: int, length: int, replacement: str = "layer", mlp_width: int | None = None,
          rng=None) -> Model:
    """A new Model without layers [start, start+length) and with `replacement` in their place."""
    config, params = prune_params(model.config, model.params, start, length, replacement, mlp_width, rng)
    out = model.replace(config=config, params=params, mesh=None)
    if model.mesh is not None:
        from .loading import place_on_mesh

        out = place_on_mesh(out, model.mesh)
    return out


def split_stack(model: Model, cuts) -> Model:
    """The same dense model with its stack of layers as consecutive `layers` segments cut at `cuts`, so that a model
    pruned at those cuts holds the kept segments' own arrays instead of copies (`prune` keeps whole segments as they
    are). Each stacked array is split one device shard at a time and that shard freed at once: host memory grows by
    a shard, not by a model, and `model`'s arrays are deleted (use the model returned)."""
    config = model.config
    if not config.is_dense:
        raise ValueError("split_stack splits a dense model's stack of layers")
    bounds = sorted({0, config.depth} | {int(c) for c in cuts if 0 < c < config.depth})
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if len(ranges) == len(config.layout):
        return model
    old = {(first, first + seg.num_layers): model.params["segments"][transformer.segment_key(i)]
           for i, (seg, first) in enumerate(zip(config.layout, transformer.layer_offsets(config)))}
    parts = [[] for _ in ranges]
    for (lo, hi), seg_params in old.items():
        inside = [k for k, (a, b) in enumerate(ranges) if lo <= a and b <= hi]
        pieces = jax.tree.map(lambda a: _split_leaf(a, [(ranges[k][0] - lo, ranges[k][1] - lo) for k in inside]),
                              seg_params)
        for j, k in enumerate(inside):
            parts[k] = jax.tree.map(lambda leaf: leaf[j], pieces, is_leaf=lambda x: isinstance(x, list))
    params = {**model.params, "segments": {transformer.segment_key(k): p for k, p in enumerate(parts)}}
    layout = tuple(Segment("layers", b - a) for a, b in ranges)
    return model.replace(config=config.replace(layout=layout), params=params)


def _split_leaf(a, ranges) -> list:
    """Stacked array `a` cut along its layer axis into `ranges`; `a` deleted. Each device's shard is cut and freed in
    turn where the layer axis is whole on every device; otherwise the whole array is cut, then freed."""
    if not isinstance(a, jax.Array) or not all(_whole_axis0(s.index) for s in a.addressable_shards):
        out = [a[lo:hi] for lo, hi in ranges]
        if isinstance(a, jax.Array):
            a.delete()
        return out
    per_range = [[] for _ in ranges]
    for shard in a.addressable_shards:
        data = shard.data
        for k, (lo, hi) in enumerate(ranges):
            per_range[k].append(data[lo:hi])
        jax.block_until_ready(per_range)
        data.delete()
    return [jax.make_array_from_single_device_arrays((hi - lo,) + a.shape[1:], a.sharding, arrays)
            for (lo, hi), arrays in zip(ranges, per_range)]


def _whole_axis0(index) -> bool:
    return not index or index[0] == slice(None)


def prune_layers(model: Model, layers) -> Model:
    """Remove individual layers (ShortGPT's baseline, e.g. `score.choose_layers(...).layers`) without replacement."""
    layers = sorted(set(int(i) for i in layers))
    if not layers:
        return model
    for i in layers:
        _check_span(model.config, i, 1, "none", None)
    if len(layers) == model.config.depth:
        raise ValueError("removing every layer leaves no layers")
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    for lo, hi in reversed(runs):  # from the top, so lower indices stay valid
        model = prune(model, lo, hi - lo, "none")
    return model
