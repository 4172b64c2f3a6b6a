"""Causal attention's training step on CPU: the blocked loop's own backward (flash attention's, from the saved
logsumexp: `layers.attend_causal_blocks`) against JAX's autodiff through the same blocked forward, and the forward
alone.

Shapes are SmolLM2-135M's (9 query heads, 3 key heads, head_dim 64) at `--batch` x `--seq` tokens in the compute
dtype; the variants alternate `--reps` times in one process (the machine is shared: compare the minima).

    python scripts/bench_attention.py [--batch 8] [--seq 512] [--dtype bfloat16] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from streamline_jax.models import layers  # noqa: E402


def autodiff_blocks(q, k, v, mask):
    """`layers.attend_causal_blocks` without its custom backward: JAX differentiates the blocked forward."""
    return layers.attend_causal_blocks(q, k, v, mask, own_backward=False)


def timed(fn, reps):
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    q = jnp.asarray(rng.normal(size=(args.batch, args.seq, 9, 64)) / 8, dtype)
    k, v = (jnp.asarray(rng.normal(size=(args.batch, args.seq, 3, 64)), dtype) for _ in range(2))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((args.seq, args.seq), bool)), (args.batch, args.seq, args.seq))

    def grad_of(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    forward = jax.jit(lambda q, k, v: layers.attend_causal_blocks(q, k, v, mask))
    own, autodiff = grad_of(layers.attend_causal_blocks), grad_of(autodiff_blocks)
    times = {"forward": [], "forward + own backward": [], "forward + autodiff backward": []}
    for _ in range(args.reps):
        times["forward"].append(timed(lambda: forward(q, k, v), 1))
        times["forward + own backward"].append(timed(lambda: own(q, k, v), 1))
        times["forward + autodiff backward"].append(timed(lambda: autodiff(q, k, v), 1))
    best = {name: min(t) for name, t in times.items()}
    print(f"blocked causal attention, {args.batch} x {args.seq} tokens, 9 / 3 heads of 64, {args.dtype}, "
          f"min of {args.reps}:")
    for name, t in best.items():
        print(f"  {name:28s} {t * 1000:7.1f} ms ({t / best['forward']:.1f}x the forward)")
    print(f"own backward: {best['forward + autodiff backward'] / best['forward + own backward']:.2f}x faster "
          f"than autodiff (forward + backward)")


if __name__ == "__main__":
    main()
