"""The training losses: MSE of the block against the dense span (from the frozen model or a pair cache), the pruned
model's next-token cross-entropy, and distillation from the dense teacher (the KD loss with its custom VJP, reduced a
chunk of tokens at a time)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..backend import jit_for
from ..models import transformer
from ..models.config import ModelConfig
from .params import Block, merge_params


def _dense_prefix(config: ModelConfig, params, input_ids, mask, start):
    """The dense model's hidden state entering layer `start`, with the attention mask and positions."""
    attn, positions = transformer.causal_masks(config, mask)
    x = transformer.embed(config, params, input_ids, positions)
    x, _ = transformer.run_layers(config, params, x, attn, positions, 0, start)
    return x, attn, positions


def _dense_span_io(config: ModelConfig, params, input_ids, mask, start, length):
    """The dense model's hidden states entering layer `start` and leaving layer `start+length-1` (no gradient)."""
    x_in, attn, positions = _dense_prefix(config, params, input_ids, mask, start)
    target, _ = transformer.run_layers(config, params, x_in, attn, positions, start, start + length)
    return jax.lax.stop_gradient(x_in), jax.lax.stop_gradient(target), attn, positions


def span_pairs(config: ModelConfig, params, ids, mask, start, length):
    """The dense span's (input, target) in float32, not jitted: for use inside another jitted function."""
    x_in, target, _, _ = _dense_span_io(config, params, ids, mask, start, length)
    return x_in.astype(jnp.float32), target.astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def span_pairs_fn(config: ModelConfig, start, length):
    """A jitted (params, ids, mask) -> (input, target) in float32: the span's pairs for a pair cache or validation
    (one function per span, so the training, validation and distillation caches compile it once)."""
    def span_io(params, ids, mask):
        return span_pairs(config, params, ids, mask, start, length)

    return jit_for(transformer.compute_dtype(config), span_io)


def mse_token_weights(target, mask, weighting="uniform"):
    """[B, T] float32: each token's weight in `masked_mse`, which is the weighted sum of the tokens' mean squared
    errors (the closed-form fits weigh their least squares the same way, `linear_fit`)."""
    real = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(real), 1.0)
    if weighting == "uniform":
        return real / count
    size = jnp.mean(jnp.square(target.astype(jnp.float32)), axis=-1)
    per_token = real / (size + 1e-6) / count
    if weighting == "token":
        return per_token
    return 0.5 * (real / (jnp.sum(size * real) + 1e-6) + per_token)


def masked_mse(out, target, mask, weighting="uniform"):
    """Mean squared error over real tokens. In SmolLM2 the span's output at position 0 carries a massive activation
    (norm ~23,000 against ~200 elsewhere) that makes up ~98% of the plain (`uniform`) MSE of a block that starts as
    the identity. `token` divides each token's error by its target's mean square, so that token counts as one of
    many; `balanced` is the mean of the two relative errors (the batch's summed error over its summed target
    square, and `token`'s), so the massive tokens and the rest each steer about half of the gradient."""
    err = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return jnp.sum(err * mse_token_weights(target, mask, weighting))


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


def _next_token_labels(ids, mask):
    """(real [B, T], next_real [B, T], labels [B, T]) float32 masks and ids: position t's label is token t+1, real
    where both are real tokens; the last position has none (zeros)."""
    b = ids.shape[0]
    real = mask.astype(jnp.float32)
    next_real = jnp.concatenate([real[:, 1:] * real[:, :-1], jnp.zeros((b, 1), jnp.float32)], axis=1)
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    return real, next_real, labels


def lm_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, remat="none"):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    params = merge_params(trained, frozen["pruned"])
    hidden = transformer.apply(pruned_config, params, ids, mask, return_logits=False,
                               remat=transformer.remat_policy(remat))["last_hidden"]
    b, t = ids.shape
    _, next_real, labels = _next_token_labels(ids, mask)
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
    attn, positions = transformer.causal_masks(pruned_config, mask)
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
    top_k: int = 0  # the teacher's logits as its top k read from the batch (TOP_K_ARRAYS; 0: the full vocabulary)


HEAD_KEYS = transformer.HEAD_KEYS


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
    return transformer.chunk_tokens(chunk, *arrays)


