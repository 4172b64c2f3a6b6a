"""Stage 4, train: fit the replacement block (or any chosen parameters) with optax while the rest stays frozen.

MSE mode (the paper's): the block's input is the frozen dense model's hidden state entering the pruned span, its
target the state leaving it; both are computed inside the jitted step (no gradient through the frozen layers), so
host memory does not grow with the number of training samples. LM mode: next-token cross-entropy of the whole pruned
model. KD mode: KL divergence from the dense teacher's next-token distribution to the pruned student's (with a
temperature), optionally mixed with the cross-entropy and plus hidden-state MSE at the span's output and later
layers; the teacher runs in the same jitted step from the prefix it shares with the student, and the logits are
reduced chunk by chunk (never [tokens x vocab] for the whole batch, never on the host). What trains is a set of
parameter-path patterns (`trainable`, the block by default); optimizer state exists for those leaves only. A trained
`layer` block uses the same causal mask as at inference.

Training state (block params, optimizer state, step, data position, best block, history) is checkpointed with
Orbax every `checkpoint_every` steps, and at the step a Ctrl-C stops (it waits for the step under way: see
interrupts.py); `resume=True` continues from the latest checkpoint and ends with the same parameters as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from .backend import jit_for
from .data import batches as batch_chunks, pad_rows
from .files import write_atomic
from .interrupts import deferred_interrupts
from .models import transformer
from .models.config import ModelConfig, Segment
from .models.model import Model, with_compute_dtype
from .sharding import batch_sharding, param_shardings, place_batch

MODES = ("mse", "lm", "kd")


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Block:
    """The one replacement block being trained: its segment key in the pruned model, and the dense span it replaces."""

    key: str
    segment: Segment
    start: int  # first original layer of the span
    length: int
    layer: int = 0  # its index in the pruned stack (where `layer_types` has its attention type)


def trainable_blocks(pruned: ModelConfig) -> list[Block]:
    from .pruning import original_ranges

    ranges = original_ranges(pruned)
    blocks, layer = [], 0
    for i, seg in enumerate(pruned.layout):
        if seg.kind != "layers":
            lo, hi = ranges[layer]
            blocks.append(Block(f"seg_{i}", seg, lo, hi - lo, layer))
        layer += seg.num_layers
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Losses


def _dense_prefix(config: ModelConfig, params, input_ids, mask, start):
    """The dense model's hidden state entering layer `start`, with the attention mask and positions."""
    t = input_ids.shape[1]
    positions = transformer.default_positions(mask)
    attn = transformer.attention_mask_matrix(mask, jnp.arange(t)[None], config.sliding_window)
    x = transformer.embed(config, params, input_ids, positions)
    x, _ = _run_pieces(config, _dense_layers(config, params, 0, start), x, attn, positions)
    return x, attn, positions


def _dense_layers(config: ModelConfig, params, lo, hi):
    """(segment, params) pieces of the dense model's layers [lo, hi); none for an empty range."""
    return [(seg, seg_params) for seg, seg_params, _ in transformer.stack_pieces(config, params, lo, hi)]


def _run_pieces(config: ModelConfig, pieces, x, attn, positions, stops=(), first=0, remat="none"):
    """Run (segment, params) pieces in order from x; `first` numbers the first piece's first layer. Returns the last
    output and {layer: the output of that layer} for each layer in `stops` (a stacked segment is cut there). `remat`:
    a `transformer.remat_policy` name for every layer."""
    outputs, layer = {}, first
    for segment, seg_params in pieces:
        n = segment.num_layers
        ends = sorted({s + 1 - layer for s in stops if layer <= s < layer + n} | {n})
        lo = 0
        for hi in ends:
            if hi > lo:
                part, sub = seg_params, segment
                if segment.kind == "layers":
                    part, sub = jax.tree.map(lambda a: a[lo:hi], seg_params), Segment("layers", hi - lo)
                x, _, _ = transformer.run_segment(config, sub, part, x, attn, positions, first_layer=layer + lo,
                                                  remat=transformer.remat_policy(remat))
            if layer + hi - 1 in stops:
                outputs[layer + hi - 1] = x
            lo = hi
        layer += n
    return x, outputs


def _dense_span_io(config: ModelConfig, params, input_ids, mask, start, length):
    """The dense model's hidden states entering layer `start` and leaving layer `start+length-1` (no gradient)."""
    x_in, attn, positions = _dense_prefix(config, params, input_ids, mask, start)
    target, _ = _run_pieces(config, _dense_layers(config, params, start, start + length), x_in, attn, positions,
                            first=start)
    return jax.lax.stop_gradient(x_in), jax.lax.stop_gradient(target), attn, positions


def span_pairs(config: ModelConfig, params, ids, mask, start, length):
    """The dense span's (input, target) in float32, not jitted: for use inside another jitted function."""
    x_in, target, _, _ = _dense_span_io(config, params, ids, mask, start, length)
    return x_in.astype(jnp.float32), target.astype(jnp.float32)


def span_pairs_fn(config: ModelConfig, start, length):
    """A jitted (params, ids, mask) -> (input, target) in float32: the span's pairs for a pair cache or validation."""
    def span_io(params, ids, mask):
        return span_pairs(config, params, ids, mask, start, length)

    return jit_for(transformer.compute_dtype(config), span_io)


MSE_WEIGHTINGS = ("uniform", "token", "balanced")


def masked_mse(out, target, mask, weighting="uniform"):
    """Mean squared error over real tokens. In SmolLM2 the span's output at position 0 carries a massive activation
    (norm ~23,000 against ~200 elsewhere) that makes up ~98% of the plain (`uniform`) MSE of a block that starts as
    the identity. `token` divides each token's error by its target's mean square, so that token counts as one of
    many; `balanced` is the mean of the two relative errors (the batch's summed error over its summed target
    square, and `token`'s), so the massive tokens and the rest each steer about half of the gradient."""
    target = target.astype(jnp.float32)
    err = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=-1)
    real = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(real), 1.0)
    if weighting == "uniform":
        return jnp.sum(err * real) / count
    size = jnp.mean(jnp.square(target), axis=-1)
    per_token = jnp.sum(err / (size + 1e-6) * real) / count
    if weighting == "token":
        return per_token
    pooled = jnp.sum(err * real) / (jnp.sum(size * real) + 1e-6)
    return 0.5 * (pooled + per_token)


def param_path(key_path) -> str:
    """A parameter's '/'-joined path ("segments/seg_1/mlp/down_proj/kernel")."""
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def split_params(params, is_trained):
    """(trained, frozen): two nested dicts holding the leaves whose path `is_trained` says, and the rest."""
    def split(tree, prefix):
        trained, frozen = {}, {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping):
                t, f = split(value, path + "/")
                trained.update({key: t} if t else {})
                frozen.update({key: f} if f else {})
            elif is_trained(path):
                trained[key] = value
            else:
                frozen[key] = value
        return trained, frozen

    return split(params, "")


