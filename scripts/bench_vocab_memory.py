"""Memory and time of one distillation training step against the vocabulary: is it flat?

A small model, SmolLM2-135M's shapes with `--layers` layers (random weights), its layers [1, 1 + `--span`) replaced
by a `layer` block, is built at each `--vocabs` size, everything else equal; what trains is the distillation phase's
default (the block and every decoder layer, the embeddings and head frozen). For each loss of `--losses`
(`train.training_program`'s names: kd, kd_cached, lm) it prints the compiled train step's `memory_analysis()`
(temporary and argument bytes; the arguments count a tied embedding that the dense and pruned models share twice,
though it is one buffer) and, for the evaluation's scoring function (`evaluation.target_logprobs` at
`--eval-batch` x `--eval-seq`), the same. With `--steps N` each (vocabulary, loss) also runs N steps in a fresh
subprocess on real random weights and prints its peak host RSS and its mean step time after the first (compile
included in the peak; for `eval`, the scoring call's time). The machine is shared: run one at a time, and read the
times as rough. `--dtype bfloat16 --compute-dtype float32` is the case of a bf16 model on a CPU without bf16 dots,
whose head the product runs a slice of the vocabulary at a time (`models/vocab_slices.py`); `--head whole` converts it
whole instead, as before, for the comparison.

    python scripts/bench_vocab_memory.py [--vocabs 49152,151936] [--steps 3] [--kd-chunk-logits N]
    python scripts/bench_vocab_memory.py --vocabs 151936 --dtype bfloat16 --compute-dtype float32 --head whole
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

MIB = 2 ** 20


def configs(args, vocab):
    from streamline_jax.backend import auto_compute_dtype
    from streamline_jax.models.presets import preset
    from streamline_jax.pruning import prune_config

    compute = auto_compute_dtype()[0] if args.compute_dtype == "auto" else args.compute_dtype
    dense = dataclasses.replace(preset("smollm2-135m"), vocab_size=vocab, num_layers=args.layers, layout=(),
                                compute_dtype=compute, dtype=args.dtype)
    return dense, prune_config(dense, 1, args.span, "layer")


def program_for(args, dense, pruned, loss, params=None):
    """(training program, trained paths) of `loss` for the distillation phase's trainable set."""
    from streamline_jax import train
    from streamline_jax.models import transformer

    block = train.trainable_blocks(pruned)[0]
    paths = train.trained_paths(params or transformer.abstract_params(pruned), block, ("block", "segments/.*"),
                                ("attention",))
    kd = (train.distillation_settings(dense, pruned, block, paths, 1.0, 0.0, (), 1.0, 4)
          if loss.startswith("kd") else None)
    program = train.training_program(dense, pruned, block, paths, loss, lr=1e-3, min_lr=5e-5, warmup_steps=1,
                                     num_steps=10, weight_decay=0.0, clip_norm=5.0, grad_accum=1, kd=kd)
    return program, paths


def abstract_batch(args, dense, loss):
    from streamline_jax import train

    batch = train.abstract_batch(args.batch, args.seq)
    if loss == "kd_cached":
        batch["x_in"] = batch["target"] = jax.ShapeDtypeStruct((args.batch, args.seq, dense.hidden_size), jnp.float32)
    return batch


def compiled_memory(args, vocab, loss):
    dense, pruned = configs(args, vocab)
    if loss == "eval":
        from streamline_jax import evaluation
        from streamline_jax.models import transformer

        ids = jax.ShapeDtypeStruct((args.eval_batch, args.eval_seq), jnp.int32)
        score = evaluation.target_logprobs.jitted(pruned)  # as the run compiles it
        memory = score.lower(pruned, transformer.abstract_params(pruned), ids, ids).compile().memory_analysis()
    else:
        program, _ = program_for(args, dense, pruned, loss)
        compiled = program.train_step.lower(*program.arguments, abstract_batch(args, dense, loss)).compile()
        memory = compiled.memory_analysis()
    return memory.temp_size_in_bytes / MIB, memory.argument_size_in_bytes / MIB


