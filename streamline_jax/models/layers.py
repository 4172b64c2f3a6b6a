"""Building blocks shared by the Llama and OPT decoders.

Every parameter is created through `nn.with_logical_partitioning`, so an abstract init carries its logical axis
names (see `streamline_jax.sharding`).
"""

from __future__ import annotations

import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .config import ModelConfig

MASK_VALUE = -1e30  # finite, so a fully masked (padding) query row gives no NaN


def param_init(init, axes):
    return nn.with_logical_partitioning(init, axes)


KERNEL_INIT = nn.initializers.normal(0.02)  # every dense kernel, whether `dense` or `DenseParams` makes it


ACTIVATION_DTYPE = jnp.float32  # residual stream, norms, softmax and dot outputs, whatever the weights' dtype
# False: `product`'s backward is JAX's own transpose (float32 cotangent times compute-dtype inputs, in float32) instead
# of its compute-dtype products. Read when a program is traced; scripts/bench_backward.py compares the two.
LOW_PRECISION_BACKWARD = True


def product(spec: str, a, b):
    """einsum(spec, a, b) of inputs already in the compute dtype, accumulated and returned in float32. Below float32
    the backward's products take compute-dtype inputs too (the float32 cotangent rounded, as mixed-precision
    training does): JAX's own transpose would multiply the float32 cotangent in float32, at about a third of the
    bf16 rate on AMX CPUs and far below it on accelerators. Specs name every index (no ellipsis), and each input's
    indices appear in the other input or the output."""
    if (a.dtype == jnp.float32 and b.dtype == jnp.float32) or not LOW_PRECISION_BACKWARD:
        return jnp.einsum(spec, a, b, preferred_element_type=ACTIVATION_DTYPE)
    return _low_precision_product(spec, jnp.dtype(a.dtype), jnp.dtype(b.dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _low_precision_product(spec, a_dtype, b_dtype, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=ACTIVATION_DTYPE)


def _low_precision_product_fwd(spec, a_dtype, b_dtype, a, b):
    # symbolic zeros: each input says whether it is differentiated, so a frozen weight's gradient (a product the
    # size of the layer's forward one) is not made, nor its input kept for it
    out = jnp.einsum(spec, a.value, b.value, preferred_element_type=ACTIVATION_DTYPE)
    return out, (a.value if b.perturbed else None, b.value if a.perturbed else None)


def _low_precision_product_bwd(spec, a_dtype, b_dtype, saved, g):
    a, b = saved  # a is kept where b's gradient is wanted, b where a's is
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    operands, out = spec.split("->")
    sa, sb = operands.split(",")
    g = g.astype(jnp.promote_types(a_dtype, b_dtype))
    da = None if b is None else jnp.einsum(f"{out},{sb}->{sa}", g, b,
                                           preferred_element_type=ACTIVATION_DTYPE).astype(a_dtype)
    db = None if a is None else jnp.einsum(f"{sa},{out}->{sb}", a, g,
                                           preferred_element_type=ACTIVATION_DTYPE).astype(b_dtype)
    return da, db


_low_precision_product.defvjp(_low_precision_product_fwd, _low_precision_product_bwd, symbolic_zeros=True)


def trailing_product_spec(x_rank: int, contracted: int, kernel_rank: int) -> str:
    """The einsum spec contracting x's trailing `contracted` axes with a kernel's leading ones."""
    letters = string.ascii_letters
    x = letters[:x_rank]
    out = letters[x_rank:x_rank + kernel_rank - contracted]
    return f"{x},{x[x_rank - contracted:]}{out}->{x[:x_rank - contracted]}{out}"


class Dense(nn.Module):
    """y = x . kernel (+ bias) over x's trailing `axis` dims; kernel [*in, *features] with logical names
    `in_axes + out_axes`, stored in `param_dtype`. Input and kernel enter the product in `compute_dtype` and it
    accumulates and returns float32 (`preferred_element_type`): bf16 inputs run at the bf16 rate of TPUs, GPUs and
    AMX CPUs while sums, biases and the residual stream stay float32."""

    features: tuple
    in_axes: tuple
    out_axes: tuple
    use_bias: bool
    axis: tuple = (-1,)
    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.float32
    kernel_init: object = KERNEL_INIT

    @nn.compact
    def __call__(self, x):
        axis = tuple(sorted(a % x.ndim for a in self.axis))
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"Dense contracts trailing axes only, got axis={self.axis} for rank {x.ndim}")
        in_shape = tuple(x.shape[a] for a in axis)
        kernel = self.param("kernel", param_init(self.kernel_init, self.in_axes + self.out_axes),
                            in_shape + self.features, self.param_dtype)
        y = product(trailing_product_spec(x.ndim, len(axis), kernel.ndim), x.astype(self.compute_dtype),
                    kernel.astype(self.compute_dtype))
        if self.use_bias:
            bias = self.param("bias", param_init(nn.initializers.zeros, self.out_axes), self.features,
                              self.param_dtype)
            y = y + bias.astype(ACTIVATION_DTYPE)
        return y


def dense(features, in_axes, out_axes, use_bias, name, axis=-1, dtype=None, compute_dtype=None, kernel_init=None):
    """A `Dense` with its kernel in `dtype` (float32 by default) and its product in `compute_dtype` (default: the
    kernel's dtype)."""
    features = features if isinstance(features, tuple) else (features,)
    axis = axis if isinstance(axis, tuple) else (axis,)
    dtype = jnp.dtype(dtype or jnp.float32)
    return Dense(features, tuple(in_axes), tuple(out_axes), use_bias, axis, dtype, jnp.dtype(compute_dtype or dtype),
                 kernel_init or KERNEL_INIT, name=name)


def matmul_dtype(config: ModelConfig):
    """The dtype dot inputs take: `config.compute_dtype`, or the weights' own dtype when it is unset."""
    return jnp.dtype(config.compute_dtype or config.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm, in float32 (the residual stream's dtype) whatever the weight's dtype. `offset`: the scale
    applied is offset + weight (Gemma stores w and applies 1 + w; its weights start at zero)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"  # the logical name of the normalised axis ("head_dim" for Qwen3's q/k norms)
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset == 1.0 else nn.initializers.ones
        weight = self.param("scale", param_init(init, (self.axis_name,)), (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.offset + weight.astype(ACTIVATION_DTYPE)) * x32


def rms_norm(config: ModelConfig, dtype, name, axis_name="embed"):
    """The llama block family's RMSNorm with `config`'s epsilon and offset."""
    return RMSNorm(config.rms_norm_eps, dtype, axis_name, config.norm_offset, name=name)


def layer_norm(eps, dtype, name):
    """OPT's LayerNorm: weights in `dtype`, computed and returned in float32."""
    return nn.LayerNorm(
        epsilon=eps, dtype=ACTIVATION_DTYPE, param_dtype=dtype, use_fast_variance=False,
        scale_init=param_init(nn.initializers.ones, ("embed",)),
        bias_init=param_init(nn.initializers.zeros, ("embed",)), name=name)


ROPE_SCALING_TYPES = ("llama3", "linear")


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies, including Llama-3's frequency-dependent scaling and linear scaling. `local`: those of
    the sliding-window layers (base `local_rope_theta`, unscaled, when the config sets it)."""
    dim = config.head_dim
    theta, scaling = config.rope_theta, config.rope_scaling
    if local and config.local_rope_theta:
        theta, scaling = config.local_rope_theta, None
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = dict(scaling or ())
    kind = s.get("rope_type", s.get("type", "llama3")) if s else None
    if scaling and kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not implemented (supported: {ROPE_SCALING_TYPES})")
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x: [B, T, H, D]; positions: [B, T]. Rotate-half convention of transformers' Llama."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# Query rows per block in causal attention on CPU: a block's scores for one key head stay in cache between the
# score product, the softmax and the value product (128 was among the fastest of 32-256 tried).
CAUSAL_BLOCK = 128


def within_window(query_at, key_at, window):
    """[..., T, S] bool: key at `key_at` [..., S] is fewer than `window` behind the query at `query_at` [..., T];
    slots or positions, as the caller measures (packed rows with a shared prefix need positions)."""
    return (query_at[..., :, None] - key_at[..., None, :]) < window


def attend(q, k, v, mask, causal=False, softcap=None, platform=None):
    """Grouped-query attention. q: [B, T, H, D]; k, v: [B, S, K, D]; mask: [B, T, S] bool (True = may attend).

    q must already carry its scale; `softcap` caps the scores at cap * tanh(score / cap) (Gemma 2). The G = H/K
    query heads that share a key head are stacked along the query axis, so each (batch, key head) is one
    [G*T, D] x [D, S] matmul: fewer, larger products, which run faster on CPU than G separate [T, D] ones.

    `causal=True` promises that query t never sees a key past slot t (no cache: keys and queries are the same
    slots). On CPU, queries then go one (batch, key head) at a time in blocks of CAUSAL_BLOCK rows, each against only
    the keys up to its last row: half the square is skipped, and the block's scores never leave the cache. On
    accelerators XLA's fused dense attention is kept. `platform` ("cpu", "tpu", "gpu"): the one traced for, a
    ModelConfig's `attention_platform` (static, so a jit keys on it; None: this host's default backend).
    """
    t, s = q.shape[1], k.shape[1]
    platform = platform or jax.default_backend()
    if causal and t == s and t > CAUSAL_BLOCK and platform == "cpu":
        return attend_causal_blocks(q, k, v, mask, softcap)
    return _attend_dense(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, softcap)


def attend_cache(q, cache, mask, softcap=None):
    """`attend` of q [B, T, H, D] over a KV cache in `update_cache`'s layout ([B, K, S, D] keys and values)."""
    k, v = cache
    return _attend_dense(q, k, v, mask, softcap)


def capped(x, cap):
    """cap * tanh(x / cap) (Gemma 2's attention scores and final logits); x itself when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attend_causal_blocks(q, k, v, mask, softcap=None, own_backward=True):
    """`attend`'s causal path on CPU (shapes as there). `own_backward=False`: JAX differentiates the blocked
    forward instead of flash attention's backward (scripts/bench_attention.py compares the two)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, g, t, d)
    k = k.transpose(0, 2, 1, 3).reshape(b * kv, t, d)
    v = v.transpose(0, 2, 1, 3).reshape(b * kv, t, d)
    heads = _causal_heads if own_backward else lambda *a: _causal_heads_forward(*a)[0]
    out = heads(q, k, v, mask, softcap, kv)  # [B * K, G, T, D]
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _block_scores(qh, kh, allowed, start, end, softcap):
    """One query block's masked scores [G, rows, end] against the keys up to its last row, and the uncapped ones."""
    raw = product("gqd,sd->gqs", qh[:, start:end], kh[:end])
    return jnp.where(allowed[None, start:end, :end], capped(raw, softcap), MASK_VALUE), raw


def _causal_heads_forward(q, k, v, mask, softcap, kv):
    """(out [B*K, G, T, D], logsumexp of each query row's scores [B*K, G, T]), one (batch, key head) at a time."""
    t = q.shape[2]

    def one_head(args):  # [G, T, D], [S, D], [S, D], index into B * K
        qh, kh, vh, index = args
        allowed = jax.lax.dynamic_index_in_dim(mask, index // kv, keepdims=False)  # [T, S]
        outs, lses = [], []
        for start in range(0, t, CAUSAL_BLOCK):
            end = min(start + CAUSAL_BLOCK, t)
            scores, _ = _block_scores(qh, kh, allowed, start, end, softcap)
            top = jnp.max(scores, axis=-1, keepdims=True)
            # softmax normalised after the value product: [G, rows, D] divides, not [G, rows, keys] (faster on CPU)
            weights = jnp.exp(scores - top)
            total = jnp.sum(weights, axis=-1, keepdims=True)
            out = product("gqs,sd->gqd", weights.astype(vh.dtype), vh[:end])
            outs.append((out / total).astype(vh.dtype))
            lses.append((top + jnp.log(total))[..., 0])
        return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)

    # one loop over every (batch, key head), not one nested in another: faster on CPU, and quicker to compile
    return jax.lax.map(one_head, (q, k, v, jnp.arange(q.shape[0])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_heads(q, k, v, mask, softcap, kv):
    return _causal_heads_forward(q, k, v, mask, softcap, kv)[0]


def _causal_heads_fwd(q, k, v, mask, softcap, kv):
    out, lse = _causal_heads_forward(q, k, v, mask, softcap, kv)
    return out, (q, k, v, mask, out, lse)


def _causal_heads_bwd(softcap, kv, saved, d_out):
    """Flash-attention's backward, block by block as the forward: each block's probabilities are recomputed from
    the saved logsumexp, so no [T, S] array is kept between the passes, and the five products take compute-dtype
    inputs (autodiff through the blocked loop measured ~8x the forward's time; this, ~3x)."""
    q, k, v, mask, out, lse = saved
    t = q.shape[2]

    def one_head(args):
        qh, kh, vh, oh, lh, dh, index = args
        allowed = jax.lax.dynamic_index_in_dim(mask, index // kv, keepdims=False)
        # rowsum(dO * O): the softmax's backward term, per query row [G, T]
        delta = jnp.sum(dh.astype(jnp.float32) * oh.astype(jnp.float32), axis=-1)
        dq, dk, dv = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
        for start in range(0, t, CAUSAL_BLOCK):
            end = min(start + CAUSAL_BLOCK, t)
            scores, raw = _block_scores(qh, kh, allowed, start, end, softcap)
            probs = jnp.exp(scores - lh[:, start:end, None])  # [G, rows, end]
            d_block = dh[:, start:end]
            dv = dv.at[:end].add(product("gqs,gqd->sd", probs.astype(vh.dtype), d_block.astype(vh.dtype)))
            d_probs = product("gqd,sd->gqs", d_block.astype(vh.dtype), vh[:end])
            d_scores = probs * (d_probs - delta[:, start:end, None])
            if softcap is not None:  # d/draw of cap * tanh(raw / cap)
                d_scores = d_scores * (1 - jnp.tanh(raw / softcap) ** 2)
            d_scores = d_scores.astype(qh.dtype)
            dq.append(product("gqs,sd->gqd", d_scores, kh[:end]).astype(qh.dtype))
            dk = dk.at[:end].add(product("gqs,gqd->sd", d_scores, qh[:, start:end]))
        return jnp.concatenate(dq, axis=1), dk.astype(kh.dtype), dv.astype(vh.dtype)

    dq, dk, dv = jax.lax.map(one_head, (q, k, v, out, lse, d_out, jnp.arange(q.shape[0])))
    return dq, dk, dv, None


_causal_heads.defvjp(_causal_heads_fwd, _causal_heads_bwd)


def _attend_dense(q, k, v, mask, softcap=None):
    """q [B, T, H, D]; k, v [B, K, S, D] (key heads before slots: each (batch, key head) is a matmul over
    contiguous rows, where [B, S, K, D] had XLA copy a decode step's whole cache into this order at every layer)."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    scores = product("bkqd,bksd->bkqs", q, k)
    scores = capped(scores, softcap).reshape(b, kv, g, t, -1)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = product("bkqs,bksd->bkqd", probs, v).astype(v.dtype)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def update_cache(cache, k, v, cache_index):
    """Write this step's keys and values ([B, T, K, D]) into a preallocated [B, K, S_max, D] cache at slot
    `cache_index`."""
    k_cache, v_cache = cache
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype),
                                                  cache_index, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                                  cache_index, axis=2)
    return k_cache, v_cache


class DenseParams(nn.Module):
    """A dense layer's kernel [in, out] (and bias), under the layer's own name, for callers that run the product
    themselves (SwiGLU stacks gate and up into one)."""

    shape: tuple
    axes: tuple
    use_bias: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", param_init(KERNEL_INIT, self.axes), self.shape, self.dtype)
        bias = (self.param("bias", param_init(nn.initializers.zeros, self.axes[-1:]), self.shape[-1:], self.dtype)
                if self.use_bias else None)
        return kernel, bias


def gated_activation(name: str):
    """The gate's activation: silu (SwiGLU, Llama/Qwen) or gelu with the tanh approximation (GeGLU, Gemma)."""
    if name == "silu":
        return nn.silu
    if name == "gelu_tanh":
        return lambda x: nn.gelu(x, approximate=True)
    raise ValueError(f"gated MLP activation {name!r} is not implemented (supported: 'silu', 'gelu_tanh')")


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or gelu-tanh (Gemma's GeGLU). gate and up run as one product against their kernels
    stacked on a new axis (faster on CPU than two products; the new axis leaves the mlp axis's sharding as it is)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32  # the weights'

    @nn.compact
    def __call__(self, x):
        c = self.config
        compute = matmul_dtype(c)
        shape, axes = (c.hidden_size, c.intermediate_size), ("embed", "mlp")
        gate_kernel, gate_bias = DenseParams(shape, axes, c.mlp_bias, self.dtype, name="gate_proj")()
        up_kernel, up_bias = DenseParams(shape, axes, c.mlp_bias, self.dtype, name="up_proj")()
        kernels = jnp.stack([gate_kernel, up_kernel], axis=1).astype(compute)  # [D, 2, F]
        gate_up = product(trailing_product_spec(x.ndim, 1, 3), x.astype(compute), kernels)
        if c.mlp_bias:
            gate_up = gate_up + jnp.stack([gate_bias, up_bias]).astype(ACTIVATION_DTYPE)
        hidden = gated_activation(c.activation)(gate_up[..., 0, :]) * gate_up[..., 1, :]
        return dense(c.hidden_size, ("mlp",), ("embed",), c.mlp_bias, "down_proj", dtype=self.dtype,
                     compute_dtype=compute)(hidden)


class MLPBlock(nn.Module):
    """The `mlp` replacement: x + fc2(relu(fc1(x))). fc2 starts at zero, so the fresh block is the identity."""

    width: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32  # the weights'
    compute_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        fc1 = dense(self.width, ("embed",), ("mlp",), True, "fc1", dtype=self.dtype, compute_dtype=self.compute_dtype,
                    kernel_init=nn.initializers.lecun_normal())
        fc2 = dense(self.hidden_size, ("mlp",), ("embed",), True, "fc2", dtype=self.dtype,
                    compute_dtype=self.compute_dtype, kernel_init=nn.initializers.zeros)
        return x + fc2(nn.relu(fc1(x)))


class LinearBlock(nn.Module):
    """The `linear` replacement (ReplaceMe-style): x + x . kernel, one [E, E] map on the residual stream, fitted in
    closed form (`streamline_jax.linear_fit`). kernel starts at zero, so the fresh block is the identity."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32  # the weights'
    compute_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        # both dims are model width: "embed" twice shards the first over fsdp and keeps the second whole
        return x + dense(self.hidden_size, ("embed",), ("embed",), False, "linear", dtype=self.dtype,
                         compute_dtype=self.compute_dtype, kernel_init=nn.initializers.zeros)(x)