def merge_params(a, b):
    """The union of two trees of nested dicts that `split_params` made."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


def _block_params(trained, frozen, block: Block):
    pruned = frozen.get("pruned", {}).get("segments", {}).get(block.key, {})
    return merge_params(trained.get("segments", {}).get(block.key, {}), pruned)


def mse_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, weighting="uniform",
             remat="none"):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    x_in, target, attn, positions = _dense_span_io(dense_config, frozen["dense"], ids, mask, block.start,
                                                   block.length)
    out, _, _ = transformer.run_segment(pruned_config, block.segment, _block_params(trained, frozen, block), x_in,
                                        attn, positions, first_layer=block.layer,
                                        remat=transformer.remat_policy(remat))
    return masked_mse(out, target, mask, weighting)


def lm_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, remat="none"):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    params = merge_params(trained, frozen["pruned"])
    hidden = transformer.apply(pruned_config, params, ids, mask, return_logits=False,
                               remat=transformer.remat_policy(remat))["last_hidden"]
    b, t = ids.shape
    real = mask.astype(jnp.float32)
    next_real = jnp.concatenate([real[:, 1:] * real[:, :-1], jnp.zeros((b, 1), jnp.float32)], axis=1)
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    weight = next_real / jnp.maximum(jnp.sum(next_real), 1.0)
    return chunked_cross_entropy(pruned_config, params, hidden.reshape(b * t, -1), labels.reshape(-1),
                                 weight.reshape(-1), head_trains=any(k in trained for k in HEAD_KEYS))


def chunked_cross_entropy(config: ModelConfig, params, hidden, labels, weight, head_trains=True):
    """sum over tokens of weight x -log p(label) from [N, D] final hidden states (before the final norm), the head run
    a chunk of tokens at a time (`_token_chunks`): memory holds one chunk's [chunk, vocab], never the batch's. A
    frozen head (not `head_trains`): each chunk's input gradient is made in the forward pass (softmax - onehot), two
    vocabulary products a chunk; else autodiff through its logits recomputed in the backward pass (jax.checkpoint)."""
    head_params = {k: params[k] for k in HEAD_KEYS if k in params}
    xs = _token_chunks(config.vocab_size, hidden, labels, weight)

    def chunk_loss(h, label, w, with_grad=False):
        head = lambda h: transformer.head(config, head_params, h[None])[0]
        logits, head_vjp = jax.vjp(head, h) if with_grad else (head(h), None)
        out_dtype, logits = logits.dtype, logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        loss = jnp.sum((lse - jnp.take_along_axis(logits, label[:, None], axis=-1))[:, 0] * w)
        if not with_grad:
            return loss, None
        dlogits = (jnp.exp(logits - lse) - jax.nn.one_hot(label, logits.shape[-1], dtype=jnp.float32)) * w[:, None]
        return loss, head_vjp(dlogits.astype(out_dtype))[0]

    if head_trains:
        body = jax.checkpoint(lambda total, x: (total + chunk_loss(*x)[0], None))
    else:
        nll = jax.custom_vjp(lambda h, label, w: chunk_loss(h, label, w)[0])
        nll.defvjp(lambda h, label, w: chunk_loss(h, label, w, with_grad=True),
                   lambda dh, g: (g * dh, None, None))  # labels and weights get no gradient
        body = lambda total, x: (total + nll(*x), None)
    return jax.lax.scan(body, jnp.float32(0), xs)[0]


def cached_mse_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, weighting="uniform",
                    remat="none"):
    """MSE on (input, target) pairs read from a `SpanPairCache` instead of recomputed by the frozen model."""
    mask = batch["attention_mask"]
    t = mask.shape[1]
    positions = transformer.default_positions(mask)
    attn = transformer.attention_mask_matrix(mask, jnp.arange(t)[None], pruned_config.sliding_window)
    out, _, _ = transformer.run_segment(pruned_config, block.segment, _block_params(trained, frozen, block),
                                        batch["x_in"], attn, positions, first_layer=block.layer,
                                        remat=transformer.remat_policy(remat))
    return masked_mse(out, batch["target"], mask, weighting)


# Tokens whose logits one step of the distillation loss holds at a time (teacher and student, [chunk, vocab] float32
# each): at most KD_CHUNK_TOKENS, and at most KD_CHUNK_LOGITS logits a chunk, so that its memory stays flat in the
# vocabulary (192 MiB an array: 1024 tokens for SmolLM2's 49,152, 331 for Qwen's 151,936), whatever the batch.
KD_CHUNK_TOKENS = 1024
KD_CHUNK_LOGITS = 1024 * 49152


@dataclasses.dataclass(frozen=True)
class Distillation:
    """KD mode's settings. `hidden_pairs`: (teacher layer, student layer) whose outputs the hidden-state MSE
    matches, in the dense model's and the pruned model's own layer numbers: the span's last layer against the block,
    and each later original layer against its copy."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_pairs: tuple = ()
    shared_prefix: bool = True  # the student's layers before the block are the teacher's, untrained


HEAD_KEYS = ("embed_tokens", "final_norm", "project_out", "lm_head")  # what transformer.head reads


def distillation_loss_by_autodiff(teacher_config, teacher_params, student_config, student_params, teacher_h,
                                  student_h, labels, kl_weight, ce_weight, temperature):
    """`distillation_loss` (same arguments and value) differentiable in everything, the student's head included:
    autodiff through each chunk's logits, recomputed in the backward pass (jax.checkpoint), so memory holds one
    chunk's [chunk, vocab], never the batch's; five vocabulary products a chunk. For a head that trains."""
    with_ce = ce_weight is not None
    ce_weight = jnp.zeros_like(kl_weight) if ce_weight is None else ce_weight
    xs = _token_chunks(student_config.vocab_size, teacher_h, student_h, labels, kl_weight, ce_weight)

    @jax.checkpoint
    def body(total, xs):
        h_t, h_s, label, w_kl, w_ce = xs
        logits_t = jax.lax.stop_gradient(transformer.head(teacher_config, teacher_params, h_t[None])[0])
        logits_s = transformer.head(student_config, student_params, h_s[None])[0]
        logp_t = jax.nn.log_softmax(logits_t.astype(jnp.float32) / temperature)
        logp_s = jax.nn.log_softmax(logits_s.astype(jnp.float32) / temperature)
        loss = jnp.sum(jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1) * w_kl) * temperature ** 2
        if with_ce:
            logp = logp_s if temperature == 1 else jax.nn.log_softmax(logits_s.astype(jnp.float32))
            loss -= jnp.sum(jnp.take_along_axis(logp, label[:, None], axis=-1)[:, 0] * w_ce)
        return total + loss, None

    return jax.lax.scan(body, jnp.float32(0), xs)[0]


