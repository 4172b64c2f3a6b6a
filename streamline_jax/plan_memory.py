"""Per-chip memory plans for a model on a TPU topology, compiled ahead of time (no TPU, no weights).

    streamline-jax-plan --model llama2-13b --topology v5e:4x4
    streamline-jax-plan --model llama2-70b --topology v5p-32 --stage lm --batch 16
    streamline-jax-plan --model llama2-13b --topology v5e:4x4 --stage lm train.distill_trainable=[block]

Compiles the scoring step, the MSE training step and the LM-loss training step (the KD step where the run's settings
distil: train.mode=kd or train.distill_steps) for the target's mesh layouts
(configs/meshes.yaml) with libtpu, and prints XLA's memory analysis per chip (arguments, outputs, temporaries), the
FLOPs per step and whether it fits the chip's HBM. For a step that does not fit it compiles the nearest layouts
(smaller batch, full remat, tensor parallelism) and names the first that fits.

Beside each step: its expected time at the chip's peak (`step_estimates`: FLOPs and HBM bytes per chip, a roofline;
collectives not counted), and at the end what a run with these settings would take at those times, per stage.
`--topology gpu:N` plans the N-GPU target's layouts compiled for N CPU devices (no GPU compiler without a GPU), at
H100 and H200 peaks.

libtpu is looked for in $LIBTPU_PATH (a folder holding the `libtpu` package), then in the venv's libtpu-site/ (where
`bash scripts/setup.sh --test` installs it), then among the installed packages (`pip install 'jax[tpu]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import jax

from streamline_jax import mesh_layouts, plan, step_estimates
from streamline_jax.models.presets import preset
from streamline_jax.models.transformer import REMAT_POLICIES

GPU_TOPOLOGY = re.compile(r"gpu:(\d+)")


def plan_rows(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a preset name, e.g. llama2-13b")
    ap.add_argument("--topology", required=True, help="a target (v5e-16, 8xH100) or topology (v5e:4x4) from "
                    "meshes.yaml, or gpu:N (the N-GPU target's layouts, compiled for N CPU devices)")
    ap.add_argument("--stage", choices=plan.PLANNED_STEPS, action="append", help="stage(s) to plan (default: all)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: seq_len in meshes.yaml)")
    ap.add_argument("--batch", type=int, help="global batch for every stage (default: the layout's)")
    ap.add_argument("--layout", help="data,fsdp,tensor for every stage (default: the target's)")
    ap.add_argument("--remat", choices=REMAT_POLICIES, help="remat policy for every stage")
    ap.add_argument("--span", help="start,length of the pruned span (default: a quarter of the layers from L/4)")
    ap.add_argument("--meshes", default=str(mesh_layouts.MESHES_YAML), help="mesh layouts file")
    ap.add_argument("--no-search", action="store_true", help="do not look for a layout that fits")
    ap.add_argument("--json", help="also write the rows and the run estimate to this JSON file")
    ap.add_argument("--config", help="the run's --config file (its train settings pick the planned steps)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="the run's overrides, e.g. train.distill_steps=0")
    args = ap.parse_args(argv)

    targets, overrides, seq_len = mesh_layouts.load_targets(args.meshes)
    target = find_target(args.topology, targets)
    chips = step_estimates.target_chips(args.topology if GPU_TOPOLOGY.fullmatch(args.topology) else target.name)
    config = preset(args.model)
    seq_len = args.seq_len or seq_len
    span = tuple(int(x) for x in args.span.split(",")) if args.span else plan.default_span(config)
    run_config = run_settings(args.model, args.config, args.overrides)  # a bad setting fails first, then ...
    training = training_options(run_config)
    devices = compile_devices(target)  # ... no libtpu, or a topology libtpu rejects
    print(f"{args.model} on {target.name} ({target.topology or target.platform}, {len(devices)} × "
          f"{devices[0].device_kind}, {target.hbm_gib} GiB each), seq_len {seq_len}, span start={span[0]} "
          f"length={span[1]}", flush=True)
    if target.platform == "gpu":
        print(f"  compiled for {len(devices)} CPU devices (no GPU compiler here): memory is the CPU program's, "
              f"bytes accessed XLA:CPU's; step times at {', '.join(step_estimates.CHIPS[c].name for c in chips)} "
              f"peaks", flush=True)
    rows, planned = [], {}
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
        row = dict(model=args.model, target=target.name, **plan_row(result, chips),
                   compile_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        _print(row)
        planned[stage] = result
        if not result.fits and not args.no_search:
            found, tried = plan.nearest_fitting(config, target, stage, layout, seq_len, span=span,
                                                training=training)
            for t in tried:
                _print(dict(model=args.model, target=target.name, **plan_row(t, chips)), prefix="  tried ")
            if found:
                print(f"  -> {stage} fits with {found.layout} ({found.total_bytes / plan.GIB:.2f} GiB per chip)")
                rows.append(dict(model=args.model, target=target.name, **plan_row(found, chips), nearest_fit=True))
                planned[stage] = found
            else:
                print(f"  -> no candidate layout fits {stage} on {target.name}; try a larger topology")
    estimate = print_run_estimate(run_config, planned, chips, f"{args.model} on {args.topology}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(stages=rows, run_estimate=estimate), indent=2))
    return rows


def run_settings(model: str, config_file: str | None = None, overrides: list[str] = ()):
    """The run's settings for this preset (configs/pipeline.yaml, the preset's file, then the run's --config file and
    overrides), a `settings.RunConfig`."""
    from streamline_jax.settings import build_config

    return build_config(model, config_file, overrides)[0]


def training_options(run_config) -> dict:
    """The run's train settings as train_replacement options: what the planned steps train (its distillation phase
    makes the `lm` stage kd's)."""
    return {k: v for k, v in dataclasses.asdict(run_config.train).items() if k != "pair_cache"}


