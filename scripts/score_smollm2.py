"""Span scores of SmolLM2-135M on the shared corpus: cosine for length n, the chosen span, block-influence order.

    python scripts/score_smollm2.py [--length 8] [--chunks 50] [--seq-len 512] [--batch-size 8] [--table]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamline_jax as sj  # noqa: E402
from streamline_jax import data, score  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "train.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(CORPUS))
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--table", action="store_true", help="print the whole cosine table")
    args = ap.parse_args()

    model = sj.load("smollm2-135m")
    calib = data.split_chunks(data.token_chunks(data.text_source(args.data), model.tokenizer, args.seq_len),
                              calib=args.chunks).calib
    t0 = time.perf_counter()
    scores = score.score_spans(model, data.batches(calib, args.batch_size), progress=True)
    seconds = time.perf_counter() - t0
    n = args.length
    print(f"SmolLM2-135M, {scores.num_layers} layers; calibration: first {args.chunks} chunks of {args.seq_len} "
          f"tokens of {args.data} ({scores.num_tokens} tokens), scored in {seconds:.1f} s")
    if args.table:
        print(scores)
    row = scores.cosine[:, n]
    print(f"\ncosine(h[s], h[s+{n}]) for every start s:")
    for s in range(scores.num_layers - n + 1):
        print(f"  s={s:2d}  layers {s:2d}..{s + n - 1:2d}  {row[s]:.4f}")
    choice = score.choose_span(scores, length=n)
    print(f"\nchosen span (cosine, n={n}): {choice}")
    angular = score.choose_span(scores.with_metric("angular"), length=n)
    print(f"angular distance would choose: layers [{angular.start}, {angular.end}) ({angular.score:.4f})")
    for r in (0.25,):
        print(f"sparsity {r} with a `layer` replacement: {score.choose_span(scores, sparsity=r)}")
    bi = scores.block_influence
    order = np.argsort(bi, kind="stable")
    print("\nblock influence 1 - cos(h[i], h[i+1]), lowest (most redundant) first:")
    print("  " + ", ".join(f"{i}:{bi[i]:.4f}" for i in order))
    print(f"ShortGPT would drop {n}: {score.choose_layers(scores, count=n)}")


if __name__ == "__main__":
    main()