def _token_chunks(vocab_size, *arrays):
    """Each [N, ...] array as [N / chunk, chunk, ...] (at most KD_CHUNK_TOKENS a chunk, fewer where their
    [chunk, vocab_size] logits would exceed KD_CHUNK_LOGITS; the chunks as even as they can be, the last
    zero-padded)."""
    n = arrays[0].shape[0]
    most = max(1, min(KD_CHUNK_TOKENS, KD_CHUNK_LOGITS // vocab_size, n))
    chunk = -(-n // -(-n // most))  # 2048 tokens at most 331 a chunk: 7 of 293, not 7 of 331 (13% padding)
    pad = -n % chunk
    return tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((-1, chunk) + a.shape[1:])
                 for a in arrays)


def distillation_loss(teacher_config, teacher_params, student_config, student_params, teacher_h, student_h,
                      labels, kl_weight, ce_weight, temperature):
    """sum over tokens of kl_weight x T^2 KL(teacher || student) + ce_weight x the student's cross-entropy on
    `labels`, from [N, D] final hidden states (before the final norm), a chunk of tokens at a time ([N] weights: mask /
    count x the loss's share; ce_weight None: no cross-entropy). Differentiable in `student_h` only: the student's
    head is frozen (`distillation_loss_by_autodiff` for one that trains). Each chunk's gradient is made in the
    forward pass from the probabilities at hand (T (p_s - p_t) for the KL, p_s - onehot for the cross-entropy), so
    the backward pass recomputes no logits: three vocabulary products a chunk (teacher, student, the student's input
    gradient) where autodiff with recomputation needs five.
    Memory holds one chunk's [chunk, vocab] and the [N, D] input gradient."""
    with_ce = ce_weight is not None
    ce_weight = jnp.zeros_like(kl_weight) if ce_weight is None else ce_weight
    xs = _token_chunks(student_config.vocab_size, teacher_h, student_h, labels, kl_weight, ce_weight)

    def chunk_loss_and_grad(teacher_params, student_params, h_t, h_s, label, w_kl, w_ce, with_grad=True):
        logits_t = transformer.head(teacher_config, teacher_params, h_t[None])[0].astype(jnp.float32)
        head_s = lambda h: transformer.head(student_config, student_params, h[None])[0]
        logits_s, head_vjp = jax.vjp(head_s, h_s) if with_grad else (head_s(h_s), None)
        out_dtype, logits_s = logits_s.dtype, logits_s.astype(jnp.float32)
        # KL from the scaled logits and their logsumexps (sum p_t = 1), the log-probabilities never written out:
        # fewer passes over the [chunk, vocab] arrays (~15% faster on CPU)
        z_t, z_s = logits_t / temperature, logits_s / temperature
        lse_t = jax.nn.logsumexp(z_t, axis=-1, keepdims=True)
        lse_s = jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
        p_t = jnp.exp(z_t - lse_t)
        kl = jnp.sum(p_t * (z_t - z_s), axis=-1) - (lse_t - lse_s)[:, 0]
        loss = jnp.sum(kl * w_kl) * temperature ** 2
        if with_ce:
            lse = lse_s if temperature == 1 else jax.nn.logsumexp(logits_s, axis=-1, keepdims=True)
            loss -= jnp.sum((jnp.take_along_axis(logits_s, label[:, None], axis=-1) - lse)[:, 0] * w_ce)
        if not with_grad:
            return loss, None
        dlogits = temperature * (jnp.exp(z_s - lse_s) - p_t) * w_kl[:, None]
        if with_ce:
            dlogits += (jnp.exp(logits_s - lse) - jax.nn.one_hot(label, logits_s.shape[-1], dtype=jnp.float32)
                        ) * w_ce[:, None]
        return loss, head_vjp(dlogits.astype(out_dtype))[0]

    @jax.custom_vjp
    def summed(h_s, frozen):
        return summed_fwd(h_s, frozen, with_grad=False)[0]  # not differentiated (validation): no gradient made

    def summed_fwd(h_s, frozen, with_grad=True):
        def body(total, x):
            loss, dh = chunk_loss_and_grad(*frozen[0], *x, with_grad=with_grad)
            return total + loss, dh

        total, dh = jax.lax.scan(body, jnp.float32(0), (frozen[1][0], h_s) + frozen[1][1:])
        return total, dh

    def summed_bwd(dh, g):
        return g * dh, None  # the teacher, the head and the weights get no gradient

    summed.defvjp(summed_fwd, summed_bwd)
    heads = tuple({k: p[k] for k in HEAD_KEYS if k in p} for p in (teacher_params, student_params))
    return summed(xs[1], (heads, xs[:1] + xs[2:]))


def kd_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, kd: Distillation,
            weighting="uniform", remat="none"):
    """(1 - ce_weight) KL + ce_weight CE (+ hidden_weight x the mean hidden-state MSE), over real tokens. `remat`
    applies to the student's layers (the teacher's get no gradient)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dense_params, pruned = frozen["dense"], merge_params(trained, frozen["pruned"])
    if kd.shared_prefix:  # the frozen prefix once, for both
        x, attn, positions = _dense_prefix(dense_config, dense_params, ids, mask, block.start)
        teacher = (jax.lax.stop_gradient(x), block.start)
        return _distill_from(teacher, teacher, trained, frozen, batch, attn, positions, dense_config=dense_config,
                             pruned_config=pruned_config, block=block, kd=kd, weighting=weighting, remat=remat)
    positions = transformer.default_positions(mask)
    attn = transformer.attention_mask_matrix(mask, jnp.arange(ids.shape[1])[None], dense_config.sliding_window)
    teacher = (transformer.embed(dense_config, dense_params, ids, positions), 0)
    student = (transformer.embed(pruned_config, pruned, ids, positions), 0)
    return _distill_from(teacher, student, trained, frozen, batch, attn, positions, dense_config=dense_config,
                         pruned_config=pruned_config, block=block, kd=kd, weighting=weighting, remat=remat)


def cached_kd_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, kd: Distillation,
                   weighting="uniform", remat="none"):
    """`kd_loss` with the dense span's input and output read from a `SpanPairCache`: the teacher runs from the
    span's output, the student from the span's input where its prefix is the teacher's (else from its embeddings)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pruned = merge_params(trained, frozen["pruned"])
    positions = transformer.default_positions(mask)
    attn = transformer.attention_mask_matrix(mask, jnp.arange(ids.shape[1])[None], dense_config.sliding_window)
    teacher = (batch["target"], block.start + block.length)
    student = ((batch["x_in"], block.start) if kd.shared_prefix
               else (transformer.embed(pruned_config, pruned, ids, positions), 0))
    return _distill_from(teacher, student, trained, frozen, batch, attn, positions, dense_config=dense_config,
                         pruned_config=pruned_config, block=block, kd=kd, weighting=weighting, remat=remat)


def _distill_from(teacher, student, trained, frozen, batch, attn, positions, *, dense_config, pruned_config,
                  block: Block, kd: Distillation, weighting, remat):
    """KD's loss with the teacher's hidden state entering its (dense) layer number and the student's entering its
    original layer number (0 or the block's start): (hidden state, layer) each."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dense_params, pruned = frozen["dense"], merge_params(trained, frozen["pruned"])
    (x_t, teacher_first), (x_s, original_first) = teacher, student
    segments = [(seg, pruned["segments"][f"seg_{i}"]) for i, seg in enumerate(pruned_config.layout)]
    student_first = 0
    if original_first:  # the student starts at the block: the layers before it are the teacher's
        block_index = int(block.key.removeprefix("seg_"))
        student_first = sum(seg.num_layers for seg, _ in segments[:block_index])
        segments = segments[block_index:]
    teacher_stops, student_stops = [t for t, _ in kd.hidden_pairs], [s for _, s in kd.hidden_pairs]
    # a span ending at the last layer leaves a cached teacher no layers to run
    teacher_layers = _dense_layers(dense_config, dense_params, teacher_first, dense_config.depth)
    h_t, hidden_t = _run_pieces(dense_config, teacher_layers, x_t, attn, positions, teacher_stops, teacher_first)
    if teacher_first - 1 in teacher_stops:  # a cached span output is the teacher's last layer before teacher_first
        hidden_t[teacher_first - 1] = x_t
    h_t, hidden_t = jax.lax.stop_gradient((h_t, hidden_t))
    h_s, hidden_s = _run_pieces(pruned_config, segments, x_s, attn, positions, student_stops, student_first, remat)
    b, t = ids.shape
    real = mask.astype(jnp.float32)
    next_real = jnp.concatenate([real[:, 1:] * real[:, :-1], jnp.zeros((b, 1), jnp.float32)], axis=1)
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    # per-token weights: each term's share of the loss over its count of tokens
    kl_weight = ((1 - kd.ce_weight) * real / jnp.maximum(jnp.sum(real), 1.0)).reshape(-1)
    ce_weight = (kd.ce_weight * next_real / jnp.maximum(jnp.sum(next_real), 1.0)).reshape(-1)
    flat = (dense_config, dense_params, pruned_config, pruned, h_t.reshape(b * t, -1), h_s.reshape(b * t, -1),
            labels.reshape(-1), kl_weight)
    head_trains = any(k in trained for k in HEAD_KEYS)  # then autodiff through its recomputed logits
    loss = (distillation_loss_by_autodiff if head_trains else distillation_loss)(
        *flat, ce_weight if kd.ce_weight else None, kd.temperature)
    if kd.hidden_weight and kd.hidden_pairs:
        mse = [masked_mse(hidden_s[s], hidden_t[t], mask, weighting) for t, s in kd.hidden_pairs]
        loss += kd.hidden_weight * sum(mse) / len(mse)
    return loss


LOSSES = {"mse": mse_loss, "lm": lm_loss, "kd": kd_loss, "mse_cached": cached_mse_loss, "kd_cached": cached_kd_loss}


# ----------------------------------------------------------------------------------------------------------------
# On-disk (input, target) pairs for several epochs or several blocks over the same span


class SpanPairCache:
    """The dense model's hidden states entering and leaving a span, for every training batch, in tensorstore arrays
    on disk ([N, T, D] each, plus the [N, T] mask and token ids), for MSE's epochs and the distillation that follows
    them. Written one batch at a time, so host memory stays at one batch; a `complete.json` written last marks a
    finished cache, which later runs reuse."""

    def __init__(self, path, start, length):
        self.path, self.start, self.length = Path(path), start, length

    def _spec(self, name):
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}

    def open(self, name):
        """One of the cache's arrays ("x_in", "target", "attention_mask", "input_ids") as an open TensorStore."""
        import tensorstore as ts

        return ts.open(self._spec(name)).result()

    def complete(self, rows: int | None = None) -> bool:
        """Whether a finished cache for this span (and, if given, this many rows) is there."""
        marker = self.path / "complete.json"
        if not marker.exists():
            return False
        meta = json.loads(marker.read_text())
        return ((meta["start"], meta["length"]) == (self.start, self.length) and rows in (None, meta["rows"])
                and meta.get("input_ids", False))  # caches written before the token ids were kept: rebuilt

    def build(self, dense_model: Model, batches: Iterable[dict], progress=True):
        import tensorstore as ts

        if self.path.exists():
            import shutil

            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        config, params = dense_model.config, dense_model.params
        span_io = span_pairs_fn(config, self.start, self.length)
        batch_list = iter(batches)
        first = next(batch_list)
        b, t = np.asarray(first["input_ids"]).shape
        count = 1 + sum(1 for _ in batch_list)
        n, d = count * b, config.hidden_size
        arrays = {}
        for name, shape, dtype in (("x_in", (n, t, d), ts.float32), ("target", (n, t, d), ts.float32),
                                   ("attention_mask", (n, t), ts.int32), ("input_ids", (n, t), ts.int32)):
            chunk = [b, t, d][:len(shape)]
            arrays[name] = ts.open(self._spec(name), create=True, dtype=dtype, shape=shape,
                                   chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()
        bar = _progress(progress, count, 0, "cache span pairs", "batch")
        for i, batch in enumerate(batches):
            ids = np.asarray(batch["input_ids"], np.int32)
            mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
            ids, mask = pad_rows(ids, mask, b)  # a short last batch
            x_in, target = span_io(params, jnp.asarray(ids), jnp.asarray(mask))
            rows = slice(i * b, (i + 1) * b)
            writes = [arrays["x_in"][rows].write(np.asarray(x_in)), arrays["target"][rows].write(np.asarray(target)),
                      arrays["attention_mask"][rows].write(mask), arrays["input_ids"][rows].write(ids)]
            for w in writes:
                w.result()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        write_atomic(self.path / "complete.json", json.dumps(
            {"start": self.start, "length": self.length, "rows": n, "batch": b, "seq": t, "input_ids": True}))

    def batches(self, batch_size=None):
        """Re-iterable batches {"x_in", "target", "attention_mask", "input_ids"} read from disk: rows in order, or in
        epoch e's permutation under a seed (`.epoch(e, shuffle_seed)`)."""
        cache = self

        class _Reader:
            def epoch(self, e, shuffle_seed=None):
                meta = json.loads((cache.path / "complete.json").read_text())
                b = batch_size or meta["batch"]
                arrays = {k: cache.open(k) for k in ("x_in", "target", "attention_mask", "input_ids")}
                order = _epoch_order(meta["rows"], shuffle_seed, e)
                for i in range(meta["rows"] // b):
                    rows = order[i * b:(i + 1) * b]
                    yield {k: a[rows].read().result() for k, a in arrays.items()}

            def __iter__(self):
                return self.epoch(0)

        return _Reader()


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and steps


LR_SCHEDULES = ("cosine", "cosine-cycle")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How `train_replacement` trains: the run's `train.*` settings are this type (settings.TrainSection adds only
    whether to keep a pair cache). See `train_replacement` for what each option does."""

    mode: str = "mse"
    num_steps: int | None = None
    epochs: int = 1
    lr: float = 2e-4
    min_lr: float = 5e-5
    warmup_steps: int | None = None
    weight_decay: float = 1e-3
    clip_norm: float = 5.0
    grad_accum: int = 1
    eval_every: int | None = None
    checkpoint_every: int | None = None
    compute_dtype: str | None = None
    seed: int = 0
    freeze: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ("block",)
    shuffle: bool = False
    lr_schedule: str = "cosine"
    mse_weighting: str = "uniform"
    kd_temperature: float = 1.0
    kd_ce_weight: float = 0.0
    kd_hidden_layers: tuple[int, ...] = ()
    kd_hidden_weight: float = 0.0
    kd_hidden_every: int = 0  # also every this many original layers after the span's output (kd_hidden_weight > 0)
    lr_beyond_block: float | None = None  # peak lr of the trained parameters outside the block (None: lr)
    log_every: int = 10  # steps between reads of the losses (see train_replacement)

    def replace(self, **changes) -> "TrainOptions":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainOptions)})
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; the options are the fields of TrainOptions")
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


def lr_schedule(name, lr, min_lr, warmup_steps, total_steps):
    """Linear warm-up from 0, then `cosine`: half a cosine from lr down to min_lr at the last step; or
    `cosine-cycle`: a whole cosine period, down to min_lr half-way and back up to lr at the end. The second is what
    the authors' code runs when it asks for the first: it sets the scheduler's length to half the steps, and its
    cosine keeps going past that length."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; expected one of {LR_SCHEDULES}")
    warmup_steps = max(warmup_steps, 1)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
                                                  decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)
    half = max(total_steps / 2 - warmup_steps, 1.0)

    def schedule(step):
        warm = lr * step / warmup_steps
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * (step - warmup_steps) / half))
        return jnp.where(step < warmup_steps, warm, min_lr + cosine * (lr - min_lr))

    return schedule