def run_training(model: str, config_file: str | None = None, overrides: list[str] = ()) -> dict:
    """`training_options` of the run's settings for this preset."""
    return training_options(run_settings(model, config_file, overrides))


def find_target(name: str, targets: dict) -> mesh_layouts.Target:
    """A target by name or topology, or for `gpu:N` the first GPU target with N devices."""
    m = GPU_TOPOLOGY.fullmatch(name)
    if not m:
        return mesh_layouts.find_target(name, targets)
    gpus = [t for t in targets.values() if t.platform == "gpu" and t.devices == int(m.group(1))]
    if not gpus:
        have = sorted({t.devices for t in targets.values() if t.platform == "gpu"})
        raise mesh_layouts.TopologyError(f"no GPU target with {m.group(1)} devices in meshes.yaml (GPU targets have {have})")
    return gpus[0]


def compile_devices(target: mesh_layouts.Target) -> tuple:
    """The devices the target's steps compile for: libtpu's for a TPU topology; for a GPU target as many CPU
    devices (the GPU compiler needs a GPU), which must be asked for before JAX starts its CPU backend."""
    if target.platform != "gpu":
        return plan.target_devices(target)
    try:
        jax.config.update("jax_num_cpu_devices", target.devices)
    except RuntimeError:  # the backend has started: it has what it has
        pass
    devices = jax.devices("cpu")
    if len(devices) < target.devices:
        raise mesh_layouts.TopologyError(f"{target.name} needs {target.devices} CPU devices to compile for and JAX has "
                                 f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                                 f"{target.devices}")
    return tuple(devices[:target.devices])


def plan_row(result: plan.MemoryPlan, chips) -> dict:
    """The plan's row with each chip's step estimate: FLOPs and bytes accessed per chip, step time, what bounds it."""
    row = result.row()
    for chip in chips:
        est = stage_estimate(result, chip)
        row |= {"est_gib_accessed_per_chip": round(est.bytes / plan.GIB, 2), f"step_s_{chip}": round(est.seconds, 4),
                f"bound_{chip}": est.bound, f"at_least_s_{chip}": round(est.at_least_s, 4)}
    return row


def stage_estimate(result: plan.MemoryPlan, chip: str) -> step_estimates.StepEstimate:
    return step_estimates.step_estimate(chip, result.model_flops / result.layout.devices, result.flops,
                                        result.xla_bytes)


def print_run_estimate(run_config, planned: dict, chips, what: str) -> dict:
    """Prints (and returns) what a run with these settings takes at the planned steps' estimated times."""
    steps = {chip: {stage: (stage_estimate(p, chip), p.layout.batch * p.seq_len) for stage, p in planned.items()}
             for chip in chips}
    work = step_estimates.run_work(run_config)
    missing = sorted({w.stage for w in work} - set(planned))
    planned_len = {p.seq_len for p in planned.values()}
    if planned_len and planned_len != {run_config.data.seq_len}:
        print(f"(steps planned at seq_len {', '.join(map(str, planned_len))}, the run reads {run_config.data.seq_len}: "
              f"its tokens at the planned steps' time per token)")
    out = {}
    for chip in chips:
        parts = step_estimates.run_estimate(work, steps[chip])
        total, lower = sum(p.seconds for p in parts), sum(p.steps * p.step.at_least_s for p in parts)
        fmt = step_estimates.format_seconds
        print(f"a run with these settings, {what}, at {step_estimates.CHIPS[chip].name} peak (collectives not "
              f"counted): {fmt(total)} (roofline), at least {fmt(lower)}"
              + (f"; without the unplanned stage(s) {missing}" if missing else ""))
        for p in parts:
            print(f"  {p.work.what:48s} {p.work.tokens / 1e6:8.2f} M tokens  {p.steps:8.1f} {p.work.stage} steps "
                  f"x {fmt(p.step.seconds):>7s} = {fmt(p.seconds):>8s}  (at least {fmt(p.steps * p.step.at_least_s)})")
        out[chip] = dict(total_s=round(total, 1), at_least_s=round(lower, 1), missing=missing,
                         stages=[dict(what=p.work.what, stage=p.work.stage, tokens=p.work.tokens,
                                      steps=round(p.steps, 1), seconds=round(p.seconds, 1),
                                      at_least_s=round(p.steps * p.step.at_least_s, 1)) for p in parts])
    return out


def _print(r, prefix=""):
    fmt = step_estimates.format_seconds
    steps = "  ".join(f"{c} {fmt(r['step_s_' + c])} ({r['bound_' + c]}; at least {fmt(r['at_least_s_' + c])})"
                      for c in (k[len("step_s_"):] for k in r if k.startswith("step_s_")))
    print(f"{prefix}{r['stage']:8s} {r['layout']:48s} args {r['args_gib']:6.2f} out {r['out_gib']:6.2f} "
          f"temp {r['temp_gib']:6.2f} total {r['total_gib']:6.2f} / {r['hbm_gib']:.0f} GiB  "
          f"{r['tflops_per_chip']:7.1f} TFLOP/chip (XLA, scan body once: {r['xla_tflops_per_chip']:.2f})  "
          f"{r.get('est_gib_accessed_per_chip', float('nan')):7.1f} GiB accessed/chip  step {steps}  "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'}" + (f"  ({r['compile_s']} s)" if "compile_s" in r else ""),
          flush=True)


def main(argv=None) -> int:
    """The command line (`streamline-jax-plan`): the plans printed; a bad model or topology is one error line."""
    try:
        plan_rows(argv)
    except (mesh_layouts.TopologyError, plan.ShardingError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