def _cross_entropy_and_grad(logits_s, label, w_ce, with_grad, lse=None):
    """sum of w_ce x the cross-entropy of `label` under [chunk, vocab] float32 logits, and its gradient in them
    (softmax - onehot; None without `with_grad`). `lse`: the logits' logsumexp where already at hand."""
    lse = jax.nn.logsumexp(logits_s, axis=-1, keepdims=True) if lse is None else lse
    loss = -jnp.sum((jnp.take_along_axis(logits_s, label[:, None], axis=-1) - lse)[:, 0] * w_ce)
    if not with_grad:
        return loss, None
    onehot = jax.nn.one_hot(label, logits_s.shape[-1], dtype=jnp.float32)
    return loss, (jnp.exp(logits_s - lse) - onehot) * w_ce[:, None]


def _frozen_head_loss(student_config, student_params, student_h, frozen, rest, chunk_loss):
    """sum over chunks of tokens of `chunk_loss(frozen, logits_s, *x, with_grad)` -> (loss, its gradient in the
    student's [chunk, vocab] float32 logits or None), the student's head run on [N, D] `student_h` a chunk at a time
    with the [N, ...] arrays `rest` (`_token_chunks`). Differentiable in `student_h` only (the head and `frozen` get no
    gradient): each chunk's input gradient is made in the forward pass, so the backward pass recomputes no logits.
    Memory holds one chunk's [chunk, vocab] and the [N, D] input gradient."""
    xs = _token_chunks(student_config.vocab_size, student_h, *rest)

    def chunk_loss_and_grad(head_params, frozen, h_s, x, with_grad):
        head_s = lambda h: transformer.head(student_config, head_params, h[None])[0]
        logits_s, head_vjp = jax.vjp(head_s, h_s) if with_grad else (head_s(h_s), None)
        loss, dlogits = chunk_loss(frozen, logits_s.astype(jnp.float32), *x, with_grad=with_grad)
        return loss, head_vjp(dlogits.astype(logits_s.dtype))[0] if with_grad else None

    @jax.custom_vjp
    def summed(h_s, frozen):
        return summed_fwd(h_s, frozen, with_grad=False)[0]  # not differentiated (validation): no gradient made

    def summed_fwd(h_s, frozen, with_grad=True):
        def body(total, x):
            loss, dh = chunk_loss_and_grad(frozen[0], frozen[1], x[0], x[1:], with_grad)
            return total + loss, dh

        return jax.lax.scan(body, jnp.float32(0), (h_s,) + frozen[2])

    def summed_bwd(dh, g):
        return g * dh, None  # the head, `frozen` and the other arrays get no gradient

    summed.defvjp(summed_fwd, summed_bwd)
    head_params = {k: student_params[k] for k in HEAD_KEYS if k in student_params}
    return summed(xs[0], (head_params, frozen, xs[1:]))


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

    def chunk_loss(teacher_heads, logits_s, h_t, label, w_kl, w_ce, with_grad=True):
        logits_t = transformer.head(teacher_config, teacher_heads, h_t[None])[0].astype(jnp.float32)
        # KL from the scaled logits and their logsumexps (sum p_t = 1), the log-probabilities never written out:
        # fewer passes over the [chunk, vocab] arrays (~15% faster on CPU)
        z_t, z_s = logits_t / temperature, logits_s / temperature
        lse_t = jax.nn.logsumexp(z_t, axis=-1, keepdims=True)
        lse_s = jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
        p_t = jnp.exp(z_t - lse_t)
        kl = jnp.sum(p_t * (z_t - z_s), axis=-1) - (lse_t - lse_s)[:, 0]
        loss = jnp.sum(kl * w_kl) * temperature ** 2
        dlogits = temperature * (jnp.exp(z_s - lse_s) - p_t) * w_kl[:, None] if with_grad else None
        return _with_cross_entropy(loss, dlogits, logits_s, lse_s if temperature == 1 else None, label, w_ce,
                                   with_ce, with_grad)

    teacher_heads = {k: teacher_params[k] for k in HEAD_KEYS if k in teacher_params}
    return _frozen_head_loss(student_config, student_params, student_h, teacher_heads,
                             (teacher_h, labels, kl_weight, ce_weight), chunk_loss)


def _with_cross_entropy(loss, dlogits, logits_s, lse, label, w_ce, with_ce, with_grad):
    """(loss, dlogits) plus the cross-entropy's (where `with_ce`)."""
    if not with_ce:
        return loss, dlogits
    ce, dce = _cross_entropy_and_grad(logits_s, label, w_ce, with_grad, lse)
    return loss + ce, dlogits + dce if with_grad else None


