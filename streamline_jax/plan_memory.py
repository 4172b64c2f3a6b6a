"""Per-chip memory plans for a model on a TPU topology, compiled ahead of time (no TPU, no weights).

    streamline-jax-plan --model llama2-13b --topology v5e:4x4
    streamline-jax-plan --model llama2-70b --topology v5p-32 --stage lm --batch 16
    streamline-jax-plan --model llama2-13b --topology v5e:4x4 --stage lm train.distill_trainable=[block]

Compiles the scoring step, the MSE training step and the LM-loss training step (the KD step where the run's settings
distil: train.mode=kd or train.distill_steps) for the target's mesh layouts
(configs/meshes.yaml) with libtpu, and prints XLA's memory analysis per chip (arguments, outputs, temporaries), the
FLOPs per step and whether it fits the chip's HBM. For a step that does not fit it compiles the nearest layouts
(smaller batch, full remat, tensor parallelism) and names the first that fits.

libtpu is looked for in $LIBTPU_PATH (a folder holding the `libtpu` package), then in the venv's libtpu-site/ (where
`bash scripts/setup.sh --test` installs it), then among the installed packages (`pip install 'jax[tpu]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from streamline_jax import mesh_layouts, plan
from streamline_jax.models.presets import preset
from streamline_jax.models.transformer import REMAT_POLICIES


def plan_rows(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a preset name, e.g. llama2-13b")
    ap.add_argument("--topology", required=True, help="a target (v5e-16) or topology (v5e:4x4) from meshes.yaml")
    ap.add_argument("--stage", choices=plan.PLANNED_STEPS, action="append", help="stage(s) to plan (default: all)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: seq_len in meshes.yaml)")
    ap.add_argument("--batch", type=int, help="global batch for every stage (default: the layout's)")
    ap.add_argument("--layout", help="data,fsdp,tensor for every stage (default: the target's)")
    ap.add_argument("--remat", choices=REMAT_POLICIES, help="remat policy for every stage")
    ap.add_argument("--span", help="start,length of the pruned span (default: a quarter of the layers from L/4)")
    ap.add_argument("--meshes", default=str(mesh_layouts.MESHES_YAML), help="mesh layouts file")
    ap.add_argument("--no-search", action="store_true", help="do not look for a layout that fits")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--config", help="the run's --config file (its train settings pick the planned steps)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="the run's overrides, e.g. train.distill_steps=0")
    args = ap.parse_args(argv)

    targets, overrides, seq_len = mesh_layouts.load_targets(args.meshes)
    target = mesh_layouts.find_target(args.topology, targets)
    config = preset(args.model)
    seq_len = args.seq_len or seq_len
    span = tuple(int(x) for x in args.span.split(",")) if args.span else plan.default_span(config)
    training = run_training(args.model, args.config, args.overrides)  # a bad setting fails first, then ...
    devices = plan.target_devices(target)  # ... no libtpu, or a topology libtpu rejects
    print(f"{args.model} on {target.name} ({target.topology}, {len(devices)} × {devices[0].device_kind}, "
          f"{target.hbm_gib} GiB each), seq_len {seq_len}, span start={span[0]} length={span[1]}", flush=True)
    rows = []
    for stage in args.stage or plan.PLANNED_STEPS:
        layout = target.layout(stage, args.model, overrides)
        if args.layout:
            d, f, t = (int(x) for x in args.layout.split(","))
            layout = layout.replace(data=d, fsdp=f, tensor=t)
        if args.batch:
            layout = layout.replace(batch=args.batch)
        if args.remat:
            layout = layout.replace(remat=args.remat)
        t0 = time.perf_counter()
        result = plan.plan_stage(config, target, stage, layout, seq_len, span=span, training=training,
                                 devices=devices)
        row = dict(model=args.model, target=target.name, **result.row(), compile_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        _print(row)
        if not result.fits and not args.no_search:
            found, tried = plan.nearest_fitting(config, target, stage, layout, seq_len, span=span,
                                                training=training)
            for t in tried:
                _print(dict(model=args.model, target=target.name, **t.row()), prefix="  tried ")
            if found:
                print(f"  -> {stage} fits with {found.layout} ({found.total_bytes / plan.GIB:.2f} GiB per chip)")
                rows.append(dict(model=args.model, target=target.name, **found.row(), nearest_fit=True))
            else:
                print(f"  -> no candidate layout fits {stage} on {target.name}; try a larger topology")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def run_training(model: str, config_file: str | None = None, overrides: list[str] = ()) -> dict:
    """The run's training settings for this preset (configs/pipeline.yaml, the preset's file, then the run's --config
    file and overrides), as train_replacement options: what the planned steps train (its distillation phase makes the
    `lm` stage kd's)."""
    import dataclasses

    from streamline_jax.settings import build_config

    run_config, _ = build_config(model, config_file, overrides)
    return {k: v for k, v in dataclasses.asdict(run_config.train).items() if k != "pair_cache"}


def _print(r, prefix=""):
    print(f"{prefix}{r['stage']:8s} {r['layout']:48s} args {r['args_gib']:6.2f} out {r['out_gib']:6.2f} "
          f"temp {r['temp_gib']:6.2f} total {r['total_gib']:6.2f} / {r['hbm_gib']:.0f} GiB  "
          f"{r['tflops_per_chip']:7.1f} TFLOP/chip (XLA, scan body once: {r['xla_tflops_per_chip']:.2f})  {'fits' if r['fits'] else 'DOES NOT FIT'}"
          + (f"  ({r['compile_s']} s)" if "compile_s" in r else ""), flush=True)


def main(argv=None) -> int:
    """The command line (`streamline-jax-plan`): the plans printed; a bad model or topology is one error line."""
    try:
        plan_rows(argv)
    except (plan.TopologyError, plan.ShardingError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
