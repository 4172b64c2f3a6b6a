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
    python scripts/bench_forward.py --dtypes float32 --float32-dots both   # float32 only, Eigen and default dots

`--float32-dots both` runs our float32 forward twice, with XLA's Eigen dots and with its default (YNNPACK) ones,
whatever this CPU's choice (`backend.float32_cpu_dot_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
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


def ceilings(dtypes=("float32", "bfloat16")):
    """FLOP/s of a 2048^3 product: jax f32, jax bf16 inputs with f32 accumulation, torch f32, torch bf16."""
    return {f"{lib} {dtype}": rate(dtype) for dtype in dtypes
            for lib, rate in (("jax", backend.matmul_rate), ("torch", ceiling_torch))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x512,4x512,8x512,1x2048,4x2048,8x2048", help="batch x sequence, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="each forward's best of this many, taken in turn")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to run, comma-separated")
    ap.add_argument("--float32-dots", choices=("auto", "both"), default="auto",
                    help="auto: the dots this CPU's float32 programs get; both: Eigen and XLA's default, side by side")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    from transformers import AutoModelForCausalLM

    model = sj.load("smollm2-135m")
    ours = {dtype: sj.with_compute_dtype(model, dtype) for dtype in dtypes}
    folder = str(embedded_hf_folder("smollm2-135m"))
    theirs = {dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
              for dtype in dtypes}
    ceiling_runs = [ceilings(dtypes)]
    print(f"SmolLM2-135M forward with logits; {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"compute_dtype auto here: {backend.auto_compute_dtype()}")
    print(f"our float32 programs compile with {backend.compiler_options('float32') or 'XLA defaults'}")
    rows = []
    for batch, seq in shapes:
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(batch, seq))
        tids = torch.tensor(ids)
        runs = {f"ours {d}": (lambda m=m: np.asarray(sj.forward(m, ids)[0, -1])) for d, m in ours.items()}
        if args.float32_dots == "both" and "float32" in ours:
            for dots, options in (("eigen", backend.EIGEN_DOTS), ("default", {})):
                fwd = jax.jit(lambda p, ids=ids: sj.forward(dataclasses.replace(ours["float32"], params=p), ids,
                                                             np.ones_like(ids)),
                              compiler_options=options or None)
                runs[f"ours float32 {dots} dots"] = lambda f=fwd: np.asarray(f(ours["float32"].params)[0, -1])
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
    ceiling_runs.append(ceilings(dtypes))
    ceiling = {k: max(r[k] for r in ceiling_runs) for k in ceiling_runs[0]}
    print("matmul ceilings (2048^3, best of before/after), GFLOP/s: "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in ceiling.items()))
    names = list(rows[0][2])
    ratios = [(a, b) for a, b in (("ours bfloat16", "torch bfloat16"), ("ours float32", "torch float32"),
                                  ("ours bfloat16", "ours float32"),
                                  ("ours float32 default dots", "ours float32 eigen dots"),
                                  ("ours float32 eigen dots", "torch float32"),
                                  ("ours float32 default dots", "torch float32")) if a in names and b in names]
    print("\n| batch x seq | " + " | ".join(f"{n} tok/s" for n in names) + " | "
          + " | ".join(f"{a} / {b}" for a, b in ratios) + " | " + " | ".join(f"MFU {n}" for n in names) + " |")
    print("|---" * (1 + 2 * len(names) + len(ratios)) + "|")
    for batch, seq, best in rows:
        tokens, flops = batch * seq, forward_flops(model.config, batch, seq)
        rate = {k: tokens / v for k, v in best.items()}
        mfu = {k: flops / v / ceiling[("jax " if k.startswith("ours") else "torch ")
                                      + ("float32" if "float32" in k else "bfloat16")] for k, v in best.items()}
        print(f"| {batch} x {seq} | " + " | ".join(f"{rate[n]:,.0f}" for n in names) + " | "
              + " | ".join(f"{rate[a] / rate[b]:.2f}" for a, b in ratios) + " | "
              + " | ".join(f"{mfu[n]:.2f}" for n in names) + " |")
    print("\ngoals: ours bf16 >= 1.0x torch bf16 and >= 2.5x ours f32 at every shape; ours f32 >= 1.0x torch f32 at "
          "4 x 512")


if __name__ == "__main__":
    main()
