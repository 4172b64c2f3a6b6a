"""Replacement-block training on SmolLM2-135M: training tokens/s, and peak host memory for 1000 vs 4000 chunks.

Each measurement runs in a fresh child process, so its peak resident memory (ru_maxrss) is its own. Training data
stream from ../shared/data/corpus/train.jsonl (re-tokenized each epoch, never held whole); the MSE pairs, and in KD
mode the teacher's logits (a chunk of tokens at a time), are computed inside the jitted step, so host memory must not
grow with the number of chunks: the two peaks should be about equal. `--mode` picks the loss (mse, lm or kd: compare
kd's tokens/s with lm's for what the teacher costs per step).

The tokens/s figure is measured twice, each in its own process: reading every step's loss as it comes
(`log_every=1`, the loop as it was: the host waits for the device after each step) and every `--log-every` steps
(the host prepares and dispatches the next batches while the device runs), over the same steps after the first
`--log-every` (compile and warm-up).

    python scripts/bench_train.py [--mode mse|lm|kd] [--seq 64] [--counts 1000,4000|none] [--speed-steps 16] [--log-every 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LOG_EVERY = 4  # the bench's: few steps, so that most are measured after the first read


def child(args):
    import streamline_jax as sj
    from streamline_jax import data, tasks
    from streamline_jax.pruning import prune

    model = sj.load("smollm2-135m")
    corpus = tasks.shared_data_dir() / "corpus" / "train.jsonl"

    def chunks():
        stream = data.token_chunks(data.text_source(str(corpus)), model.tokenizer, args.seq)
        return data.split_chunks(stream, calib=0, train=args.chunks).train

    pruned = prune(model, 11, 8, "layer")
    steps = []
    t = time.perf_counter()
    sj.train_replacement(model, pruned, chunks, batch_size=args.batch, mode=args.mode, lr=2e-4, min_lr=5e-5,
                         progress=False, log_every=args.log_every,
                         on_step=lambda step, loss: steps.append(time.perf_counter()))
    wall = time.perf_counter() - t
    # steady-state speed, from the step where the losses are first read (`--from-step`: after compile and warm-up;
    # where they are read in bulk, on_step sees a step when its loss is read, not when it is done)
    first = args.from_step
    steady = ((len(steps) - first) * args.batch * args.seq / (steps[-1] - steps[first - 1])
              if len(steps) > first else float("nan"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"chunks": args.chunks, "seq": args.seq, "steps": len(steps), "wall_s": wall,
                      "tokens_per_s": steady, "peak_rss_mib": peak_mib}))


def run_child(chunks, seq, batch, mode, log_every=LOG_EVERY, from_step=1):
    cmd = [sys.executable, __file__, "--child", "--chunks", str(chunks), "--seq", str(seq), "--batch", str(batch),
           "--mode", mode, "--log-every", str(log_every), "--from-step", str(from_step)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--seq", type=int, default=64, help="chunk length for the memory comparison")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", default="mse", choices=("mse", "lm", "kd"))
    ap.add_argument("--counts", default="1000,4000", help="chunk counts for the memory comparison (none: skip it)")
    ap.add_argument("--speed-steps", type=int, default=16, help="steps at 512 tokens for the tokens/s figure")
    ap.add_argument("--log-every", type=int, default=LOG_EVERY, help="steps between reads of the losses")
    ap.add_argument("--from-step", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.speed_steps <= args.log_every:
        raise SystemExit(f"--speed-steps ({args.speed_steps}) must exceed --log-every ({args.log_every}): the speed "
                         f"is measured after the first read of the losses")
    print(f"{args.mode} training, `layer` block over layers [11, 19), batch {args.batch} x 512, steps "
          f"{args.log_every + 1}..{args.speed_steps} (steady state):")
    speeds = {}
    for log_every in (1, args.log_every):
        r = run_child(args.speed_steps * args.batch, 512, args.batch, args.mode, log_every, args.log_every)
        speeds[log_every] = r["tokens_per_s"]
        how = "each step's loss read as it comes (the old loop)" if log_every == 1 else "losses read in bulk"
        print(f"  log_every={log_every:<3d} {r['tokens_per_s']:8.0f} training tokens/s  ({how})")
    print(f"  speed-up from not waiting on each step: {speeds[args.log_every] / speeds[1]:.3f}x")
    if args.counts == "none":
        return
    peaks = []
    for count in (int(c) for c in args.counts.split(",")):
        r = run_child(count, args.seq, args.batch, args.mode, args.log_every, args.log_every)
        peaks.append(r["peak_rss_mib"])
        print(f"{count:5d} chunks x {args.seq} tokens: peak host memory {r['peak_rss_mib']:.0f} MiB, "
              f"{r['tokens_per_s']:.0f} tokens/s, wall {r['wall_s']:.0f} s")
    print(f"peak memory ratio (largest / smallest count): {peaks[-1] / peaks[0]:.3f} (goal: about 1)")


if __name__ == "__main__":
    main()