def warmup_steps_for(num_steps, warmup_steps=None):
    """The warm-up length: as given, else a twentieth of the steps (at least one)."""
    return max(1, num_steps // 20) if warmup_steps is None else warmup_steps


def scale_updates_by_path(scale_of: Callable[[str], float]) -> optax.GradientTransformation:
    """Each update times `scale_of` its parameter's path: learning rates per group of parameters on one schedule
    (weight decay scales with them, as it does with the lr in AdamW). No state."""
    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(lambda k, u: u * scale_of(param_path(k)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(lr, min_lr, warmup_steps, total_steps, weight_decay, clip_norm, grad_accum, schedule="cosine",
                   scale_of: Callable[[str], float] | None = None):
    """AdamW with clipping, the schedule and accumulation, for the trained parameters only (frozen ones are not in
    the tree it sees: they have no optimizer state, and clipping and weight decay never see them). `scale_of`: a
    parameter path's multiplier of the learning rate (see `scale_updates_by_path`)."""
    schedule = lr_schedule(schedule, lr, min_lr, warmup_steps, total_steps)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    if scale_of is not None:
        tx = optax.chain(tx, scale_updates_by_path(scale_of))
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx, schedule


# What `freeze=("attention",)` stands for: the attention projections and the norm before them (Llama's
# input_layernorm; OPT's self_attn_layer_norm matches self_attn).
ATTENTION_HALF = ("self_attn", "input_layernorm")


def freeze_labels(block_params, freeze: Sequence[str]):
    """"train" / "frozen" for each of the block's parameters: frozen where a `freeze` regex matches its path
    ("self_attn/q_proj/kernel"). `attention` stands for the block's attention half, and for nothing in a block that
    has no attention (`ffn`, `mlp`), so one setting serves every replacement. None when nothing is frozen. Every
    other pattern must match, and something must train."""
    if isinstance(freeze, str):
        freeze = (freeze,)
    paths = [param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(block_params)]
    freeze = [pattern for name in freeze for pattern in (
        [r for r in ATTENTION_HALF if any(re.search(r, p) for p in paths)] if name == "attention" else [name])]
    if not freeze:
        return None
    regexes = []
    for pattern in freeze:
        try:
            regexes.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"freeze pattern {pattern!r} is not a regular expression: {e}") from None
    for regex in regexes:
        if not any(regex.search(p) for p in paths):
            raise ValueError(f"freeze pattern {regex.pattern!r} matches none of the block's parameters: "
                             f"{sorted(paths)}")
    labels = jax.tree_util.tree_map_with_path(
        lambda k, _: "frozen" if any(r.search(param_path(k)) for r in regexes) else "train", block_params)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError(f"freeze {list(freeze)} freezes every parameter of the block; nothing would train")
    return labels


def trained_paths(pruned_params, block: Block, trainable: Sequence[str] = ("block",),
                  freeze: Sequence[str] = ()) -> list[str]:
    """The '/'-joined paths of the parameters that train: those a `trainable` regex matches in full over the pruned
    model's paths (e.g. "segments/seg_2/.*mlp.*"; `block` stands for the replacement block's parameters), less the
    block's parameters a `freeze` pattern matches (see `freeze_labels`). A stacked segment keeps all its layers in one
    leaf, so patterns select whole leaves: every layer of a segment, or none. Every pattern must match something."""
    if isinstance(trainable, str):
        trainable = (trainable,)
    if not trainable:
        raise ValueError("trainable is empty: nothing would train (the default is ['block'])")
    paths = [param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(pruned_params)]
    selected = set()
    for pattern in trainable:
        try:
            regex = re.compile(re.escape(f"segments/{block.key}/") + ".*" if pattern == "block" else pattern)
        except re.error as e:
            raise ValueError(f"trainable pattern {pattern!r} is not a regular expression: {e}") from None
        hits = {p for p in paths if regex.fullmatch(p)}
        if not hits:
            groups = sorted({"/".join(p.split("/")[:3]) for p in paths})
            raise ValueError(f"trainable pattern {pattern!r} matches none of the pruned model's parameter paths "
                             f"(it must match a whole path); they start with {groups}")
        selected |= hits
    labels = freeze_labels(pruned_params["segments"][block.key], freeze)
    if labels is not None:
        selected -= {f"segments/{block.key}/{param_path(k)}"
                     for k, label in jax.tree_util.tree_leaves_with_path(labels) if label == "frozen"}
    if not selected:
        raise ValueError(f"trainable {list(trainable)} less freeze {list(freeze)} leaves nothing to train")
    return sorted(selected)


def distillation_settings(dense_config: ModelConfig, pruned_config: ModelConfig, block: Block, paths, temperature,
                          ce_weight, hidden_layers, hidden_weight, hidden_every: int = 0) -> Distillation:
    """KD mode's settings, checked, with the (teacher, student) layer pairs of the hidden-state terms: the span's
    output, each of `hidden_layers`, and every `hidden_every`-th original layer after the span's output that the
    student still has (none where hidden_weight is 0)."""
    from .pruning import original_ranges

    if not temperature > 0:
        raise ValueError(f"kd_temperature must be positive, got {temperature}")
    if not 0 <= ce_weight <= 1:
        raise ValueError(f"kd_ce_weight is the cross-entropy's share of the loss: it must be in [0, 1], got {ce_weight}")
    if not hidden_weight >= 0:
        raise ValueError(f"kd_hidden_weight must be >= 0, got {hidden_weight}")
    if hidden_layers and not hidden_weight:
        raise ValueError(f"kd_hidden_layers={list(hidden_layers)} needs kd_hidden_weight > 0")
    depth, end = dense_config.depth, block.start + block.length
    current = {span: i for i, span in enumerate(original_ranges(pruned_config))}  # original [lo, hi) -> layer
    pairs = {(end - 1, current[(block.start, end)])} if hidden_weight else set()
    for h in hidden_layers:
        if not isinstance(h, numbers.Integral):
            raise ValueError(f"kd_hidden_layers must be layer numbers, got {h!r}")
        layer = int(h) + depth if h < 0 else int(h)
        if not end - 1 <= layer < depth:
            raise ValueError(f"kd_hidden_layers: layer {h} is not after the span [{block.start}, {end}) of the "
                             f"{depth}-layer model (the span's output is matched anyway)")
        if layer >= end and (layer, layer + 1) not in current:
            raise ValueError(f"kd_hidden_layers: layer {h} was pruned; the student has no copy of it")
        pairs.add((layer, current[(block.start, end)] if layer == end - 1 else current[(layer, layer + 1)]))
    if not (isinstance(hidden_every, numbers.Integral) and hidden_every >= 0):
        raise ValueError(f"kd_hidden_every must be a whole number of layers >= 0, got {hidden_every!r}")
    if hidden_weight and hidden_every:  # a layer that another span pruned has no copy to match: skipped
        pairs |= {(layer, current[(layer, layer + 1)]) for layer in range(end - 1 + hidden_every, depth, hidden_every)
                  if (layer, layer + 1) in current}
    index = int(block.key.removeprefix("seg_"))
    before = pruned_config.layout[:index]
    prefix = {f"segments/seg_{i}" for i in range(index)} | {"embed_tokens", "embed_positions", "project_in"}
    trained_prefix = any(p.split("/")[0] in prefix or "/".join(p.split("/")[:2]) in prefix for p in paths)
    shared = (all(seg.kind == "layers" for seg in before) and sum(seg.num_layers for seg in before) == block.start
              and not trained_prefix)
    return Distillation(float(temperature), float(ce_weight), float(hidden_weight), tuple(sorted(pairs)), shared)


def make_steps(loss_fn, tx, compute_dtype=jnp.float32, *, out_shardings=None, platform=None):
    """Jitted (train_step, eval_step) for `loss_fn`, compiled for `compute_dtype` dot products on `platform`
    (default: this backend). The train step donates the trained parameters and the optimizer state (arguments 0 and
    1): the new values take their buffers, so a step holds one copy of each, not two. `out_shardings`: the train
    step's (trained, opt_state, loss) shardings, or None to let XLA choose."""
    def train_step(trained, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss

    def eval_step(trained, frozen, batch):
        mask = batch["attention_mask"]
        return loss_fn(trained, frozen, batch), jnp.sum(mask)

    return (jit_for(compute_dtype, train_step, platform, donate_argnums=(0, 1), out_shardings=out_shardings),
            jit_for(compute_dtype, eval_step, platform))


@dataclasses.dataclass(frozen=True)
class TrainingProgram:
    """What a training run compiles: its loss, optax chain and jitted steps, with the shardings of the step's
    arguments on the mesh. `train_replacement` runs it and plan.py compiles it ahead of time: one builder
    (`training_program`), so a memory plan is for the program the run executes."""

    loss_name: str  # a key of LOSSES
    loss_fn: Callable  # (trained, frozen, batch) -> loss
    tx: optax.GradientTransformation
    schedule: Callable  # step -> learning rate
    train_step: Callable  # jitted (trained, opt_state, frozen, batch) -> (trained, opt_state, loss); donates 0 and 1
    eval_step: Callable  # jitted (trained, frozen, batch) -> (loss, tokens)
    arguments: tuple  # (trained, opt_state, frozen) as ShapeDtypeStructs carrying their shardings (None: no mesh)


def training_program(dense_config: ModelConfig, pruned_config: ModelConfig, block: Block, paths, loss_name: str, *,
                     lr, min_lr, warmup_steps, num_steps, weight_decay, clip_norm, grad_accum, lr_schedule="cosine",
                     kd: Distillation | None = None, mse_weighting="uniform", remat="none", mesh=None,
                     platform=None, lr_beyond_block=None) -> TrainingProgram:
    """The training program for one block: `paths` are the trained parameters (`trained_paths`), `remat` a
    `transformer.remat_policy` name for the layers the gradient runs through, `mesh` the mesh the step's arguments
    live on (None: one device), `platform` the one it compiles for (default: this backend), `lr_beyond_block` the
    peak lr of the trained parameters outside the block (None: lr)."""
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; expected one of {list(LOSSES)}")
    extra = {"weighting": mse_weighting} if loss_name != "lm" else {}
    loss_fn = _partial(LOSSES[loss_name], dense_config=dense_config, pruned_config=pruned_config, block=block,
                       remat=remat, **extra, **({"kd": kd} if loss_name.startswith("kd") else {}))
    scale_of = None
    if lr_beyond_block is not None and lr_beyond_block != lr:
        in_block, beyond = f"segments/{block.key}/", lr_beyond_block / lr

        def scale_of(path):
            return 1.0 if path.startswith(in_block) else beyond
    tx, schedule = make_optimizer(lr, min_lr, warmup_steps, num_steps, weight_decay, clip_norm, grad_accum,
                                  lr_schedule, scale_of)
    arguments = abstract_step_arguments(dense_config, pruned_config, paths, loss_name, tx, mesh)
    out_shardings = None
    if mesh is not None:
        trained, opt_state, _ = jax.tree.map(lambda a: a.sharding, arguments)
        out_shardings = (trained, opt_state, NamedSharding(mesh, P()))
    train_step, eval_step = make_steps(loss_fn, tx, transformer.compute_dtype(pruned_config),
                                       out_shardings=out_shardings, platform=platform)
    return TrainingProgram(loss_name, loss_fn, tx, schedule, train_step, eval_step, arguments)


def abstract_step_arguments(dense_config: ModelConfig, pruned_config: ModelConfig, paths, loss_name: str, tx,
                            mesh=None):
    """(trained, opt_state, frozen) of the train step as ShapeDtypeStructs: float32 master weights for the
    parameters in `paths`, the optimizer state for those only, the rest of the pruned model (and the dense model,
    for the losses that run it) as they are; on `mesh`, each with its logical-axis sharding (optimizer state like
    its parameter, its counters replicated)."""
    def model(config):
        abstract = transformer.abstract_params(config)
        if mesh is None:
            return abstract
        shardings = param_shardings(abstract, transformer.param_axes(config), mesh)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    paths = set(paths)
    trained, frozen_pruned = split_params(model(pruned_config), paths.__contains__)
    trained = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), trained)
    frozen = {"pruned": frozen_pruned}
    if loss_name in ("mse", "kd", "kd_cached"):
        frozen["dense"] = model(dense_config)
    opt_state = jax.eval_shape(tx.init, trained)
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        shardings = optax.tree_map_params(tx, lambda _, a: a.sharding, opt_state, trained,
                                          transform_non_params=lambda _: replicated)
        opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_state, shardings)
    return trained, opt_state, frozen


