"""The llama block family's decoder layer (Llama-2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3) and its FFN replacement
block. Per-architecture differences are `ModelConfig` flags (q/k/v bias, o bias, q/k norm, sliding window)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from .config import ModelConfig
from .layers import RMSNorm, SwiGLU, apply_rope, attend, dense, matmul_dtype, rope_inv_freq, update_cache


class LlamaAttention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32  # the weights'; products run in `matmul_dtype(config)`

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None):
        c = self.config
        bias = c.attention_bias or c.qkv_bias
        compute = matmul_dtype(c)
        q = dense((c.num_heads, c.head_dim), ("embed",), ("heads", "head_dim"), bias, "q_proj", dtype=self.dtype,
                  compute_dtype=compute)(x)
        k = dense((c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), bias, "k_proj",
                  dtype=self.dtype, compute_dtype=compute)(x)
        v = dense((c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), bias, "v_proj",
                  dtype=self.dtype, compute_dtype=compute)(x)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, "head_dim", name="k_norm")(k)
        inv_freq = rope_inv_freq(c)
        q = (apply_rope(q, positions, inv_freq) * jnp.asarray(c.head_dim ** -0.5, q.dtype)).astype(compute)
        k = apply_rope(k, positions, inv_freq).astype(compute)
        v = v.astype(compute)
        if cache is not None:
            cache = update_cache(cache, k, v, cache_index)
            k, v = cache
        out = attend(q, k, v, mask, causal=cache is None)
        out = dense(c.hidden_size, ("heads", "head_dim"), ("embed",), c.attention_bias, "o_proj", axis=(-2, -1),
                    dtype=self.dtype, compute_dtype=compute)(out)
        return out, cache


class LlamaDecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None):
        c = self.config
        h, cache = LlamaAttention(c, self.dtype, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), mask, positions, cache, cache_index)
        x = x + h
        x = x + SwiGLU(c, self.dtype, name="mlp")(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        return x, cache


class LlamaFFNBlock(nn.Module):
    """The `ffn` replacement: x + mlp(post_attention_layernorm(x)), with the names of the layer it came from."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        return x + SwiGLU(c, self.dtype, name="mlp")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
