"""Where the MSE's weight sits in a span's (input, target) pair cache: by position and by hidden dimension.

    python scripts/span_pair_stats.py runs/p1/pairs_11_8/valid

Prints the identity's MSE (the `none` replacement's error) at position 0 and elsewhere, the share of its squared
error at position 0, the dimensions that carry most of it, and the hidden-state norms by position.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from streamline_jax.train import SpanPairCache


def read(folder: Path, name: str) -> np.ndarray:
    return SpanPairCache(folder, 0, 0).open(name)[:].read().result()  # span numbers are not needed to read


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a SpanPairCache folder (with x_in, target, attention_mask)")
    args = ap.parse_args()
    if not (args.folder / "complete.json").exists():
        raise SystemExit(f"{args.folder} is not a finished pair cache (no complete.json)")
    x, y = read(args.folder, "x_in"), read(args.folder, "target")
    real = read(args.folder, "attention_mask").astype(bool)
    sq = np.square(y - x) * real[..., None]
    print(f"pairs {x.shape} ({real.sum():,} real tokens)")
    print(f"identity MSE: all {sq.sum() / real.sum() / x.shape[-1]:.4g}, position 0 "
          f"{sq[:, 0].sum() / real[:, 0].sum() / x.shape[-1]:.4g}, positions 1+ "
          f"{sq[:, 1:].sum() / real[:, 1:].sum() / x.shape[-1]:.4g}")
    print(f"share of the identity's squared error at position 0: {sq[:, 0].sum() / sq.sum():.1%}")
    for label, part in (("all positions", sq), ("positions 1+", sq[:, 1:])):
        per_dim = part.sum(axis=(0, 1))
        top = np.argsort(per_dim)[::-1][:5]
        print(f"top dimensions, {label}: {top.tolist()} carry {per_dim[top].sum() / per_dim.sum():.1%}")
    for name, a in (("input", x), ("target", y)):
        norms = np.linalg.norm(a, axis=-1)
        print(f"{name} norm: position 0 {norms[:, 0][real[:, 0]].mean():.1f}, positions 1+ "
              f"{norms[:, 1:][real[:, 1:]].mean():.1f}")


if __name__ == "__main__":
    main()