def abstract_batch(batch_size: int, seq_len: int, mesh=None) -> dict:
    """The train step's token batch as ShapeDtypeStructs, sharded as `_as_batch` places it."""
    sharding = None if mesh is None else batch_sharding(mesh, 2, batch_size)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
            for k in ("input_ids", "attention_mask")}


def _placed(tree, abstract):
    """`tree` on the shardings of its abstract twin (where it has them): the step is compiled for those."""
    return jax.tree.map(lambda a, s: a if s.sharding is None else jax.device_put(a, s.sharding), tree, abstract)


def _kept(tree):
    """A copy the train step does not donate (it donates the trained parameters it is given)."""
    return jax.tree.map(jnp.copy, tree)


def _as_batch(batch, mesh):
    if "x_in" in batch:  # cached span pairs
        out = {"x_in": jnp.asarray(batch["x_in"]), "target": jnp.asarray(batch["target"]),
               "attention_mask": jnp.asarray(batch["attention_mask"], jnp.int32)}
        if "input_ids" in batch:  # KD's (the MSE validation pairs kept in memory have none)
            out["input_ids"] = jnp.asarray(batch["input_ids"], jnp.int32)
    else:
        ids = np.asarray(batch["input_ids"])
        out = {"input_ids": jnp.asarray(ids, jnp.int32),
               "attention_mask": jnp.asarray(np.asarray(batch.get("attention_mask", np.ones_like(ids))), jnp.int32)}
    return place_batch(mesh, out)