# The teacher's top-k cache (`TeacherTopKCache`): per token, the k largest log-probabilities at the temperature, their
# token ids, and the log of the mass left outside them (the tail).
TOP_K_ARRAYS = ("top_logp", "top_ids", "tail_logp")


def _top_k_of(z, k):
    """([c, k] log-probabilities and ids of the k largest of [c, V] scaled logits z, [c] log-mass of the others)."""
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    top, ids = jax.lax.top_k(z, k)
    in_top = _in_top(z.shape, ids)
    return top - lse, ids.astype(jnp.int32), _tail_log_mass(z, in_top, lse)


def _in_top(shape, ids):
    """[c, V] bool: where each row's `ids` [c, k] are."""
    return jnp.zeros(shape, bool).at[jnp.arange(shape[0])[:, None], ids].set(True)


def _tail_log_mass(z, in_top, lse):
    """[c] log of the softmax mass of z outside `in_top` (-inf where nothing is outside), computed from the logits
    outside (not 1 - the top's sum, which loses a small tail to rounding)."""
    return jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, z), axis=-1) - lse[:, 0]


def teacher_top_k_fn(config: ModelConfig, first_layer: int, k: int, temperature: float):
    """A jitted (params, x [B, T, D], mask) -> {TOP_K_ARRAYS}: the dense model run from hidden state x entering
    `first_layer` (a span's cached output) to its next-token distribution at `temperature`, kept as its top k
    log-probabilities and ids [B, T, k] and the tail's log-mass [B, T]; the head a chunk of tokens at a time."""
    def top_k(params, x, mask):
        attn, positions = transformer.causal_masks(config, mask)
        h, _ = transformer.run_layers(config, params, x, attn, positions, first_layer)
        b, t, d = h.shape
        heads = {name: params[name] for name in HEAD_KEYS if name in params}
        (chunks,) = _token_chunks(config.vocab_size, h.reshape(b * t, d))
        z = lambda c: transformer.head(config, heads, c[None])[0].astype(jnp.float32) / temperature
        logp, ids, tail = jax.lax.map(lambda c: _top_k_of(z(c), k), chunks)
        tokens = lambda a: a.reshape((-1,) + a.shape[2:])[:b * t].reshape((b, t) + a.shape[2:])  # padding dropped
        return {"top_logp": tokens(logp), "top_ids": tokens(ids), "tail_logp": tokens(tail)}

    return jit_for(transformer.compute_dtype(config), top_k)


def top_k_distillation_loss(student_config, student_params, student_h, teacher_top, labels, kl_weight, ce_weight,
                            temperature):
    """`distillation_loss` against a teacher kept as its top k (`teacher_top`: the [N, k] log-probabilities at the
    temperature and ids and the [N] tail log-mass, `teacher_top_k_fn`'s): T^2 KL over k + 1 outcomes, the teacher's
    k most likely tokens and the rest of the vocabulary as one bucket (the "other bucket" of MaxText's distillation
    forks; the student's bucket mass from its full log-softmax). Why the bucket rather than renormalising both over
    the top k (the other common choice): it is the KL of the two distributions coarsened the same way, so it never
    exceeds the full KL and equals it at k = vocab, and the student still pays for mass it moves outside the
    teacher's top k, which renormalising cannot see. The student's logits are made a chunk at a time and k of them
    gathered, so memory stays flat in the vocabulary; the gradient in them, made in the forward pass: T (p_s - p_t)
    on the top k, T p_s (1 - tail_t / tail_s) on the tail. The student's head is frozen."""
    with_ce = ce_weight is not None
    ce_weight = jnp.zeros_like(kl_weight) if ce_weight is None else ce_weight

    def chunk_loss(_, logits_s, top_logp, top_ids, tail_t, label, w_kl, w_ce, with_grad=True):
        z_s = logits_s / temperature
        lse_s = jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
        in_top = _in_top(z_s.shape, top_ids)
        tail_s = _tail_log_mass(z_s, in_top, lse_s)
        p_top, has_tail = jnp.exp(top_logp), jnp.isfinite(tail_t)  # k = vocab: no tail, its term 0
        logp_s_top = jnp.take_along_axis(z_s, top_ids, axis=-1) - lse_s
        tail_term = jnp.where(has_tail, jnp.exp(tail_t) * (tail_t - jnp.where(has_tail, tail_s, 0)), 0)
        kl = jnp.sum(p_top * (top_logp - logp_s_top), axis=-1) + tail_term
        loss = jnp.sum(kl * w_kl) * temperature ** 2
        dlogits = None
        if with_grad:
            # p_s tail_t / tail_s in the log domain: the ratio alone can overflow where the student's tail is tiny
            log_ratio = jnp.where(has_tail, tail_t - jnp.where(has_tail, tail_s, 0), 0)
            p_t_top = jnp.zeros_like(z_s).at[jnp.arange(z_s.shape[0])[:, None], top_ids].set(p_top)
            p_s = jnp.exp(z_s - lse_s)
            dz = jnp.where(in_top, p_s - p_t_top, p_s - jnp.exp(z_s - lse_s + log_ratio[:, None]))
            dlogits = temperature * dz * w_kl[:, None]
        return _with_cross_entropy(loss, dlogits, logits_s, lse_s if temperature == 1 else None, label, w_ce,
                                   with_ce, with_grad)

    return _frozen_head_loss(student_config, student_params, student_h, None, (*teacher_top, labels, kl_weight,
                                                                                ce_weight), chunk_loss)


