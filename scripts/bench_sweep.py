"""What a sweep saves: a 4-point sweep against the same 4 points as separate runs, in one invocation.

    python scripts/bench_sweep.py                       # score.sparsity=0.1,0.2,0.3,0.4 on the default model
    python scripts/bench_sweep.py --sweep prune.replacement=none,layer,ffn,mlp
    python scripts/bench_sweep.py -- train.epochs=8 data.train_chunks=192   # settings for every point

Both sides run the command line as a user would, in fresh processes, with the model already converted (the
embedded GGUF's conversion is a one-time cost) and each side with its own empty compilation cache. The separate
runs get no results cache (each evaluates the dense model, as four runs did before the cache existed); the sweep
starts with an empty one. The figures: both wall times, the saving, and the shared work (load, scoring, dense
evaluation) of one separate run; the goal is a saving of at least three times that shared work (four runs pay it
four times, the sweep once). A run's first evaluation scores the dense and the pruned model together; its dense
share is counted as that evaluation less the pruned model's alone (the sweep's later points' median). By default each point trains and evaluates on a cut-down budget (the settings
below) so the comparison takes minutes; the saving does not depend on the training budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = ["data.train_chunks=32", "train.epochs=1", "train.distill_steps=0", "train.eval_every=100", "eval.limit=100",
         "eval.ppl_windows=8", "samples.prompts=[]", "export.hf=false"]


def _command(out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "streamline_jax.run", "--quiet", "--out", str(out), *extra]


def _timed(command: list[str], env: dict) -> float:
    print("$ python", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _dense_evaluation(report: dict, pruned_alone: float) -> float:
    """Seconds a run spent evaluating the dense model: where it ran together with the pruned one (a first
    evaluation, `evaluation.model_group`), that evaluation less `pruned_alone` (a point's pruned model alone)."""
    seconds = report.get("evaluation_s", {})
    return seconds.get("dense", max(seconds.get("together", 0.0) - pruned_alone, 0.0))


def _shared_work(report: dict, pruned_alone: float) -> float:
    """Seconds a run spent on what a sweep shares: loading, scoring, evaluating the dense model."""
    times = report["stage_times"]
    return times["load"] + times.get("score", 0.0) + _dense_evaluation(report, pruned_alone)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="score.sparsity=0.1,0.2,0.3,0.4", help="the swept setting and its values")
    p.add_argument("--full", action="store_true", help="each point at the default run's full budget")
    p.add_argument("settings", nargs="*", help="settings for every point (after --)")
    args = p.parse_args()
    key, _, values = args.sweep.partition("=")
    values = values.split(",")
    settings = ([] if args.full else QUICK) + args.settings
    with tempfile.TemporaryDirectory(prefix="bench_sweep-") as work:
        work = Path(work)
        env = {**os.environ, "STREAMLINE_JAX_RESULTS_CACHE": "off"}
        separate, reports = 0.0, []
        for i, value in enumerate(values):
            env["STREAMLINE_JAX_COMPILATION_CACHE"] = str(work / "xla-separate")
            out = work / f"run{i}"
            separate += _timed(_command(out, [*settings, f"{key}={value}"]), env)
            reports.append(json.loads((out / "report.json").read_text()))
        env.update(STREAMLINE_JAX_COMPILATION_CACHE=str(work / "xla-sweep"),
                   STREAMLINE_JAX_RESULTS_CACHE=str(work / "results"))
        swept = _timed(_command(work / "sweep", [*settings, "--sweep", args.sweep]), env)
        sweep = json.loads((work / "sweep" / "report.json").read_text())
        swept_points = [json.loads((Path(r["folder"]) / "report.json").read_text()) for r in sweep["points"]]
    first = reports[0]
    times = first["stage_times"]
    # the sweep's later points evaluate their pruned model alone (the dense results cached): the typical such time
    alone = sorted(r["evaluation_s"]["pruned"] for r in swept_points if "pruned" in r.get("evaluation_s", {}))
    pruned_alone = alone[len(alone) // 2] if alone else 0.0
    shared = _shared_work(first, pruned_alone)
    saving = separate - swept
    print(f"\n{len(values)} separate runs: {separate:.0f} s; one sweep: {swept:.0f} s; saving {saving:.0f} s "
          f"({separate / swept:.2f}x)")
    print(f"shared work of one run: load {times['load']:.0f} s + score {times['score']:.0f} s + dense evaluation "
          f"{_dense_evaluation(first, pruned_alone):.0f} s = {shared:.0f} s; goal: saving >= "
          f"{len(values) - 1} x {shared:.0f} = {(len(values) - 1) * shared:.0f} s: "
          f"{'met' if saving >= (len(values) - 1) * shared else 'MISSED'}")
    # the same comparison within the runs' own stage times: robust to a machine whose load drifts between the two
    in_separate = sum(_shared_work(r, pruned_alone) for r in reports)
    in_sweep = sum(_shared_work(r, pruned_alone) for r in swept_points)
    print(f"load + score + dense evaluation summed over the points: separate runs {in_separate:.0f} s, sweep "
          f"{in_sweep:.0f} s ({in_separate - in_sweep:.0f} s saved)")
    print("\npoint                      params       " + "  ".join(f"{t:>10s}" for t in sweep["dense"]["tasks"]))
    print(f"{'dense':26s} {sweep['dense']['params']:>11,}  " +
          "  ".join(f"{v:10.4f}" for v in sweep["dense"]["tasks"].values()))
    for r in sweep["points"]:
        print(f"{r['point']:26s} {r['params']:>11,}  " +
              "  ".join(f"{r['tasks'].get(t, float('nan')):10.4f}" for t in sweep["dense"]["tasks"]))
    print(json.dumps({"separate_s": separate, "sweep_s": swept, "shared_s": shared, "points": len(values),
                      "shared_in_separate_s": in_separate, "shared_in_sweep_s": in_sweep,
                      "settings": settings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