# Validation pairs up to this size are computed once and kept (on the device, sharded like the batch): every later
# validation pass then runs only the block instead of the frozen prefix and span again.
VALID_PAIRS_BYTES = 1 << 30


def _validation_pairs(dense_model: Model, block: Block, batches: list, mesh) -> list[dict] | None:
    """The validation batches as (input, target) span pairs, or None where they would exceed VALID_PAIRS_BYTES."""
    first = np.asarray(batches[0]["input_ids"])
    if 2 * len(batches) * first.size * dense_model.config.hidden_size * 4 > VALID_PAIRS_BYTES:
        return None
    span_io = span_pairs_fn(dense_model.config, block.start, block.length)
    pairs = []
    for batch in batches:
        batch = _as_batch(batch, mesh)
        x_in, target = span_io(dense_model.params, batch["input_ids"], batch["attention_mask"])
        pairs.append({"x_in": x_in, "target": target, "attention_mask": batch["attention_mask"]})
    return pairs


def _evaluate(eval_step, block_params, frozen, batches, mesh):
    """The mean loss over real tokens; every batch is dispatched before the first result is read."""
    results = jax.device_get([eval_step(block_params, frozen, _as_batch(batch, mesh)) for batch in batches])
    total, weight = 0.0, 0.0
    for loss, n in results:
        total += float(loss) * float(n)
        weight += float(n)
    return total / max(weight, 1.0)


def _validate(state: "_LoopState", step, eval_step, frozen, valid, mesh):
    """Validate the trained parameters at `step`; keep them as the best if their loss is the lowest yet."""
    loss = _evaluate(eval_step, state.trained, frozen, valid, mesh)
    history = state.history
    history["valid"].append((step, loss))
    if history["best_valid"] is None or loss < history["best_valid"]:
        history["best_valid"], history["best_step"] = loss, step
        state.best = _kept(state.trained)  # the next step donates state.trained


class _LossLog:
    """The training losses, held on the device until a logging point: every `log_every` steps, and before each
    validation, checkpoint, interrupt and the end. Reading each micro-step's loss as it comes would make the host
    wait for the device at every step with nothing queued behind it; held, the host prepares and dispatches the
    next batches while the device runs. At a logging point every held loss is read at once: each step's goes into
    the history (with its learning rate) and to `on_step`, and a non-finite one stops the run naming its step."""

    def __init__(self, history, schedule, grad_accum, mode, on_step, bar, tokens_per_batch, micro):
        self.history, self.schedule, self.grad_accum, self.mode = history, schedule, grad_accum, mode
        self.on_step, self.bar, self.tokens_per_batch = on_step, bar, tokens_per_batch
        self.start_time, self.start_micro = time.perf_counter(), micro
        self.held = []  # (batches consumed, the last batch's loss on the device)

    def add(self, micro, loss):
        self.held.append((micro, loss))

    def flush(self, where):
        """Read every held loss; `where()` says where the last good checkpoint is (for a non-finite loss's error)."""
        held, self.held = self.held, []
        if not held:
            return
        losses = [float(loss) for loss in jax.device_get([loss for _, loss in held])]
        ends = [micro // self.grad_accum for micro, _ in held if micro % self.grad_accum == 0]
        lrs = iter(float(lr) for lr in jax.device_get([self.schedule(step - 1) for step in ends]))
        for (micro, _), loss in zip(held, losses):
            if not math.isfinite(loss):
                raise TrainingError(f"{self.mode} loss is {loss} at step {(micro - 1) // self.grad_accum + 1} "
                                    f"(batch {micro}); {where()}")
            if micro % self.grad_accum == 0:
                step = micro // self.grad_accum
                self.history["train"].append((step, loss, next(lrs)))
                if self.on_step is not None:
                    self.on_step(step, loss)
        if self.bar is not None and ends:
            elapsed = time.perf_counter() - self.start_time
            self.bar.update(len(ends))
            self.bar.set_postfix(loss=f"{self.history['train'][-1][1]:.4g}",
                                 tok_s=f"{(held[-1][0] - self.start_micro) * self.tokens_per_batch / elapsed:.0f}")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_manager(directory, keep=2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def _save(manager, step, state, history):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               history=ocp.args.JsonSave(history)))
    manager.wait_until_finished()


def _restore(manager, target):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                            history=ocp.args.JsonRestore()))
    except ValueError as e:
        if "tree structures do not match" not in str(e):
            raise
        raise TrainingError(f"{manager.directory} holds a training checkpoint (step {step}) of other trained "
                            f"parameters than these (another `trainable`, `freeze` or block, or a checkpoint "
                            f"written before trained parameters were a set): resume it with the settings it was "
                            f"written with, or start in an empty directory") from None
    return out["state"], out["history"]


@dataclasses.dataclass
class _LoopState:
    """What a training checkpoint holds: the trained parameters, their optimizer state, the best parameters so far,
    the data position (batches consumed) and the history."""

    trained: dict
    opt_state: object
    best: dict
    micro: int = 0
    history: dict = dataclasses.field(default_factory=lambda: {"train": [], "valid": [], "best_step": 0,
                                                               "best_valid": None, "wall_s": 0.0})

    def arrays(self) -> dict:
        return {"trained": self.trained, "opt_state": self.opt_state, "best": self.best,
                "micro": np.asarray(self.micro, np.int64)}


class _Checkpoints:
    """The loop state's Orbax checkpoints in `directory` (none without a directory). A directory that already holds
    one is refused unless `resume`."""

    def __init__(self, directory, resume: bool):
        self.directory, self.resume = directory, resume
        self.manager = _checkpoint_manager(directory) if directory else None
        self.last_good = self.manager.latest_step() if self.manager is not None else None
        if self.last_good is not None and not resume:
            raise TrainingError(f"{directory} already holds a training checkpoint (step {self.last_good}); "
                                f"pass resume=True to continue it, or use an empty directory")

    def restore(self, state: _LoopState) -> None:
        """Load the latest checkpoint into `state`, when resuming and there is one."""
        if self.manager is None or not self.resume:
            return
        restored = _restore(self.manager, state.arrays())
        if restored is not None:
            arrays, state.history = restored
            state.trained, state.opt_state, state.best = arrays["trained"], arrays["opt_state"], arrays["best"]
            state.micro = int(arrays["micro"])

    def save(self, step, state: _LoopState) -> None:
        if self.manager is None:
            return
        if self.manager.latest_step() != step:
            _save(self.manager, step, state.arrays(), state.history)
        self.last_good = step

    def where(self) -> str:
        """Where the last good checkpoint is, for an error."""
        if self.last_good is None:
            return "no checkpoint was saved"
        return f"the last good checkpoint is step {self.last_good} in {self.directory}"


# ----------------------------------------------------------------------------------------------------------------
# The training loop's parts


def _check_settings(mode, mse_weighting, lr_schedule, lr, min_lr, grad_accum, epochs, log_every, lr_beyond_block):
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; expected one of {MODES}")
    if mse_weighting not in MSE_WEIGHTINGS:
        raise ValueError(f"unknown mse_weighting {mse_weighting!r}; expected one of {MSE_WEIGHTINGS}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; expected one of {LR_SCHEDULES}")
    if not lr > 0 or not min_lr >= 0:
        raise ValueError(f"learning rates must be positive: lr={lr}, min_lr={min_lr}")
    if lr_beyond_block is not None and not lr_beyond_block > 0:
        raise ValueError(f"lr_beyond_block must be > 0 (or None: lr), got {lr_beyond_block}")
    if grad_accum < 1 or epochs < 1:
        raise ValueError(f"grad_accum and epochs must be >= 1, got {grad_accum}, {epochs}")
    if not isinstance(log_every, numbers.Integral) or log_every < 1:
        raise ValueError(f"log_every must be a whole number >= 1, got {log_every!r}")


def _chosen_block(pruned_config: ModelConfig, block_key) -> Block:
    blocks = trainable_blocks(pruned_config)
    if block_key is not None:
        blocks = [b for b in blocks if b.key == block_key]
    if not blocks:
        raise ValueError("the pruned model has no replacement block to train (replacement 'none'?)")
    if len(blocks) > 1:
        raise ValueError(f"the pruned model has {len(blocks)} replacement blocks ({[b.key for b in blocks]}); "
                         f"pass block_key= to train one at a time")
    return blocks[0]