def vocab_split_heads(params: dict, mesh) -> dict:
    """What the LM head reads of `params` (`HEAD_KEYS`), its vocabulary matrix (`lm_head` [embed, vocab], or the tied
    `embed_tokens` [vocab, embed]) resharded once per step with the vocabulary split over the fsdp and tensor axes
    together and the embedding dimension whole. FSDP shards the embedding dimension, so the chunk loops of the
    distillation losses gathered the whole matrix on every device, in every chunk, for the teacher, the student and
    the student's input gradient: qwen2.5-7b (a 152k vocabulary) on 2 fsdp x 4 tensor devices held three 260 MiB
    gathered copies per device at once. Resharded, each device holds its 1/8 of the vocabulary (130 MiB) and the
    chunk's logits are split the same way (their softmax sums reduce across devices). As they are without a mesh or
    with one fsdp device (the vocabulary is already split over all the others)."""
    heads = {k: params[k] for k in HEAD_KEYS if k in params}
    if mesh is None or mesh.shape.get("fsdp", 1) == 1:
        return heads
    split = ("fsdp", "tensor")
    name, spec = ("lm_head", P(None, split)) if "lm_head" in heads else ("embed_tokens", P(split, None))
    heads[name] = jax.lax.with_sharding_constraint(heads[name], NamedSharding(mesh, spec))
    return heads


def kd_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, kd: Distillation,
            weighting="uniform", remat="none", mesh=None):
    """(1 - ce_weight) KL + ce_weight CE (+ hidden_weight x the mean hidden-state MSE), over real tokens. `remat`
    applies to the student's layers (the teacher's get no gradient)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dense_params, pruned = frozen["dense"], merge_params(trained, frozen["pruned"])
    if kd.shared_prefix:  # the frozen prefix once, for both
        x, attn, positions = _dense_prefix(dense_config, dense_params, ids, mask, block.start)
        teacher = (jax.lax.stop_gradient(x), block.start)
        return _distill_from(teacher, teacher, trained, frozen, batch, attn, positions, dense_config=dense_config,
                             pruned_config=pruned_config, block=block, kd=kd, weighting=weighting, remat=remat,
                         mesh=mesh)
    attn, positions = transformer.causal_masks(dense_config, mask)
    teacher = (transformer.embed(dense_config, dense_params, ids, positions), 0)
    student = (transformer.embed(pruned_config, pruned, ids, positions), 0)
    return _distill_from(teacher, student, trained, frozen, batch, attn, positions, dense_config=dense_config,
                         pruned_config=pruned_config, block=block, kd=kd, weighting=weighting, remat=remat,
                         mesh=mesh)


def cached_kd_loss(trained, frozen, batch, *, dense_config, pruned_config, block: Block, kd: Distillation,
                   weighting="uniform", remat="none", mesh=None):
    """`kd_loss` with the dense span's input and output read from a `SpanPairCache`: the teacher runs from the
    span's output, the student from the span's input where its prefix is the teacher's (else from its embeddings)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pruned = merge_params(trained, frozen["pruned"])
    attn, positions = transformer.causal_masks(dense_config, mask)
    teacher = (batch["target"], block.start + block.length)
    student = ((batch["x_in"], block.start) if kd.shared_prefix
               else (transformer.embed(pruned_config, pruned, ids, positions), 0))
    return _distill_from(teacher, student, trained, frozen, batch, attn, positions, dense_config=dense_config,
                         pruned_config=pruned_config, block=block, kd=kd, weighting=weighting, remat=remat,
                         mesh=mesh)


