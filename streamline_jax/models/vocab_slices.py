"""The LM head's vocabulary product a slice of the vocabulary at a time, for heads stored narrower than their products
(bfloat16 weights, float32 products: CPUs without bf16 dots).

Converted for its product whole, such a head is a float32 copy of the largest matrix (2 GiB for Qwen2.5-7B's 152k x
3584, beside its 1 GiB of bf16), and XLA hoists that conversion out of every loop over chunks of tokens, so every step
that runs the head holds it. A slice at a time, only the slice is converted, inside the loop. The vocabulary matrix is
viewed as [groups, V / groups, E] (`groups`: the largest power of two up to 128 that divides V) and slice i takes the
same rows of every group, so a vocabulary split over up to 128 devices stays split: each device converts and
multiplies its own rows.

`full_logits` gives the whole logits of a few tokens (what `transformer.head` returns for such a head, so the
chunked losses, the top-k teacher and generation need no change); it converts every slice again for each call, and
once more in the backward pass. `log_softmax_at` (the evaluation's scoring) runs the slices for all of a call's tokens
at once, each slice converted once, the log-sum-exp and argmax accumulated across slices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .layers import ACTIVATION_DTYPE, capped, product

GROUPS_MAX = 128
SLICE_BYTES = 64 << 20  # a slice's float32 logits, and its converted matrix, at most


def converts(param_dtype, compute_dtype) -> bool:
    """Whether weights of `param_dtype` are converted to a wider dtype for their products (then slice the head)."""
    return jnp.dtype(param_dtype).itemsize < jnp.dtype(compute_dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Slices:
    """Slice i holds rows [start(i), start(i) + rows) of each of `groups` groups of `per_group` vocabulary rows; the
    last slice is moved back to end at the group's end, and its rows an earlier slice held are not `fresh`."""

    vocab: int
    groups: int
    rows: int
    count: int

    @property
    def per_group(self) -> int:
        return self.vocab // self.groups

    def start(self, i):
        return jnp.minimum(i * self.rows, self.per_group - self.rows)

    def ids_and_fresh(self, i):
        """[groups * rows] vocabulary ids of slice i's logits, and whether no earlier slice had them."""
        local = self.start(i) + jnp.arange(self.rows)
        ids = (jnp.arange(self.groups)[:, None] * self.per_group + local[None, :]).reshape(-1)
        fresh = jnp.broadcast_to(local >= i * self.rows, (self.groups, self.rows)).reshape(-1)
        return ids, fresh


def plan(vocab: int, tokens: int, width: int) -> Slices:
    """Slices of a `vocab` x `width` head for products over `tokens` tokens at once: each slice's float32 logits
    and converted matrix at most SLICE_BYTES."""
    groups = math.gcd(vocab, GROUPS_MAX)
    per_group = vocab // groups
    rows = max(1, min(per_group, SLICE_BYTES // (4 * groups * max(tokens, width))))
    return Slices(vocab, groups, rows, -(-per_group // rows))


def _vocab_matrix(params):
    """(the head's vocabulary matrix, its einsum spec against [N, E] features as [groups, rows] slices, the axis
    its vocabulary lies on once grouped): `lm_head` [E, V], or the tied `embed_tokens` [V, E]."""
    if "lm_head" in params:
        return params["lm_head"], "ne,egv->ngv", 2
    return params["embed_tokens"], "ne,gve->ngv", 1


def _slice_matrix(params, slices: Slices, i, compute):
    """(slice i of the vocabulary matrix in the `compute` dtype, the einsum spec of features [N, E] times it)."""
    matrix, spec, axis = _vocab_matrix(params)
    grouped = matrix.reshape((matrix.shape[0], slices.groups, slices.per_group) if axis == 2 else
                             (slices.groups, slices.per_group, matrix.shape[1]))
    return jax.lax.dynamic_slice_in_dim(grouped, slices.start(i), slices.rows, axis=axis).astype(compute), spec


def slice_logits(params, features, slices: Slices, i, softcap=None):
    """[N, groups * rows] float32 logits of slice i (soft-capped with `softcap`) for [N, E] `features` in the
    compute dtype."""
    matrix, spec = _slice_matrix(params, slices, i, features.dtype)
    return capped(product(spec, features, matrix).reshape(features.shape[0], -1), softcap)


def full_logits(params, features, softcap=None):
    """[N, V] float32 logits for [N, E] features, made a slice at a time (each slice converted inside the loop and
    again in the backward pass: `jax.checkpoint` keeps no converted slice for it)."""
    n, width = features.shape
    slices = plan(_vocab_matrix(params)[0].size // width, n, width)

    @jax.checkpoint
    def one_slice(logits, i):
        part = slice_logits(params, features, slices, i, softcap).reshape(n, slices.groups, slices.rows)
        return jax.lax.dynamic_update_slice_in_dim(logits, part, slices.start(i), axis=2), None

    logits = jnp.zeros((n, slices.groups, slices.per_group), ACTIVATION_DTYPE)
    return jax.lax.scan(one_slice, logits, jnp.arange(slices.count))[0].reshape(n, -1)


def log_softmax_at(params, features, targets, softcap=None, with_greedy=False):
    """log softmax(logits)[targets] for [N, E] head features and [N] targets (and, with `with_greedy`, whether each
    target is the argmax, the lowest id among ties as jnp.argmax), the vocabulary a slice at a time: a running max
    and sum of exponentials per token."""
    n, width = features.shape
    vocab = _vocab_matrix(params)[0].size // width
    slices = plan(vocab, n, width)

    def one_slice(carry, i):
        top, total, target, best, best_id = carry
        ids, fresh = slices.ids_and_fresh(i)
        logits = jnp.where(fresh, slice_logits(params, features, slices, i, softcap), -jnp.inf)
        here = jnp.max(logits, axis=-1)
        new_top = jnp.maximum(top, here)
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=-1)
        target = target + jnp.sum(jnp.where((ids == targets[:, None]) & fresh, logits, 0), axis=-1)
        here_id = jnp.min(jnp.where(logits == here[:, None], ids, vocab), axis=-1)
        better = (here > best) | ((here == best) & (here_id < best_id))
        return (new_top, total, target, jnp.where(better, here, best), jnp.where(better, here_id, best_id)), None

    neg = jnp.full((n,), -jnp.inf, jnp.float32)
    init = (neg, jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32), neg, jnp.zeros((n,), jnp.int32))
    (top, total, target, _, best_id), _ = jax.lax.scan(one_slice, init, jnp.arange(slices.count))
    logprob = target - (top + jnp.log(total))
    return (logprob, best_id == targets) if with_greedy else logprob
