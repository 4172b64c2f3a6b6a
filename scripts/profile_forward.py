"""Where the forward's time goes on SmolLM2-135M (float32, batch 8 x 512): each part's time and GFLOP/s against a
float32 matmul measured in the same run.

    python scripts/profile_forward.py [--batch 8] [--seq 512] [--causal-block 128] [--trace [--torch]]

Each part is timed as its own compiled program. With --trace, the perplexity program is instead traced once with
jax's profiler, whole, and its compiled operations are summed by part (each operation is told apart by the jax op
it came from): the times inside the real program, fusion and scheduling included. XLA runs independent operations
at the same time on the two cores, so the parts can add up to more than the wall time. --torch also profiles
transformers' PyTorch model on the same batch (logits and log-softmax, as bench_eval scores it), by aten operator.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_eval's PyTorch model, for --torch

import streamline_jax as sj  # noqa: E402
from streamline_jax.evaluation import head_logprobs, target_logprobs  # noqa: E402
from streamline_jax.models import transformer  # noqa: E402
from streamline_jax.models.layers import SwiGLU  # noqa: E402
from streamline_jax.models.llama import LlamaAttention, LlamaDecoderLayer  # noqa: E402


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
    ap.add_argument("--trace", action="store_true", help="trace the whole perplexity program and sum it by part")
    ap.add_argument("--torch", action="store_true", help="with --trace: profile PyTorch's forward too")
    args = ap.parse_args()
    if args.torch and not args.trace:
        ap.error("--torch goes with --trace")
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
    layer0 = jax.tree.map(lambda a: a[0], p["segments"][transformer.segment_key(0)])

    q_dims = c.num_heads * c.head_dim
    kv_dims = c.num_kv_heads * c.head_dim
    projection_flops = tokens * 2 * (2 * d * q_dims + 2 * d * kv_dims)
    attn_flops = projection_flops + 4 * tokens * t * q_dims
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
    if args.trace and args.torch:
        print_torch_parts(ids, product_flops=c.num_layers * (projection_flops + mlp_flops) + head_flops)
    if args.trace:
        return print_traced_parts(c, p, ids, (a, 2 * 2048 ** 3),
                                  {"q, k, v and o projections": c.num_layers * projection_flops,
                                   "attention products": c.num_layers * causal_product_flops(b, t, q_dims),
                                   "MLP gate and up": c.num_layers * mlp_flops * 2 / 3,
                                   "MLP down": c.num_layers * mlp_flops / 3, "LM head product": head_flops})
    ceiling = None
    print(f"SmolLM2-135M, float32, batch {b} x {t}")
    for name, (fn, fn_args, flops) in parts.items():
        s = best_of(fn, *fn_args)
        rate = flops / s
        ceiling = ceiling or rate
        print(f"  {name:26s} {s * 1e3:9.1f} ms  {rate / 1e9:7.1f} GFLOP/s  {rate / ceiling:5.2f} of the ceiling")


def print_torch_parts(ids, product_flops):
    """transformers' PyTorch model on the same batch under torch's profiler: time by aten operator group."""
    import torch
    from bench_eval import torch_model

    model, tids = torch_model(), torch.from_numpy(np.asarray(ids, np.int64))
    mask = torch.ones_like(tids)
    run = lambda: torch.log_softmax(model(tids, attention_mask=mask).logits.float(), -1)  # noqa: E731
    with torch.no_grad():
        run()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
    groups = collections.Counter()
    for event in prof.key_averages():
        name = event.key
        group = ("matrix products (aten::mm)" if name in ("aten::mm", "aten::addmm", "aten::bmm") else
                 "attention (scaled_dot_product)" if "scaled_dot_product" in name else "everything else")
        groups[group] += event.self_cpu_time_total / 1e6
    b, t = ids.shape
    print(f"PyTorch (transformers, {torch.get_num_threads()} threads), batch {b} x {t}, profiled: {wall:.2f}s wall")
    for group, seconds in groups.most_common():
        rate = f"  {product_flops / seconds / 1e9:7.1f} GFLOP/s" if group.startswith("matrix") else ""
        print(f"  {group:32s} {seconds:7.2f}s {seconds / wall:6.1%} of the wall{rate}")


def causal_product_flops(b, t, q_dims):
    """The score and value products of the CPU causal attention: each block of queries against the keys up to its
    last row (the dense square when t fits one block)."""
    from streamline_jax.models import layers

    block = layers.CAUSAL_BLOCK if t > layers.CAUSAL_BLOCK else t
    seen = sum(min(start + block, t) * (min(start + block, t) - start) for start in range(0, t, block))
    return b * 4 * seen * q_dims


# (part, pattern over the jax op an operation came from), first match wins
TRACE_PARTS = (
    ("attention products", r"gqd,sd->gqs|gqs,sd->gqd|bkqd,bskd->bkqs|bkqs,bskd->bkqd"),
    ("attention softmax and masking", r"self_attn/while|self_attn/.*(exp|reduce_max|reduce_sum|select|div)"),
    ("q, k, v and o projections", r"(q_proj|k_proj|v_proj|o_proj)/dot_general"),
    ("MLP gate and up", r"mlp/.*dkf.*/dot_general"),
    ("MLP down", r"down_proj/dot_general"),
    ("LM head product", r"Head/.*dot_general"),
    ("LM head logsumexp", r"target_logprobs\)/while/body/closed_call/(?!LlamaDecoderLayer)"),
    ("norms, rope, residuals, other", r""),
)
CONTAINERS = re.compile(r"^(while|call|conditional)(\.\d+)?$|ThunkExecutor|ThreadPool")


def print_traced_parts(config, params, ids, ceiling_case, part_flops):
    """Trace one call of the perplexity program and sum its operations' times by part."""
    fn = jax.jit(lambda p, i: target_logprobs(config, p, i, i))
    compiled = fn.lower(params, ids).compile()
    op_of = dict(re.findall(r'^\s+(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]+)"', compiled.as_text(), re.M))
    matmul = jax.jit(lambda a: a @ a)
    ceiling = ceiling_case[1] / best_of(matmul, ceiling_case[0])
    jax.block_until_ready(compiled(params, ids))
    with tempfile.TemporaryDirectory(prefix="profile_forward_") as folder:
        jax.profiler.start_trace(folder)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, ids))
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        trace = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
        seconds, counts = collections.Counter(), collections.Counter()
        for plane in trace.planes:
            for line in plane.lines:
                for event in line.events:
                    op = op_of.get(event.name)
                    if op is None or CONTAINERS.search(event.name):
                        continue
                    part = next(name for name, pattern in TRACE_PARTS if re.search(pattern, op))
                    seconds[part] += event.duration_ns / 1e9
                    counts[part] += 1
    b, t = ids.shape
    print(f"SmolLM2-135M perplexity program, float32, batch {b} x {t}, traced whole: {wall:.2f}s wall; matmul "
          f"2048^3 ceiling {ceiling / 1e9:.1f} GFLOP/s in the same run")
    for part, _ in TRACE_PARTS:
        rate = f"{part_flops[part] / seconds[part] / 1e9:7.1f} GFLOP/s {part_flops[part] / seconds[part] / ceiling:5.2f}" \
            f" of the ceiling" if part in part_flops and seconds[part] else ""
        print(f"  {part:32s} {seconds[part]:7.2f}s {seconds[part] / wall:6.1%} of the wall  "
              f"({counts[part]:6d} operations) {rate}")
    print(f"  {'sum of the parts':32s} {sum(seconds.values()):7.2f}s (above the wall where operations overlapped)")


if __name__ == "__main__":
    main()
