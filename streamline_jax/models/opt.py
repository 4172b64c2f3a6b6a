"""OPT decoder layer (125m to 66b, including opt-350m's post-norm) and its FFN replacement block."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from .config import ModelConfig
from .layers import attend, attend_cache, dense, layer_norm, matmul_dtype, update_cache


class OPTAttention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None):
        c = self.config
        shape = (c.num_heads, c.head_dim)
        axes = ("heads", "head_dim")
        compute = matmul_dtype(c)
        q = dense(shape, ("embed",), axes, c.enable_bias, "q_proj", dtype=self.dtype, compute_dtype=compute)(x)
        k = dense(shape, ("embed",), axes, c.enable_bias, "k_proj", dtype=self.dtype, compute_dtype=compute)(x)
        v = dense(shape, ("embed",), axes, c.enable_bias, "v_proj", dtype=self.dtype, compute_dtype=compute)(x)
        q = (q * jnp.asarray(c.head_dim ** -0.5, q.dtype)).astype(compute)
        k, v = k.astype(compute), v.astype(compute)
        if cache is not None:
            cache = update_cache(cache, k, v, cache_index)
            out = attend_cache(q, cache, mask)
        else:
            out = attend(q, k, v, mask, causal=True, platform=c.attention_platform)
        out = dense(c.hidden_size, axes, ("embed",), c.enable_bias, "out_proj", axis=(-2, -1), dtype=self.dtype,
                    compute_dtype=compute)(out)
        return out, cache


class OPTDecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None):
        c = self.config
        pre = c.do_layer_norm_before
        attn_norm = layer_norm(c.layer_norm_eps, self.dtype, "self_attn_layer_norm")
        h, cache = OPTAttention(c, self.dtype, name="self_attn")(attn_norm(x) if pre else x, mask, positions, cache,
                                                                 cache_index)
        x = x + h
        if not pre:
            x = attn_norm(x)
        return opt_ffn(c, self.dtype, x), cache


def opt_ffn(c: ModelConfig, dtype, x):
    """OPT's fc1/fc2 sub-block with its layer norm and residual (pre- or post-norm).

    Called inside a compact method, so the decoder layer and the bare FFN block get the same parameter names.
    """
    norm = layer_norm(c.layer_norm_eps, dtype, "final_layer_norm")
    h = norm(x) if c.do_layer_norm_before else x
    compute = matmul_dtype(c)
    h = dense(c.intermediate_size, ("embed",), ("mlp",), c.enable_bias, "fc1", dtype=dtype, compute_dtype=compute)(h)
    h = dense(c.hidden_size, ("mlp",), ("embed",), c.enable_bias, "fc2", dtype=dtype, compute_dtype=compute)(nn.relu(h))
    x = x + h
    return x if c.do_layer_norm_before else norm(x)


class OPTFFNBlock(nn.Module):
    """The `ffn` replacement block for OPT."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return opt_ffn(self.config, self.dtype, x)
