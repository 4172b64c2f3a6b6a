"""The decoder stack shared by both families: embeddings, scanned layer segments, replacement blocks, LM head.

Parameters are a plain dict:

    embed_tokens/embedding [V, E]           (OPT also: embed_positions/embedding, project_in, project_out)
    segments/seg_<i>/...                    one entry per `config.layout` segment; `layers` segments are stacked
                                            with the layer axis leading
    final_norm/...                          (absent for OPT with do_layer_norm_before=False)
    lm_head/kernel [E, V]                   (absent when the head is tied to the embedding)

`apply` is a pure function of (config, params, inputs) that jit compiles with the config static.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from .config import ModelConfig, Segment
from .layers import (ACTIVATION_DTYPE, LinearBlock, MLPBlock, capped, dense, layer_norm, matmul_dtype, param_init,
                     product, rms_norm, within_window)
from .llama import LlamaDecoderLayer, LlamaFFNBlock
from .opt import OPTDecoderLayer, OPTFFNBlock
from . import vocab_slices

OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


def segment_key(i: int) -> str:
    """The key of layout segment `i`'s parameters (and cache) under params["segments"]."""
    return f"seg_{i}"


def segment_index(key: str) -> int:
    """The layout index of the segment whose key is `key` (`segment_key`'s inverse)."""
    return int(key.removeprefix("seg_"))


def param_dtype(config: ModelConfig):
    """The dtype the weights are stored in."""
    return jnp.dtype(config.dtype)


def compute_dtype(config: ModelConfig):
    """The dtype dot products take their inputs in (they accumulate in float32); also the KV cache's."""
    return matmul_dtype(config)


def decoder_layer(config: ModelConfig) -> nn.Module:
    cls = LlamaDecoderLayer if config.family == "llama" else OPTDecoderLayer
    return cls(config, param_dtype(config))


def block_module(config: ModelConfig, segment: Segment) -> nn.Module:
    if segment.kind in ("layers", "layer"):
        return decoder_layer(config)
    if segment.kind == "ffn":
        cls = LlamaFFNBlock if config.family == "llama" else OPTFFNBlock
        return cls(config, param_dtype(config))
    if segment.kind == "linear":
        return LinearBlock(config.hidden_size, param_dtype(config), compute_dtype(config))
    return MLPBlock(segment.width, config.hidden_size, param_dtype(config), compute_dtype(config))