@dataclasses.dataclass
class _TrainingData:
    """The re-iterable training and validation batches, and how many optimizer steps they give."""

    train: object
    valid: object | None
    first: dict  # the first training batch
    batches_per_epoch: int
    total_batches: int  # over every epoch
    num_steps: int
    shuffle_seed: int | None  # None: in order

    def batches_from(self, position):
        """The training batches from batch `position` (counted over epochs) to the last, each epoch in its order."""
        epochs = (self.train.epoch(e, self.shuffle_seed) if self.shuffle_seed is not None else iter(self.train)
                  for e in itertools.count())
        return itertools.islice(itertools.chain.from_iterable(epochs), position, self.total_batches)


def _training_data(train_batches, valid_batches, batch_size, epochs, grad_accum, num_steps, shuffle, seed,
                   pair_cache) -> _TrainingData:
    train_batches = _reiterable(train_batches, batch_size, "training")
    if valid_batches is not None:
        valid_batches = _reiterable(valid_batches, batch_size, "validation", pad_last=True)
    if shuffle and pair_cache is None and not hasattr(train_batches, "epoch"):
        raise ValueError("shuffle=True needs the training data as a sequence (a list of batches, or of chunks with "
                         "batch_size), or a pair_cache; a callable stream cannot be permuted")
    first = next(iter(train_batches), None)
    if first is None:
        raise ValueError("no training data: the training batches are empty")
    batches_per_epoch = sum(1 for _ in train_batches)
    total_batches = batches_per_epoch * epochs
    if num_steps is None:
        num_steps = total_batches // grad_accum
    if num_steps < 1:
        raise ValueError(f"not enough data for one optimizer step: {batches_per_epoch} batches per epoch x {epochs} "
                         f"epoch(s) with grad_accum={grad_accum}; the batch may be larger than the data")
    if num_steps * grad_accum > total_batches:
        raise ValueError(f"num_steps={num_steps} x grad_accum={grad_accum} needs {num_steps * grad_accum} batches, "
                         f"but the data gives {total_batches}")
    return _TrainingData(train_batches, valid_batches, first, batches_per_epoch, total_batches, num_steps,
                         seed if shuffle else None)


def _read_from_pair_cache(data: _TrainingData, pair_cache, dense_model: Model, block: Block, progress) -> None:
    """Switch `data` to the span's (input, target) pairs in tensorstore arrays at `pair_cache` (built first unless a
    finished cache of the same span and size is there); validation's go in its `valid` folder."""
    rows = data.batches_per_epoch * len(np.asarray(data.first["input_ids"]))
    cache = SpanPairCache(pair_cache, block.start, block.length)
    if not cache.complete(rows):
        cache.build(dense_model, data.train, progress)
    data.train = cache.batches()
    if data.valid is not None:
        valid_rows = sum(len(np.asarray(b["input_ids"])) for b in data.valid)
        valid_cache = SpanPairCache(Path(pair_cache) / "valid", block.start, block.length)
        if not valid_cache.complete(valid_rows):
            valid_cache.build(dense_model, data.valid, progress=False)
        data.valid = valid_cache.batches()


def _train_loop(state: _LoopState, data: _TrainingData, train_step, eval_step, frozen, valid, mesh, log: _LossLog,
                checkpoints: _Checkpoints, *, grad_accum, eval_every, checkpoint_every, log_every):
    """Optimizer steps from `state` to the last, validating, checkpointing and logging on the way."""
    num_steps = data.num_steps
    step = state.micro // grad_accum
    # Ctrl-C stops only between steps, after a checkpoint of that step: whatever the moment it comes, the checkpoint
    # is one consistent (step, data position, block, optimizer state, history) and a resume ends bitwise as an
    # uninterrupted run would.
    with deferred_interrupts() as interrupt:
        for batch in data.batches_from(state.micro):
            _loop_point("batch")
            if step >= num_steps:
                break
            state.trained, state.opt_state, loss = train_step(state.trained, state.opt_state, frozen,
                                                              _as_batch(batch, mesh))
            _loop_point("stepped")
            state.micro += 1
            log.add(state.micro, loss)
            if state.micro % grad_accum:
                continue
            step += 1
            _loop_point("logged")
            last = step == num_steps
            validate = valid is not None and (step % eval_every == 0 or last)
            save = checkpoints.manager is not None and (step % checkpoint_every == 0 or last)
            if validate or save or last or interrupt.pending or step % log_every == 0:
                log.flush(checkpoints.where)  # a checkpoint never holds a step past a non-finite loss
            if validate:
                _validate(state, step, eval_step, frozen, valid, mesh)
                _loop_point("validated")
            elif valid is None:
                state.best = state.trained
            if save:
                checkpoints.save(step, state)
                _loop_point("saved")
            if interrupt.pending:
                checkpoints.save(step, state)
                break  # the guard raises KeyboardInterrupt
        log.flush(checkpoints.where)


# ----------------------------------------------------------------------------------------------------------------
# Public API