def _distill_from(teacher, student, trained, frozen, batch, attn, positions, *, dense_config, pruned_config,
                  block: Block, kd: Distillation, weighting, remat, mesh=None):
    """KD's loss with the teacher's hidden state entering its (dense) layer number and the student's entering its
    original layer number (0 or the block's start): (hidden state, layer) each."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dense_params, pruned = frozen["dense"], merge_params(trained, frozen["pruned"])
    (x_t, teacher_first), (x_s, original_first) = teacher, student
    student_first = 0
    if original_first:  # the student starts at the block: the layers before it are the teacher's
        student_first = transformer.layer_offsets(pruned_config)[transformer.segment_index(block.key)]
    teacher_stops, student_stops = [t for t, _ in kd.hidden_pairs], [s for _, s in kd.hidden_pairs]
    # a span ending at the last layer leaves a cached teacher no layers to run; with its top k read from the batch,
    # the teacher runs only as far as the hidden-state terms need (no further, no head)
    teacher_last = max([teacher_first] + [s + 1 for s in teacher_stops]) if kd.top_k else None
    h_t, hidden_t = x_t, {}
    if teacher_last != teacher_first:
        h_t, hidden_t = transformer.run_layers(dense_config, dense_params, x_t, attn, positions, teacher_first,
                                               teacher_last, stops=teacher_stops)
    if teacher_first - 1 in teacher_stops:  # a cached span output is the teacher's last layer before teacher_first
        hidden_t[teacher_first - 1] = x_t
    h_t, hidden_t = jax.lax.stop_gradient((h_t, hidden_t))
    h_s, hidden_s = transformer.run_layers(pruned_config, pruned, x_s, attn, positions, student_first,
                                           stops=student_stops, remat=remat)
    b, t = ids.shape
    real, next_real, labels = _next_token_labels(ids, mask)
    # per-token weights: each term's share of the loss over its count of tokens
    kl_weight = ((1 - kd.ce_weight) * real / jnp.maximum(jnp.sum(real), 1.0)).reshape(-1)
    ce_weight = (kd.ce_weight * next_real / jnp.maximum(jnp.sum(next_real), 1.0)).reshape(-1)
    ce_weight = ce_weight if kd.ce_weight else None
    student_heads = vocab_split_heads(pruned, mesh)
    if kd.top_k:
        teacher_top = tuple(batch[name].reshape((b * t,) + batch[name].shape[2:]) for name in TOP_K_ARRAYS)
        loss = top_k_distillation_loss(pruned_config, student_heads, h_s.reshape(b * t, -1), teacher_top,
                                       labels.reshape(-1), kl_weight, ce_weight, kd.temperature)
    else:
        flat = (dense_config, vocab_split_heads(dense_params, mesh), pruned_config, student_heads,
                h_t.reshape(b * t, -1), h_s.reshape(b * t, -1), labels.reshape(-1), kl_weight)
        head_trains = any(k in trained for k in HEAD_KEYS)  # then autodiff through its recomputed logits
        loss = (distillation_loss_by_autodiff if head_trains else distillation_loss)(*flat, ce_weight,
                                                                                     kd.temperature)
    if kd.hidden_weight and kd.hidden_pairs:
        mse = [masked_mse(hidden_s[s], hidden_t[t], mask, weighting) for t, s in kd.hidden_pairs]
        loss += kd.hidden_weight * sum(mse) / len(mse)
    return loss


LOSSES = {"mse": mse_loss, "lm": lm_loss, "kd": kd_loss, "mse_cached": cached_mse_loss, "kd_cached": cached_kd_loss}


def dense_params_read(loss_name: str, dense_config: ModelConfig, params, block: Block):
    """What of the dense model's parameters `params` the loss `loss_name` reads, for the train step's arguments
    (None: nothing). The cached distillation runs the teacher from the span's output: the stack segments that end
    by then are left out, so that they can be offloaded meanwhile (`offload.offloaded`)."""
    if loss_name in ("mse", "kd"):
        return params
    if loss_name != "kd_cached":
        return None
    end = block.start + block.length
    after = {key for key, seg, first in transformer.segment_starts(dense_config) if first + seg.num_layers > end}
    return {**params, "segments": {k: v for k, v in params["segments"].items() if k in after}}