def run_steps(args, vocab, loss):
    """In this process: `args.steps` train steps on random weights; prints {peak_rss_mib, step_s} as JSON."""
    from streamline_jax import train
    from streamline_jax.models import transformer
    from streamline_jax.pruning import prune_params

    dense, pruned = configs(args, vocab)
    dense_params = transformer.init_params(dense, jax.random.PRNGKey(0))
    _, pruned_params = prune_params(dense, dense_params, 1, args.span, "layer")  # the embeddings: the same arrays
    if loss == "eval":
        return run_scoring(args, vocab, pruned, pruned_params)
    program, paths = program_for(args, dense, pruned, loss, pruned_params)
    trained, frozen_pruned = train.split_params(pruned_params, set(paths).__contains__)
    trained = jax.tree.map(lambda a: a.astype(jnp.float32), trained)
    opt_state = program.tx.init(trained)
    frozen = {"pruned": frozen_pruned, "dense": dense_params} if loss.startswith("kd") else {"pruned": frozen_pruned}
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(0, vocab, (args.batch, args.seq)), jnp.int32) if k == "input_ids"
             else (jnp.ones((args.batch, args.seq), jnp.int32) if k == "attention_mask"
                   else jnp.asarray(rng.normal(size=a.shape), jnp.float32))
             for k, a in abstract_batch(args, dense, loss).items()}
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trained, opt_state, value = program.train_step(trained, opt_state, frozen, batch)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_rss_mib": peak, "step_s": float(np.mean(times[1:] or times))}))


def run_scoring(args, vocab, config, params):
    """`args.steps` calls of the evaluation's scoring function on random ids; prints {peak_rss_mib, step_s}."""
    from streamline_jax import evaluation

    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (args.eval_batch, args.eval_seq)), jnp.int32)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(evaluation.target_logprobs(config, params, ids, ids))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "step_s": float(np.mean(times[1:] or times))}))


def measured_in_subprocess(args, vocab, loss):
    command = [sys.executable, __file__, "--child", f"{vocab}:{loss}"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "vocabs", "losses")]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the step subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", default="49152,151936")
    p.add_argument("--losses", default="kd,kd_cached,lm,eval")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--span", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-seq", type=int, default=1024)
    p.add_argument("--compute-dtype", default="auto", help="auto (the product's choice), float32 or bfloat16")
    p.add_argument("--dtype", default="float32", help="the weights' dtype (float32 or bfloat16)")
    p.add_argument("--head", choices=("sliced", "whole"), default="sliced",
                   help="whole: a head converted for its products is converted whole (the product slices it)")
    p.add_argument("--kd-chunk-logits", type=int, default=0,
                   help="train.KD_CHUNK_LOGITS for this run (0: the product's), to weigh memory against time")
    p.add_argument("--steps", type=int, default=0, help="also run this many steps in a subprocess (0: none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.kd_chunk_logits:
        from streamline_jax import train

        train.KD_CHUNK_LOGITS = args.kd_chunk_logits  # read when the losses are traced
    if args.head == "whole":
        from streamline_jax.models import vocab_slices

        vocab_slices.converts = lambda *dtypes: False  # read when the head is traced
    if args.child:
        vocab, loss = args.child.split(":")
        return run_steps(args, int(vocab), loss)
    print(f"{args.layers} layers of SmolLM2-135M's shapes, span {args.span}, batch {args.batch} x {args.seq} "
          f"(eval {args.eval_batch} x {args.eval_seq}), {jax.devices()[0].platform}, weights {args.dtype}, "
          f"products {args.compute_dtype}, head {args.head}")
    print("| vocabulary | step | temp MiB | arguments MiB | peak RSS MiB | step s |")
    print("|---|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for loss in args.losses.split(","):
            temp, arguments = compiled_memory(args, vocab, loss)
            rss, step = "", ""
            if args.steps:
                run = measured_in_subprocess(args, vocab, loss)
                rss, step = f"{run['peak_rss_mib']:.0f}", f"{run['step_s']:.2f}"
            print(f"| {vocab} | {loss} | {temp:.0f} | {arguments:.0f} | {rss} | {step} |", flush=True)


if __name__ == "__main__":
    main()
