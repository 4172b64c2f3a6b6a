"""Forward throughput on SmolLM2-135M: ours and transformers' PyTorch, each in float32 and with bf16 inputs, in one
process.

For every shape (batch x sequence), the four forwards (logits included) run in turn, `--rounds` times, and each
keeps its best time: the machine is shared and drifts, so the figures compared are measured next to each other.
Ours compiles the way the package does (`streamline_jax.backend`: bf16 dot inputs accumulate in float32; float32
programs get XLA's Eigen dots on a CPU where the probe finds them faster); torch's bf16 is the model cast to bfloat16.
The matmul ceilings (2048^3: f32, and bf16 inputs with f32 accumulation) are measured in the same run, before and
after, and MFU is each forward's matmul FLOPs over the ceiling of its own dtype.

    python scripts/bench_forward.py                                  # 1, 4, 8 x 512 and 1, 4, 8 x 2048
    python scripts/bench_forward.py --shapes 4x512 --rounds 3        # one shape
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import streamline_jax as sj
from streamline_jax import backend
from streamline_jax.loading import embedded_hf_folder

from bench_pipeline import ceiling_torch  # scripts/ is on the path


def forward_flops(config, batch, seq, with_head=True):
    """Matmul FLOPs of one forward: 2 per multiply-add of every weight matmul, plus attention's QK^T and PV over
    the full T x T square."""
    d, hd = config.hidden_size, config.head_dim
    per_layer = 2 * (d * config.num_heads * hd + 2 * d * config.num_kv_heads * hd + config.num_heads * hd * d
                     + 3 * d * config.intermediate_size)
    attn = 2 * 2 * seq * config.num_heads * hd
    per_token = config.num_layers * (per_layer + attn) + (2 * d * config.vocab_size if with_head else 0)
    return per_token * batch * seq


def best_time(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ceilings():
    """FLOP/s of a 2048^3 product: jax f32, jax bf16 inputs with f32 accumulation, torch f32, torch bf16."""
    return {f"{lib} {dtype}": rate(dtype) for dtype in ("float32", "bfloat16")
            for lib, rate in (("jax", backend.matmul_rate), ("torch", ceiling_torch))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x512,4x512,8x512,1x2048,4x2048,8x2048", help="batch x sequence, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="each forward's best of this many, taken in turn")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    from transformers import AutoModelForCausalLM

    model = sj.load("smollm2-135m")
    ours = {dtype: sj.with_compute_dtype(model, dtype) for dtype in ("float32", "bfloat16")}
    folder = str(embedded_hf_folder("smollm2-135m"))
    theirs = {dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
              for dtype in ("float32", "bfloat16")}
    ceiling_runs = [ceilings()]
    print(f"SmolLM2-135M forward with logits; {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"compute_dtype auto here: {backend.auto_compute_dtype()}")
    print(f"our float32 programs compile with {backend.compiler_options('float32') or 'XLA defaults'}")
    rows = []
    for batch, seq in shapes:
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(batch, seq))
        tids = torch.tensor(ids)
        runs = {f"ours {d}": (lambda m=m: np.asarray(sj.forward(m, ids)[0, -1])) for d, m in ours.items()}
        runs.update({f"torch {d}": (lambda m=m: m(tids).logits[0, -1].float().numpy()) for d, m in theirs.items()})
        best = {}
        with torch.inference_mode():
            for name, fn in runs.items():
                fn()  # compile / warm up
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    best[name] = min(best.get(name, float("inf")), best_time(fn))
        rows.append((batch, seq, best))
        tokens = batch * seq
        print(f"  {batch} x {seq}: " + ", ".join(f"{k} {tokens / v:,.0f} tok/s" for k, v in best.items()), flush=True)
    ceiling_runs.append(ceilings())
    ceiling = {k: max(r[k] for r in ceiling_runs) for k in ceiling_runs[0]}
    print("matmul ceilings (2048^3, best of before/after), GFLOP/s: "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in ceiling.items()))
    print("\n| batch x seq | ours bf16 tok/s | ours f32 | torch bf16 | torch f32 | ours bf16 / torch bf16 | "
          "ours f32 / torch f32 | ours bf16 / ours f32 | MFU ours bf16 | MFU torch bf16 | MFU ours f32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch, seq, best in rows:
        tokens, flops = batch * seq, forward_flops(model.config, batch, seq)
        rate = {k: tokens / v for k, v in best.items()}
        mfu = {k: flops / v / ceiling[k.replace("ours", "jax")] for k, v in best.items()}
        print(f"| {batch} x {seq} | {rate['ours bfloat16']:,.0f} | {rate['ours float32']:,.0f} | "
              f"{rate['torch bfloat16']:,.0f} | {rate['torch float32']:,.0f} | "
              f"{rate['ours bfloat16'] / rate['torch bfloat16']:.2f} | {rate['ours float32'] / rate['torch float32']:.2f} | "
              f"{rate['ours bfloat16'] / rate['ours float32']:.2f} | {mfu['ours bfloat16']:.2f} | "
              f"{mfu['torch bfloat16']:.2f} | {mfu['ours float32']:.2f} |")
    print("\ngoals: ours bf16 >= 1.0x torch bf16 and >= 2.5x ours f32 at every shape; ours f32 >= 1.0x torch f32 at "
          "4 x 512")


if __name__ == "__main__":
    main()