class Embedder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions):
        c = self.config
        dtype = param_dtype(c)
        table = self.param("embed_tokens", param_init(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (c.vocab_size, c.embed_dim), dtype)
        x = jnp.take(table, input_ids, axis=0)
        if c.embed_scale:  # Gemma: sqrt(D) rounded to the weights' dtype, the product too
            x = x * jnp.asarray(math.sqrt(c.hidden_size), dtype)
        x = x.astype(ACTIVATION_DTYPE)
        if c.family == "llama":
            return x
        if c.has_projections:
            x = dense(c.hidden_size, ("embed_proj",), ("embed",), False, "project_in", dtype=dtype,
                      compute_dtype=compute_dtype(c))(x)
        pos_table = self.param("embed_positions", param_init(nn.initializers.normal(0.02), ("positions", "embed")),
                               (c.max_position_embeddings + OPT_POSITION_OFFSET, c.hidden_size), dtype)
        return x + jnp.take(pos_table, positions + OPT_POSITION_OFFSET, axis=0).astype(ACTIVATION_DTYPE)


class Head(nn.Module):
    config: ModelConfig
    with_logits: bool = True  # False: the vocabulary product's input (`head_features`)

    @nn.compact
    def __call__(self, x, embed_table):
        c = self.config
        dtype, compute = param_dtype(c), compute_dtype(c)
        if c.has_final_norm:
            norm = rms_norm(c, dtype, "final_norm") if c.family == "llama" else layer_norm(
                c.layer_norm_eps, dtype, "final_norm")
            x = norm(x)
        if c.has_projections:
            x = dense(c.embed_dim, ("embed",), ("embed_proj",), False, "project_out", dtype=dtype,
                      compute_dtype=compute)(x)
        x = x.astype(compute)
        if not self.with_logits:
            return x
        if c.tie_word_embeddings:
            matrix, spec = {"embed_tokens": embed_table}, "bte,ve->btv"
        else:
            matrix = {"lm_head": self.param("lm_head", param_init(nn.initializers.normal(0.02), ("embed", "vocab")),
                                            (c.embed_dim, c.vocab_size), dtype)}
            spec = "bte,ev->btv"
        if converts_head(c):  # no float32 copy of the whole matrix: a slice at a time
            b, t, e = x.shape
            return vocab_slices.full_logits(matrix, x.reshape(b * t, e), c.final_logit_softcap).reshape(b, t, -1)
        return capped(product(spec, x, next(iter(matrix.values())).astype(compute)), c.final_logit_softcap)


# ----------------------------------------------------------------------------------------------------------------
# Parameters: init, abstract shapes, logical axes


def _boxed_init(config: ModelConfig, rng):
    """Initialise every parameter, each boxed with its logical axis names."""
    b, t = 1, 4
    ids = jnp.zeros((b, t), jnp.int32)
    pos = jnp.zeros((b, t), jnp.int32)
    x = jnp.zeros((b, t, config.hidden_size), ACTIVATION_DTYPE)
    mask = jnp.ones((b, t, t), bool)
    rngs = jax.random.split(rng, len(config.layout) + 2)
    types = (None, None, jnp.asarray(False)) if config.layer_types else ()  # (no cache, index, a layer's type)
    emb = Embedder(config).init(rngs[0], ids, pos)["params"]
    params = dict(emb)
    head = Head(config).init(rngs[1], x, nn.meta.unbox(emb["embed_tokens"]))["params"]
    segments = {}
    for i, seg in enumerate(config.layout):
        module = block_module(config, seg)
        if seg.kind == "layers":
            keys = jax.random.split(rngs[i + 2], seg.num_layers)
            one = lambda k: module.init(k, x, mask, pos, *types)["params"]
            stacked = jax.vmap(one)(keys)
            segments[segment_key(i)] = jax.tree.map(_prepend_layers_axis, stacked,
                                                is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
        elif seg.kind == "layer":
            segments[segment_key(i)] = module.init(rngs[i + 2], x, mask, pos, *types)["params"]
        else:
            segments[segment_key(i)] = module.init(rngs[i + 2], x)["params"]
    params["segments"] = segments
    params.update(head)
    return params


def _prepend_layers_axis(boxed):
    if isinstance(boxed, nn.LogicallyPartitioned):
        return boxed.replace(names=("layers",) + tuple(boxed.names))
    return boxed


def _is_box(v):
    return isinstance(v, nn.LogicallyPartitioned)


def init_params(config: ModelConfig, rng=None):
    """Random parameters (plain arrays)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    boxed = jax.jit(functools.partial(_boxed_init, config))(rng)
    return nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=64)
def _abstract_boxed(config: ModelConfig):
    return jax.eval_shape(functools.partial(_boxed_init, config), jax.random.PRNGKey(0))


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs of every parameter: no memory, usable for full-size presets."""
    return nn.meta.unbox(_abstract_boxed(config))


def param_axes(config: ModelConfig):
    """The logical axis names of every parameter, as a tree of tuples shaped like the parameters."""
    return jax.tree.map(lambda b: tuple(b.names), _abstract_boxed(config), is_leaf=_is_box)


def count_params(tree) -> int:
    """Parameters in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(int(d) for d in x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------------
# Forward


def attention_mask_matrix(key_mask, query_slots, sliding_window=None, segment_ids=None, shared_prefix_ids=None,
                          positions=None):
    """[B, T, S] bool: query at slot q may see key slot k if k <= q, the key is real, (optionally) q - k < window,
    and (for packed rows, without a cache) the key belongs to the query's segment or to the shared prefix segment
    `shared_prefix_ids` names for the query (0: none). Packed rows measure the window in `positions`, since a
    shared prefix sits further from a later branch in slots than in positions."""
    key_slots = jnp.arange(key_mask.shape[1])
    q = query_slots[..., :, None]
    allowed = (key_slots[None, :] <= q) & key_mask[:, None, :].astype(bool)
    if sliding_window:
        packed = segment_ids is not None and positions is not None
        allowed &= (within_window(positions, positions, sliding_window) if packed
                    else within_window(query_slots, key_slots, sliding_window))
    if segment_ids is not None:
        seen = segment_ids[:, :, None] == segment_ids[:, None, :]
        if shared_prefix_ids is not None:
            seen |= (shared_prefix_ids[:, :, None] == segment_ids[:, None, :]) & (shared_prefix_ids[:, :, None] > 0)
        allowed &= seen
    return allowed


def segment_positions(segment_ids):
    """Each packed segment counts its positions from 0: slot minus the slot where its segment starts."""
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return slots - jax.lax.cummax(jnp.where(first, slots, 0), axis=1)


def default_positions(attention_mask):
    """Positions count real tokens only, so a left-padded sequence gets the positions it has unpadded."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_masks(config: ModelConfig, attention_mask):
    """(mask [B, T, T] bool, positions [B, T]) for rows of one sequence each without a cache: `input_masks`'
    common case, from the [B, T] attention mask alone."""
    t = attention_mask.shape[1]
    mask = attention_mask_matrix(attention_mask, jnp.arange(t)[None], config.sliding_window)
    return mask, default_positions(attention_mask)


EMBED_KEYS = ("embed_tokens", "embed_positions", "project_in")  # what `embed` reads
HEAD_KEYS = ("embed_tokens", "final_norm", "project_out", "lm_head")  # what `head` reads (tied: the embeddings)


def embed(config: ModelConfig, params, input_ids, positions):
    return Embedder(config).apply({"params": {k: params[k] for k in EMBED_KEYS if k in params}}, input_ids,
                                  positions)


def head(config: ModelConfig, params, x):
    own = {k: params[k] for k in HEAD_KEYS if k in params and k != "embed_tokens"}
    return Head(config).apply({"params": own}, x, params["embed_tokens"])


def converts_head(config: ModelConfig) -> bool:
    """Whether the head's products convert its weights to a wider dtype: then `head` (and the evaluation's scoring,
    from `head_features`) runs the vocabulary a slice at a time (`vocab_slices`)."""
    return vocab_slices.converts(param_dtype(config), compute_dtype(config))


def head_features(config: ModelConfig, params, x):
    """What `head` multiplies by the vocabulary matrix: x after the final norm (and OPT's projection), in the
    compute dtype (`vocab_slices` runs the product itself)."""
    own = {k: params[k] for k in HEAD_KEYS if k in params and k != "embed_tokens"}
    return Head(config, with_logits=False).apply({"params": own}, x, None)


def next_token_nll(logits, input_ids, attention_mask):
    """(NLL [B, T-1] float32 of each next token under `logits` [B, T, V], real [B, T-1] bool: both the token and the
    one it follows are real)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return nll, (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)


def chunk_tokens(chunk: int, *arrays):
    """Each [N, ...] array as [N / c, c, ...] with c = min(chunk, N) (the last chunk zero-padded): what the LM head
    runs over a chunk at a time, so that [tokens x vocab] logits are never made whole."""
    n = arrays[0].shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    return tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((-1, chunk) + a.shape[1:])
                 for a in arrays)


def layer_offsets(config: ModelConfig) -> list[int]:
    """The stack index of each layout segment's first layer."""
    offsets, n = [], 0
    for seg in config.layout:
        offsets.append(n)
        n += seg.num_layers
    return offsets


REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(name: str):
    """The `remat` argument of `apply`/`run_segment` for a policy name: `none` keeps every activation, `dots`
    keeps matmul outputs and recomputes the rest, `full` keeps each layer's input and recomputes the layer."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {REMAT_POLICIES}")
    return {"none": False, "full": True, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def run_segment(config, segment: Segment, seg_params, x, mask, positions, *, collect=False, cache=None,
                cache_index=None, remat=False, first_layer=None):
    """Run one segment. Returns (x, inputs [n, B, T, D] or None, cache). `remat` (see `remat_policy`): each layer
    under jax.checkpoint.

    `first_layer`: the stack index (in `config.layer_types`) of the segment's first layer; needed when the layers
    differ in attention type (Gemma), whose flags go into the scan beside each layer's parameters."""
    module = block_module(config, segment)
    local = None
    if config.layer_types and segment.kind in ("layers", "layer"):
        if first_layer is None:
            raise ValueError("a model with per-layer attention types (layer_types) runs a segment only with its "
                             "first_layer")
        local = jnp.asarray(config.layer_is_local(first_layer, segment.num_layers))
    if segment.kind == "layers":
        def body(h, layer):
            p, c, is_local = layer
            types = () if is_local is None else (is_local,)
            out, c = module.apply({"params": p}, h, mask, positions, c, cache_index, *types)
            return out, (h if collect else None, c)

        if remat:
            body = jax.checkpoint(body, policy=remat if callable(remat) else None)
        x_out, (inputs, cache) = jax.lax.scan(body, x, (seg_params, cache, local))
        return x_out, inputs, cache
    if segment.kind == "layer":
        types = () if local is None else (local[0],)

        def one(p, h):
            return module.apply({"params": p}, h, mask, positions, cache, cache_index, *types)
    else:
        def one(p, h):
            return module.apply({"params": p}, h), cache
    if remat:
        one = jax.checkpoint(one, policy=remat if callable(remat) else None)
    out, cache = one(seg_params, x)
    return out, (x[None] if collect else None), cache


def input_masks(config: ModelConfig, input_ids, attention_mask=None, positions=None, *, caches=None, cache_index=0,
                segment_ids=None, shared_prefix_ids=None):
    """(mask [B, T, S] bool, positions [B, T]): what each query may see and where each token is, from `apply`'s
    arguments (see there)."""
    b, t = input_ids.shape
    if segment_ids is not None:
        if caches is not None or attention_mask is not None:
            raise ValueError("segment_ids (packed rows) take neither an attention_mask nor caches")
        attention_mask = segment_ids > 0
        if positions is None:
            if shared_prefix_ids is not None:
                raise ValueError("shared_prefix_ids need explicit positions (a branch continues its prefix's)")
            positions = segment_positions(segment_ids)
    elif shared_prefix_ids is not None:
        raise ValueError("shared_prefix_ids go with segment_ids (packed rows)")
    if attention_mask is None:
        attention_mask = jnp.ones((b, t if caches is None else _cache_len(caches)), jnp.int32)
    query_slots = cache_index + jnp.arange(t)
    if positions is None:
        positions = jnp.take_along_axis(default_positions(attention_mask), jnp.broadcast_to(query_slots, (b, t)), 1)
    mask = attention_mask_matrix(attention_mask, query_slots[None], config.sliding_window, segment_ids,
                                 shared_prefix_ids, positions)
    return mask, positions


def apply(config: ModelConfig, params, input_ids, attention_mask=None, positions=None, *, collect_hidden=False,
          return_logits=True, caches=None, cache_index=0, remat=False, segment_ids=None, shared_prefix_ids=None):
    """The forward pass.

    input_ids: [B, T]. attention_mask: [B, S] over key slots (S = T without a cache, S = cache length with one).
    segment_ids: [B, T] for packed rows (several sequences per row, 0 = padding; replaces attention_mask): each
    token sees only earlier tokens of its own segment, and positions restart at 0 in each segment.
    shared_prefix_ids: [B, T] with segment_ids and explicit positions: the segment each token sees besides its own
    (0: none), a prefix that several sequences share (each branch's positions continue the prefix's).
    Returns a dict: `logits` [B, T, V] (float32), `hidden` [L+1, B, T, D] when collect_hidden (hidden[L] is the
    last layer's output *before* the final norm), `last_hidden` (same, [B, T, D]) and `caches`.
    """
    mask, positions = input_masks(config, input_ids, attention_mask, positions, caches=caches,
                                  cache_index=cache_index, segment_ids=segment_ids,
                                  shared_prefix_ids=shared_prefix_ids)
    x = embed(config, params, input_ids, positions)
    hidden, new_caches = [], {}
    for i, (seg, first) in enumerate(zip(config.layout, layer_offsets(config))):
        key = segment_key(i)
        cache = None if caches is None else caches.get(key)
        x, inputs, cache = run_segment(config, seg, params["segments"][key], x, mask, positions,
                                       collect=collect_hidden, cache=cache, cache_index=cache_index, remat=remat,
                                       first_layer=first)
        if inputs is not None:
            hidden.append(inputs)
        if cache is not None:
            new_caches[key] = cache
    out = {"last_hidden": x, "caches": new_caches if caches is not None else None}
    if collect_hidden:
        out["hidden"] = jnp.concatenate(hidden + [x[None]], axis=0)
    if return_logits:
        out["logits"] = head(config, params, x)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Models that share a beginning: a dense model and its pruned copies


def slice_layers(stacked, lo: int, hi: int):
    """Layers [lo, hi) of a stacked segment's parameters."""
    return jax.tree.map(lambda a: a[lo:hi], stacked)


def stack_pieces(config: ModelConfig, params, lo: int, hi: int) -> list[tuple[Segment, object, int]]:
    """(segment, its parameters, stack index of its first layer) for running stack layers [lo, hi) in order; a
    stacked segment that the range cuts is sliced."""
    pieces = []
    for i, (seg, first) in enumerate(zip(config.layout, layer_offsets(config))):
        a, b = max(lo, first), min(hi, first + seg.num_layers)
        if a >= b:
            continue
        seg_params = params["segments"][segment_key(i)]
        if seg.kind == "layers" and b - a < seg.num_layers:
            seg_params = slice_layers(seg_params, a - first, b - first)
            seg = dataclasses.replace(seg, num_layers=b - a)
        pieces.append((seg, seg_params, a))
    return pieces


def run_layers(config: ModelConfig, params, x, mask, positions, lo: int = 0, hi: int | None = None, *,
               stops=(), remat: str = "none"):
    """Stack layers [lo, hi) (default: to the last) of any layout from hidden state x entering layer lo. Returns
    (the last output, {layer: that layer's output} for each layer in `stops`: a stacked segment is cut there).
    `remat`: a `remat_policy` name for every layer."""
    outputs, policy = {}, remat_policy(remat)
    for seg, seg_params, first in stack_pieces(config, params, lo, config.depth if hi is None else hi):
        n = seg.num_layers
        ends = sorted({s + 1 - first for s in stops if first <= s < first + n} | {n})
        start = 0
        for end in ends:
            if end > start:
                part, sub = seg_params, seg
                if seg.kind == "layers" and (start, end) != (0, n):
                    part, sub = slice_layers(seg_params, start, end), Segment("layers", end - start)
                x, _, _ = run_segment(config, sub, part, x, mask, positions, first_layer=first + start,
                                      remat=policy)
            if first + end - 1 in stops:
                outputs[first + end - 1] = x
            start = end
    return x, outputs


def apply_shared_prefix(configs, params, shared: int, input_ids, attention_mask=None, positions=None, *,
                        segment_ids=None, shared_prefix_ids=None) -> list:
    """The last hidden states (before the final norm) of several models whose embeddings and first `shared` layers
    are the same (`shared_prefix_depth`: a dense model and its pruned copies): those run once, as the first
    model's, and each model runs its own layers from there. Arguments as `apply`'s, `configs` and `params` one per
    model."""
    mask, positions = input_masks(configs[0], input_ids, attention_mask, positions, segment_ids=segment_ids,
                                  shared_prefix_ids=shared_prefix_ids)
    x = embed(configs[0], params[0], input_ids, positions)
    x, _ = run_layers(configs[0], params[0], x, mask, positions, 0, shared)
    return [run_layers(c, p, x, mask, positions, shared)[0] for c, p in zip(configs, params)]


_LAYER_FREE = ("num_layers", "layout", "pruned_spans", "layer_types")  # what may differ between models sharing layers


def shared_prefix_depth(config_a: ModelConfig, params_a, config_b: ModelConfig, params_b) -> int | None:
    """How many leading stack layers two models have in common (same parameters, same attention type), given the
    same settings and embeddings; None where those differ. A pruned model whose layers before its block did not
    train shares them with its dense model (and the block too, if it is still a copy of the span's first layer)."""
    settings = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in _LAYER_FREE}
    if settings(config_a) != settings(config_b):
        return None
    embeds = [{k: p[k] for k in EMBED_KEYS if k in p} for p in (params_a, params_b)]
    if not _same_arrays(*embeds):
        return None
    depth = 0
    while depth < min(config_a.depth, config_b.depth):
        (seg_a, p_a, first_a), (seg_b, p_b, first_b) = (segment_at(config_a, params_a, depth),
                                                         segment_at(config_b, params_b, depth))
        if seg_a.kind not in ("layers", "layer") or seg_b.kind not in ("layers", "layer"):
            break
        if first_a == first_b and _identical(p_a, p_b):  # a pruned model's kept segment: the dense model's arrays
            run = first_a + seg_a.num_layers - depth
        elif _same_layer(seg_a, p_a, depth - first_a, seg_b, p_b, depth - first_b):
            run = 1
        else:
            break
        agreeing = next((i for i in range(run) if config_a.layer_is_local(depth + i, 1)
                         != config_b.layer_is_local(depth + i, 1)), run)  # layers of the same attention type
        depth += agreeing
        if agreeing < run:
            break
    return depth


def segment_starts(config: ModelConfig) -> list[tuple[str, Segment, int]]:
    """(params["segments"] key, segment, stack index of its first layer) for each layout segment, in order."""
    return [(segment_key(i), seg, first) for i, (seg, first) in enumerate(zip(config.layout, layer_offsets(config)))]


def segment_at(config: ModelConfig, params, layer: int):
    """(segment, its parameters, its first layer) of the layout segment that holds stack layer `layer`."""
    for key, seg, first in segment_starts(config):
        if first <= layer < first + seg.num_layers:
            return seg, params["segments"][key], first
    raise ValueError(f"layer {layer} is past the model's {config.depth} layers")


def _identical(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _same_layer(seg_a: Segment, params_a, index_a: int, seg_b: Segment, params_b, index_b: int) -> bool:
    """Whether layer `index_a` of one segment's parameters holds the same values as layer `index_b` of another's;
    each is sliced inside the comparison's jit, so no layer is copied out of its stack."""
    stacked = (seg_a.kind == "layers", seg_b.kind == "layers")
    leaves = [jax.tree.leaves(params_a), jax.tree.leaves(params_b)]
    shapes = [[(x.shape[1:] if s else x.shape, x.dtype) for x in ls] for ls, s in zip(leaves, stacked)]
    if jax.tree.structure(params_a) != jax.tree.structure(params_b) or shapes[0] != shapes[1]:
        return False
    return bool(_layers_equal(params_a, index_a, params_b, index_b, stacked=stacked))


@functools.partial(jax.jit, static_argnames=("stacked",))
def _layers_equal(a, index_a, b, index_b, *, stacked):
    pick = lambda tree, i, s: jax.tree.map(lambda x: x[i], tree) if s else tree
    a, b = pick(a, index_a, stacked[0]), pick(b, index_b, stacked[1])
    return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


def _same_arrays(a, b) -> bool:
    """Whether two trees hold the same arrays (structure, shapes, dtypes and values), compared where they live."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    if any(x.shape != y.shape or x.dtype != y.dtype for x, y in pairs):
        return False
    return _identical(a, b) or bool(_arrays_equal(a, b))


@jax.jit
def _arrays_equal(a, b):
    return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


def _cache_len(caches):
    return jax.tree.leaves(caches)[0].shape[-2]


def init_caches(config: ModelConfig, batch: int, length: int, dtype=None):
    """Preallocated key/value caches for every segment that has attention: {seg_i: (k, v)}."""
    dtype = dtype or compute_dtype(config)
    shape = (batch, config.num_kv_heads, length, config.head_dim)  # update_cache's layout
    caches = {}
    for i, seg in enumerate(config.layout):
        if seg.kind == "layers":
            z = jnp.zeros((seg.num_layers,) + shape, dtype)
            caches[segment_key(i)] = (z, z)
        elif seg.kind == "layer":
            z = jnp.zeros(shape, dtype)
            caches[segment_key(i)] = (z, z)
    return caches