def train_replacement(dense_model: Model, pruned_model: Model, train_batches: Iterable[dict],
                      options: TrainOptions | None = None, *, valid_batches: Iterable[dict] | None = None,
                      checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                      block_key: str | None = None, on_step=None, batch_size: int | None = None,
                      pair_cache: str | Path | None = None, remat: str = "none", return_history: bool = False,
                      **option_changes):
    """Train the pruned model's replacement block (or the `trainable` parameters); return the pruned model with the
    trained (best) parameters. The training options are `options` (a TrainOptions; default: its defaults) with
    `option_changes` (TrainOptions fields by name, e.g. lr=1e-3) over them.

    `train_batches` / `valid_batches`: re-iterable collections of {"input_ids", "attention_mask"} [B, T] arrays
    (e.g. a list, or `data.batches` over a chunk source), read in order; one epoch is one pass. With
    `return_history`, also return {"train": [(step, loss, lr)], "valid": [(step, loss)], "best_step", "wall_s"}.
    `log_every`: the losses stay on the device and are read every this many steps (and before each validation,
    checkpoint and the end), so that the host never waits for the device between steps; then every step's loss goes
    into the history and to `on_step(step, loss)`, called once per optimizer step in order, and the progress bar
    moves. A non-finite loss stops the run with a TrainingError naming the step it came at, at the next logging
    point (before any checkpoint of a later step); `log_every=1` reads each step's loss as it comes (the slowest).
    With `batch_size`, the data are token chunks ([T] arrays, or a callable returning a fresh iterator of them) that
    are batched here. With `pair_cache` (modes mse and kd), the dense span's (input, target) pairs are computed once
    into tensorstore arrays at that path (or reused if a finished cache for the same span is there) and every epoch
    reads them from disk; in KD mode the teacher then runs from the span's output and a student whose prefix is the
    teacher's from its input.
    `mse_weighting="token"` makes the MSE relative per token (see `masked_mse`). `shuffle`: each epoch reads the
    training chunks (with `batch_size`), the batches of a list, or the cached rows in a fresh permutation drawn from
    `seed`; validation keeps its order. Validation chunks are never dropped: a short last batch is padded with
    masked rows. `lr_schedule`: "cosine" or "cosine-cycle" (see `lr_schedule`). `freeze`: regexes over the block's
    parameter paths (e.g. ("self_attn", "input_layernorm")) whose parameters stay as initialised. `trainable`:
    regexes matched in full over the pruned model's parameter paths ("segments/seg_2/.*mlp.*", "lm_head/.*"; `block`
    stands for the block's), whole leaves only (a stacked segment's layers train together); see `trained_paths`.
    MSE mode trains the block only. Everything else stays bitwise as it was, and has no optimizer state.
    `lr_beyond_block`: the peak lr of the trained parameters outside the block, on the same schedule (None: lr).

    `mode="kd"`: (1 - kd_ce_weight) x kd_temperature^2 x KL(teacher || student) at temperature kd_temperature over
    real tokens, + kd_ce_weight x the next-token cross-entropy, + kd_hidden_weight x the mean MSE (`mse_weighting`)
    between the teacher's and the student's hidden states leaving the span and leaving each original layer in
    `kd_hidden_layers` (after the span; negative numbers count from the last layer) and every `kd_hidden_every`-th
    original layer after the span's output (those another span pruned skipped).
    `remat`: a `transformer.remat_policy` name for the layers the gradient runs through (the run takes it from its
    stage layout in configs/meshes.yaml). The train step donates the trained parameters and the optimizer state.
    """
    o = (options or TrainOptions()).replace(**option_changes)
    mode, num_steps, epochs, lr, min_lr, warmup_steps = o.mode, o.num_steps, o.epochs, o.lr, o.min_lr, o.warmup_steps
    weight_decay, clip_norm, grad_accum, lr_schedule = o.weight_decay, o.clip_norm, o.grad_accum, o.lr_schedule
    eval_every, checkpoint_every, log_every, seed, shuffle = o.eval_every, o.checkpoint_every, o.log_every, o.seed, \
        o.shuffle
    compute_dtype, freeze, trainable, mse_weighting = o.compute_dtype, o.freeze, o.trainable, o.mse_weighting
    kd_temperature, kd_ce_weight, kd_hidden_layers, kd_hidden_weight = o.kd_temperature, o.kd_ce_weight, \
        o.kd_hidden_layers, o.kd_hidden_weight
    _check_settings(mode, mse_weighting, lr_schedule, lr, min_lr, grad_accum, epochs, log_every, o.lr_beyond_block)
    if not dense_model.config.is_dense:
        raise ValueError("dense_model must be the unpruned model (its layers are the MSE teacher)")
    block = _chosen_block(pruned_model.config, block_key)
    paths = set(trained_paths(pruned_model.params, block, trainable, freeze))
    if mode == "mse" and not all(p.startswith(f"segments/{block.key}/") for p in paths):
        raise ValueError(f"mode 'mse' trains the block only (its loss depends on nothing else); trainable "
                         f"{list(trainable)} selects more: use mode 'lm' or 'kd'")
    kd = distillation_settings(dense_model.config, pruned_model.config, block, paths, kd_temperature, kd_ce_weight,
                               kd_hidden_layers, kd_hidden_weight, o.kd_hidden_every) if mode == "kd" else None
    data = _training_data(train_batches, valid_batches, batch_size, epochs, grad_accum, num_steps, shuffle, seed,
                          pair_cache)
    num_steps = data.num_steps
    warmup_steps = warmup_steps_for(num_steps, warmup_steps)
    eval_every = eval_every or max(1, num_steps // 5)
    checkpoint_every = checkpoint_every or eval_every

    result_config = pruned_model.config
    if compute_dtype is not None:  # the products' input dtype for this training only (the models' own otherwise)
        dense_model = with_compute_dtype(dense_model, compute_dtype)
        pruned_model = with_compute_dtype(pruned_model, compute_dtype)
    mesh = pruned_model.mesh
    loss_name = mode
    checkpoints = _Checkpoints(checkpoint_dir, resume)
    if pair_cache is not None:
        if mode == "lm":
            raise ValueError("pair_cache is for modes 'mse' and 'kd' (the LM loss runs no dense span)")
        if not (resume and (checkpoints.last_good or 0) >= num_steps):  # a finished training reads no pairs
            _read_from_pair_cache(data, pair_cache, dense_model, block, progress)
        loss_name = f"{mode}_cached"
    program = training_program(dense_model.config, pruned_model.config, block, paths, loss_name, lr=lr, min_lr=min_lr,
                               warmup_steps=warmup_steps, num_steps=num_steps, weight_decay=weight_decay,
                               clip_norm=clip_norm, grad_accum=grad_accum, lr_schedule=lr_schedule, kd=kd,
                               mse_weighting=mse_weighting, remat=remat, mesh=mesh,
                               lr_beyond_block=o.lr_beyond_block)
    tx, schedule, train_step, eval_step = program.tx, program.schedule, program.train_step, program.eval_step
    # float32 master weights for what trains, whatever the compute dtype (a copy: the train step donates it); the
    # rest as it is
    initial, frozen_params = split_params(pruned_model.params, paths.__contains__)
    block_params = _placed(jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), initial), program.arguments[0])
    frozen = {"pruned": frozen_params}
    if loss_name in ("mse", "kd", "kd_cached"):
        frozen["dense"] = dense_model.params

    valid = list(data.valid) if data.valid is not None else None
    if valid and loss_name == "mse":  # the frozen span's validation pairs once, not on every pass
        pairs = _validation_pairs(dense_model, block, valid, mesh)
        if pairs is not None:
            cached_loss = _partial(cached_mse_loss, dense_config=dense_model.config, pruned_config=pruned_model.config,
                                   block=block, weighting=mse_weighting)
            valid, eval_step = pairs, make_steps(cached_loss, tx, transformer.compute_dtype(pruned_model.config))[1]

    # the best parameters are a copy: the train step donates the trained ones
    state = _LoopState(block_params, _placed(tx.init(block_params), program.arguments[1]), _kept(block_params))
    checkpoints.restore(state)
    tokens_per_batch = int(np.sum(np.asarray(data.first.get("attention_mask", np.ones_like(data.first["input_ids"])))))
    bar = _progress(progress, num_steps, state.micro // grad_accum)
    log = _LossLog(state.history, schedule, grad_accum, mode, on_step, bar, tokens_per_batch, state.micro)
    start_time = time.perf_counter()
    if valid is not None and not state.history["valid"] and state.micro // grad_accum == 0:
        _validate(state, 0, eval_step, frozen, valid, mesh)
    try:
        _train_loop(state, data, train_step, eval_step, frozen, valid, mesh, log, checkpoints, grad_accum=grad_accum,
                    eval_every=eval_every, checkpoint_every=checkpoint_every, log_every=log_every)
    finally:
        if bar is not None:
            bar.close()
    history = state.history
    history["wall_s"] += time.perf_counter() - start_time
    best = state.trained if valid is None else state.best
    best = jax.tree.map(lambda a, like: a.astype(like.dtype), best, initial)
    trained = pruned_model.replace(config=result_config, params=merge_params(best, frozen_params))
    if checkpoint_dir:
        write_atomic(Path(checkpoint_dir) / "loss_curve.json", json.dumps(history, indent=1))
    return (trained, history) if return_history else trained


# Tests set this to a function of a point name ("batch", "stepped", "logged": a step counted, "validated", "saved")
# to interrupt the training loop exactly there.
LOOP_HOOK = None


def _loop_point(name):
    if LOOP_HOOK is not None:
        LOOP_HOOK(name)


def _epoch_order(n, shuffle_seed, epoch):
    """Indices 0..n-1 in order, or in epoch `epoch`'s permutation under `shuffle_seed` (the same on a resume)."""
    if shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


class _Batched:
    """Re-iterable batches over re-iterable chunks (a sequence, or a callable returning a fresh iterator). Training
    drops a short last batch; validation pads it (`pad_last`) so that no chunk is left out."""

    def __init__(self, chunks, batch_size, pad_last=False):
        self.chunks, self.batch_size, self.pad_last = chunks, batch_size, pad_last
        if _indexable(chunks):
            self.epoch = self._epoch

    def _epoch(self, e, shuffle_seed=None):
        return self._stack(self.chunks[i] for i in _epoch_order(len(self.chunks), shuffle_seed, e))

    def __iter__(self):
        return self._stack(self.chunks() if callable(self.chunks) else self.chunks)

    def _stack(self, chunks):
        return batch_chunks(chunks, self.batch_size, drop_last=not self.pad_last, pad_last=self.pad_last)


class _BatchList:
    """A list of ready batches, read in order or (`epoch`) in a permutation of the batches."""

    def __init__(self, batch_list):
        self.batch_list = batch_list

    def epoch(self, e, shuffle_seed=None):
        return (self.batch_list[i] for i in _epoch_order(len(self.batch_list), shuffle_seed, e))

    def __iter__(self):
        return iter(self.batch_list)


def _reiterable(data, batch_size, what, pad_last=False):
    if batch_size is None:
        if callable(data):
            return _Fresh(data)
        if iter(data) is data:
            raise ValueError(f"the {what} batches must be re-iterable (a list, or a callable returning an iterator), "
                             f"not a one-shot iterator")
        return _BatchList(data) if _indexable(data) else data
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not callable(data) and iter(data) is data:
        raise ValueError(f"the {what} chunks must be re-iterable (a list, or a callable returning an iterator)")
    count = sum(1 for _ in itertools.islice(data() if callable(data) else data, batch_size))
    if count < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {what} data ({count} chunks)")
    return _Batched(data, batch_size, pad_last)


def _indexable(data):
    return not callable(data) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


class _Fresh:
    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return iter(self.factory())


def _partial(fn, **kwargs):
    def bound(block_params, frozen, batch):
        return fn(block_params, frozen, batch, **kwargs)
    return bound


def _progress(enabled, total, initial, desc="train block", unit="step"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit)
