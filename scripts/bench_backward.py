"""bf16 training steps: backward products in bf16 (`layers.product`'s custom VJP) against JAX's own transpose.

With bf16 compute every forward product takes bf16 inputs and accumulates in float32. JAX's transpose of such a
product multiplies the float32 cotangent in float32, so without the custom VJP the backward pass runs at the float32
rate. This times one jitted value-and-grad of each training loss on SmolLM2-135M with layers 10-18 replaced by a
`layer` block (the default run's span), alternating the two variants `--reps` times in one process (the machine is
shared: compare the minima), and prints the ratios.

`kd_autodiff` is the distillation loss with its vocabulary head differentiated by JAX through logits recomputed in
the backward pass (`train.distillation_loss_by_autodiff`, five vocabulary products a chunk), where `kd` makes each
chunk's gradient in the forward pass (`train.distillation_loss`, three): compare the two rows' times. `kd_cached` is
the distillation step as the default run takes it, from the span's pair cache (the teacher from the span's output,
the student from its input): compare it with `kd` for what the cache spares. `kd_cached_topk` is that step with the
teacher's top `--top-k` log-probabilities read from the batch too (`train.kd_top_k`: no teacher layers, no teacher
head; the KL over the top k and the tail): compare it with `kd_cached`.

    python scripts/bench_backward.py [--batch 8] [--seq 512] [--reps 2] [--top-k 64] [--losses kd,kd_cached,kd_cached_topk,kd_autodiff,lm,mse_cached]
    python scripts/bench_backward.py --batch 2 --weights bfloat16 --kd-chunk-tokens 256 --losses kd_cached,kd_cached_topk
    python scripts/bench_backward.py --losses kd_cached --trainable block,after_block   # the default distillation

The second in a small host memory (~1.5 GB): bf16 weights, the distillation's head a quarter of its chunk at a time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--losses", default="kd,kd_cached,kd_cached_topk,kd_autodiff,lm,mse_cached")
    p.add_argument("--top-k", type=int, default=64, help="kd_cached_topk's k (train.kd_top_k)")
    p.add_argument("--weights", default="float32", help="the weights' dtype as loaded (products in bf16 either way)")
    p.add_argument("--trainable", default="block", help="comma-separated train.trainable patterns of the steps "
                   "(e.g. block,after_block: the embedded preset's distillation)")
    p.add_argument("--kd-chunk-tokens", type=int, default=None, help="tokens a distillation head chunk (default: "
                   "train.losses.KD_CHUNK_TOKENS)")
    args = p.parse_args()

    import streamline_jax as sj
    from streamline_jax import train
    from streamline_jax.backend import jit_for
    from streamline_jax.models import layers

    fused_head = train.distillation_loss

    if args.kd_chunk_tokens:
        train.losses.KD_CHUNK_TOKENS = args.kd_chunk_tokens  # read when each loss is traced
    dense = sj.with_compute_dtype(sj.load("smollm2-135m", dtype=args.weights), "bfloat16")
    pruned = sj.prune(dense, 10, 9, replacement="layer")
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, dense.config.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    x = jnp.asarray(rng.normal(size=(args.batch, args.seq, dense.config.hidden_size)), jnp.float32)
    x_in, target = jax.jit(lambda p: train.span_pairs(dense.config, p, ids, mask, 10, 9))(dense.params)
    teacher_top = train.teacher_top_k_fn(dense.config, 19, args.top_k, 1.0)(dense.params, target, mask)
    batches = {"kd": {"input_ids": ids, "attention_mask": mask}, "lm": {"input_ids": ids, "attention_mask": mask},
               "kd_cached": {"input_ids": ids, "attention_mask": mask, "x_in": x_in, "target": target},
               "kd_cached_topk": {"input_ids": ids, "attention_mask": mask, "x_in": x_in, "target": target,
                                  **teacher_top},
               "kd_autodiff": {"input_ids": ids, "attention_mask": mask},
               "mse_cached": {"x_in": x, "target": x, "attention_mask": mask}}
    block = train.trainable_blocks(pruned.config)[0]
    paths = set(train.trained_paths(pruned.params, block, args.trainable.split(","), ("attention",)))
    trained, frozen_pruned = train.split_params(pruned.params, paths.__contains__)
    trained = jax.tree.map(lambda a: a.astype(jnp.float32), trained)
    frozen = {"pruned": frozen_pruned, "dense": dense.params}
    times: dict = {}
    for rep in range(args.reps):
        for variant in ("bf16 backward", "jax transpose"):
            layers.LOW_PRECISION_BACKWARD = variant == "bf16 backward"  # read when each program below is traced
            for loss in args.losses.split(","):
                top_k = args.top_k if loss == "kd_cached_topk" else 0
                kd = (train.distillation_settings(dense.config, pruned.config, block, paths, 1.0, 0.0, (), 0.0,
                                                  top_k=top_k) if loss.startswith("kd") else None)
                # read when the loss is traced, from the losses module (the package's name is only a re-export)
                train.losses.distillation_loss = (train.distillation_loss_by_autodiff if loss == "kd_autodiff"
                                                  else fused_head)
                name = {"kd_autodiff": "kd", "kd_cached_topk": "kd_cached"}.get(loss, loss)
                program = train.training_program(dense.config, pruned.config, block, paths, name, lr=1e-3,
                                                 min_lr=5e-5, warmup_steps=1, num_steps=10, weight_decay=0.0,
                                                 clip_norm=5.0, grad_accum=1, kd=kd)
                step = jit_for(jnp.bfloat16, jax.value_and_grad(program.loss_fn))
                jax.block_until_ready(step(trained, frozen, batches[loss]))  # compile
                start, n = time.perf_counter(), 2
                for _ in range(n):
                    jax.block_until_ready(step(trained, frozen, batches[loss]))
                times.setdefault(loss, {}).setdefault(variant, []).append((time.perf_counter() - start) / n)
                print(f"rep {rep}: {loss:10s} {variant}: {times[loss][variant][-1]:.2f} s", flush=True)
    layers.LOW_PRECISION_BACKWARD, train.losses.distillation_loss = True, fused_head
    tokens = args.batch * args.seq
    print(f"\nvalue_and_grad, {args.batch} x {args.seq} tokens, min of {args.reps}:")
    print("| loss | bf16 backward s | jax transpose s | speed-up | bf16 backward tokens/s |")
    print("|---|---|---|---|---|")
    for loss, by in times.items():
        ours, theirs = min(by["bf16 backward"]), min(by["jax transpose"])
        print(f"| {loss} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x | {tokens / ours:.0f} |")


if __name__ == "__main__":
    main()
