"""Where the forward's time goes on SmolLM2-135M (float32, batch 8 x 512): each part's time and GFLOP/s against a
float32 matmul measured in the same run.

    python scripts/profile_forward.py [--batch 8] [--seq 512] [--causal-block 128]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import streamline_jax as sj
from streamline_jax.evaluation import head_logprobs, target_logprobs
from streamline_jax.models import transformer
from streamline_jax.models.layers import SwiGLU
from streamline_jax.models.llama import LlamaAttention, LlamaDecoderLayer


def unchunked_logprobs(config, params, input_ids, targets):
    logits = transformer.apply(config, params, input_ids)["logits"]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def best_of(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--causal-block", type=int, default=None, help="query rows per block of CPU causal attention")
    args = ap.parse_args()
    if args.causal_block:
        from streamline_jax.models import layers

        layers.CAUSAL_BLOCK = args.causal_block
    model = sj.load("smollm2-135m")
    c, p = model.config, model.params
    b, t, d = args.batch, args.seq, c.hidden_size
    tokens = b * t
    ids = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, size=(b, t)), jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
    mask = jnp.ones((b, t), jnp.int32)
    positions = transformer.default_positions(mask)
    allowed = transformer.attention_mask_matrix(mask, jnp.arange(t)[None])
    layer0 = jax.tree.map(lambda a: a[0], p["segments"]["seg_0"])

    q_dims = c.num_heads * c.head_dim
    kv_dims = c.num_kv_heads * c.head_dim
    attn_flops = tokens * 2 * (2 * d * q_dims + 2 * d * kv_dims) + 4 * tokens * t * q_dims
    mlp_flops = tokens * 2 * 3 * d * c.intermediate_size
    head_flops = tokens * 2 * d * c.vocab_size
    a = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048))
    parts = {
        "matmul 2048^3 (ceiling)": (jax.jit(lambda a: a @ a), (a,), 2 * 2048 ** 3),
        "whole forward": (jax.jit(lambda p, i: transformer.apply(c, p, i)["logits"]), (p, ids),
                          c.num_layers * (attn_flops + mlp_flops) + head_flops),
        "decoder stack (no head)": (jax.jit(lambda p, i: transformer.apply(c, p, i, return_logits=False)["last_hidden"]),
                                    (p, ids), c.num_layers * (attn_flops + mlp_flops)),
        "LM head": (jax.jit(lambda p, h: transformer.head(c, p, h)), (p, x), head_flops),
        "LM head + logsumexp": (jax.jit(lambda p, h: jax.nn.logsumexp(transformer.head(c, p, h), axis=-1)), (p, x),
                                head_flops),
        "LM head + logsumexp, chunked": (jax.jit(lambda p, h: head_logprobs(c, p, h, ids)), (p, x), head_flops),
        "perplexity logprobs (unchunked head)": (jax.jit(lambda p, i: unchunked_logprobs(c, p, i, i)), (p, ids),
                                                  c.num_layers * (attn_flops + mlp_flops) + head_flops),
        "perplexity logprobs": (jax.jit(lambda p, i: target_logprobs(c, p, i, i)), (p, ids),
                                c.num_layers * (attn_flops + mlp_flops) + head_flops),
        "one decoder layer": (jax.jit(lambda q, h: LlamaDecoderLayer(c).apply({"params": q}, h, allowed, positions)[0]),
                              (layer0, x), attn_flops + mlp_flops),
        "  its attention": (jax.jit(lambda q, h: LlamaAttention(c).apply({"params": q["self_attn"]}, h, allowed,
                                                                         positions)[0]), (layer0, x), attn_flops),
        "  its SwiGLU MLP": (jax.jit(lambda q, h: SwiGLU(c).apply({"params": q["mlp"]}, h)), (layer0, x), mlp_flops),
    }
    ceiling = None
    print(f"SmolLM2-135M, float32, batch {b} x {t}")
    for name, (fn, fn_args, flops) in parts.items():
        s = best_of(fn, *fn_args)
        rate = flops / s
        ceiling = ceiling or rate
        print(f"  {name:26s} {s * 1e3:9.1f} ms  {rate / 1e9:7.1f} GFLOP/s  {rate / ceiling:5.2f} of the ceiling")


if __name__ == "__main__":
    main()
