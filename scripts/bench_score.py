"""Cost of scoring every span vs a plain forward that stops before the LM head, on the same SmolLM2-135M batches;
between them, the forward that keeps every layer's hidden state (what scoring's reduction starts from).

    python scripts/bench_score.py [--batches 2] [--batch-size 4] [--seq-len 512] [--repeats 2] [--compute-dtype auto]

Compile time is measured once for each and reported apart; the timed runs reuse the compiled executables. Goal:
scoring / forward <= 1.1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamline_jax as sj  # noqa: E402
from streamline_jax import data, score  # noqa: E402
from streamline_jax.backend import jit_by_config  # noqa: E402
from streamline_jax.models import transformer  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "train.jsonl"


@jit_by_config(static_argnames=("config",))
def forward_no_head(config, params, input_ids, attention_mask):
    return transformer.apply(config, params, input_ids, attention_mask, return_logits=False)["last_hidden"]


@jit_by_config(static_argnames=("config",))
def forward_every_hidden(config, params, input_ids, attention_mask):
    return transformer.apply(config, params, input_ids, attention_mask, collect_hidden=True,
                             return_logits=False)["hidden"]


def timed(fn, batches, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for ids, mask in batches:
            jax.block_until_ready(fn(ids, mask))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(CORPUS))
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = ap.parse_args()

    model = sj.with_compute_dtype(sj.load("smollm2-135m"), args.compute_dtype)
    chunks = data.split_chunks(data.token_chunks(data.text_source(args.data), model.tokenizer, args.seq_len),
                               calib=args.batches * args.batch_size).calib
    batches = [(jax.numpy.asarray(b["input_ids"]), jax.numpy.asarray(b["attention_mask"]))
               for b in data.batches(chunks, args.batch_size)]
    c, p = model.config, model.params
    ids, mask = batches[0]
    rows = {}
    # each compiled as the run compiles its steps (jit_by_config: the compute dtype's compiler options)
    steps = (("forward, no LM head", forward_no_head), ("forward, every hidden", forward_every_hidden),
             ("score_spans step", score.score_sums))
    steps = [(name, fn.jitted(c)) for name, fn in steps]
    for name, jitted in steps:
        t0 = time.perf_counter()
        compiled = jitted.lower(c, p, ids, mask).compile()
        compile_s = time.perf_counter() - t0
        run = lambda i, m, compiled=compiled: compiled(p, i, m)
        rows[name] = (compile_s, timed(run, batches, args.repeats))
    tokens = args.batches * args.batch_size * args.seq_len
    dtype = model.config.compute_dtype or "float32"
    print(f"SmolLM2-135M on {jax.devices()[0].platform} in {dtype}, {args.batches} batches of "
          f"{args.batch_size}x{args.seq_len} ({tokens} tokens), best of {args.repeats}")
    for name, (compile_s, run_s) in rows.items():
        print(f"  {name:22s} compile {compile_s:6.2f} s   run {run_s:7.3f} s   {tokens / run_s:9.0f} tokens/s")
    base, scoring = rows["forward, no LM head"][1], rows["score_spans step"][1]
    print(f"  ratio scoring / forward: {scoring / base:.3f} (goal <= 1.1); the reduction to sums alone: "
          f"{scoring - rows['forward, every hidden'][1]:.3f} s")
    # the whole public call (Python loop, host transfers, summing across batches) over the same batches
    t0 = time.perf_counter()
    score.score_spans(model, batches)
    print(f"  score_spans end to end: {time.perf_counter() - t0:.3f} s (compiled already)")


if __name__ == "__main__":
    main()
