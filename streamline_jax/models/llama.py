"""The llama block family's decoder layer (Llama-2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3) and its FFN
replacement block. Per-architecture differences are `ModelConfig` flags (q/k/v bias, o bias, q/k norm, sliding
window, norm offset, sandwich norms, query scale, logit soft-cap, per-layer attention types)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from .config import ModelConfig
from .layers import (SwiGLU, apply_rope, attend, attend_cache, dense, matmul_dtype, rms_norm, rope_inv_freq,
                     update_cache, within_window)


def local_window_mask(mask, cache_index, window, positions=None):
    """`mask` [B, T, S] limited to keys fewer than `window` positions behind each query. Without a cache the keys
    are the queries, and `positions` [B, T] measure it (packed rows with a shared prefix put a branch further from
    its prefix in slots than in positions); with one, slots do (query t sits at slot cache_index + t)."""
    if positions is not None:
        return mask & within_window(positions, positions, window)
    t, s = mask.shape[-2:]
    query_slots = (0 if cache_index is None else cache_index) + jnp.arange(t)
    return mask & within_window(query_slots, jnp.arange(s), window)


class LlamaAttention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32  # the weights'; products run in `matmul_dtype(config)`

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None, local=None):
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
            q = rms_norm(c, self.dtype, "q_norm", "head_dim")(q)
            k = rms_norm(c, self.dtype, "k_norm", "head_dim")(k)
        inv_freq = rope_inv_freq(c)
        if c.layer_types:
            if local is None:
                raise ValueError("a model with per-layer attention types needs each layer's type (`local`)")
            inv_freq = jnp.where(local, rope_inv_freq(c, local=True), inv_freq)
            keys_are_queries = positions if cache is None else None
            mask = jnp.where(local, local_window_mask(mask, cache_index, c.local_window, keys_are_queries), mask)
        scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        q = (apply_rope(q, positions, inv_freq) * jnp.asarray(scale, q.dtype)).astype(compute)
        k = apply_rope(k, positions, inv_freq).astype(compute)
        v = v.astype(compute)
        if cache is not None:
            cache = update_cache(cache, k, v, cache_index)
            out = attend_cache(q, cache, mask, softcap=c.attn_logit_softcap)
        else:
            out = attend(q, k, v, mask, causal=True, softcap=c.attn_logit_softcap, platform=c.attention_platform)
        out = dense(c.hidden_size, ("heads", "head_dim"), ("embed",), c.attention_bias, "o_proj", axis=(-2, -1),
                    dtype=self.dtype, compute_dtype=compute)(out)
        return out, cache


class LlamaDecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); with `sandwich_norms` (Gemma) each branch's output is normed too:
    x + post_attention_layernorm(attn(input_layernorm(x))), x + post_feedforward_layernorm(mlp(
    pre_feedforward_layernorm(x))) (Hugging Face's names, so Llama's `post_attention_layernorm` is Gemma's
    `pre_feedforward_layernorm`)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None, local=None):
        c = self.config
        h, cache = LlamaAttention(c, self.dtype, name="self_attn")(
            rms_norm(c, self.dtype, "input_layernorm")(x), mask, positions, cache, cache_index, local)
        if c.sandwich_norms:
            h = rms_norm(c, self.dtype, "post_attention_layernorm")(h)
        x = x + h
        return ffn_residual(c, self.dtype, x), cache


def ffn_residual(c: ModelConfig, dtype, x):
    """x + the layer's MLP branch (inside a module's compact scope: its parameters are the caller's)."""
    if c.sandwich_norms:
        h = SwiGLU(c, dtype, name="mlp")(rms_norm(c, dtype, "pre_feedforward_layernorm")(x))
        return x + rms_norm(c, dtype, "post_feedforward_layernorm")(h)
    return x + SwiGLU(c, dtype, name="mlp")(rms_norm(c, dtype, "post_attention_layernorm")(x))


class LlamaFFNBlock(nn.Module):
    """The `ffn` replacement: the layer's MLP branch, x + mlp(norm(x)), with the names of the layer it came from."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return ffn_residual(self.config, self.dtype, x)
