"""The quality-vs-size curve in one command: the pipeline at every combination of a few settings.

    python -m streamline_jax.run --sweep score.sparsity=0.1,0.2,0.3,0.4
    python -m streamline_jax.run --sweep score.sparsity=0.2,0.3 --sweep prune.replacement=none,layer

One process loads the model once and scores it once per calibration setting (`run.SharedWork`); the dense model's
evaluation is computed once and cached on disk by content (`cache.py`), so later sweeps and reruns reuse it too.
Each point is an ordinary run folder under `OUT/points/`: it resumes on its own, and a finished point is never
recomputed. The sweep's report (report.json, report.md, plots/sweep.png) is rewritten after every point.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from pathlib import Path

import yaml

from . import pipeline, run_folder, run_inputs, settings
from .files import write_atomic
from .report import jsonable, plot_sweep, sweep_markdown, write_json

log = logging.getLogger(__name__)

SWEEP_SETTINGS = "sweep.yaml"


def split_values(text: str) -> list[str]:
    """'0.1,0.2' -> ['0.1', '0.2']; commas inside brackets stay ('[piqa,arc_easy],[piqa]' is two values)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def parse_axes(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--sweep key=v1,v2` arguments -> [(key, [raw values])], each key checked like an override."""
    axes = []
    for item in items:
        key, eq, raw = item.partition("=")
        values = [v.strip() for v in split_values(raw)] if eq else []
        if not key or not values or any(v == "" for v in values):
            raise settings.ConfigError(f"--sweep {item!r} is not key=value1,value2,... "
                                      f"(e.g. score.sparsity=0.1,0.2,0.3)")
        if key in (k for k, _ in axes):
            raise settings.ConfigError(f"--sweep {key} is given twice; list all its values in one --sweep")
        settings.check_layer(settings.parse_overrides([f"{key}={values[0]}"]), "--sweep")  # the key exists
        axes.append((key, values))
    return axes


def point_name(pairs: list[tuple[str, str]]) -> str:
    """A folder name for one point, e.g. 'score.sparsity=0.1,prune.replacement=layer'."""
    return ",".join(re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{k}={v}") for k, v in pairs)


def points(axes) -> list[list[tuple[str, str]]]:
    return [list(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_overrides(overrides: list[str], pairs) -> list[str]:
    """A point's overrides: the base's, then the point's values. Sweeping one of two alternative settings
    (`score.sparsity` / `score.num_layers`) sets the other to null, wherever the base set it, unless it is swept
    too."""
    swept = {key for key, _ in pairs}
    nulls = [f"{other}=null" for key in swept
             if (other := settings.ALTERNATIVE_SETTINGS.get(key)) and other not in swept]
    return [*overrides, *nulls, *(f"{k}={v}" for k, v in pairs)]


def _check_sweep_folder(out: Path, recorded: dict, overwrite: bool) -> None:
    """A sweep folder holds one sweep: other base settings are refused (naming them) unless overwrite."""
    path = out / SWEEP_SETTINGS
    if not path.exists():
        if out.exists() and any(p.name != run_folder.LOCK for p in out.iterdir()):
            raise settings.ConfigError(f"{out} holds files that are not a sweep's; choose another --out")
        return
    saved = yaml.safe_load(path.read_text()) or {}
    if overwrite or saved.get("base") == recorded["base"]:
        return
    diff = run_folder.settings_diff(saved.get("base", {}), recorded["base"])
    raise settings.ConfigError(f"{out} holds a sweep with other base settings ({'; '.join(diff)}); pass --overwrite "
                              f"to run this sweep there, or choose another --out")


def point_row(name: str, pairs, report: dict, folder: Path) -> dict:
    """One row of the sweep's table from a point's report."""
    span, params = report.get("span") or {}, report.get("params") or {}
    row = {"point": name, "settings": dict(pairs), "folder": str(folder),
           "spans": [[s["start"], s["length"]] for s in report.get("spans", [])] or
                    ([[span["start"], span["length"]]] if span else []),
           "replacement": span.get("replacement"), "params": params.get("pruned"),
           "params_removed": (1 - params["pruned"] / params["dense"]) if params else None,
           "train_s": report.get("stage_times", {}).get("train"), "tasks": {}}
    pruned = (report.get("evaluation") or {}).get("pruned", {}).get("tasks", {})
    row["tasks"] = {task: task_figure(t) for task, t in pruned.items()}
    row["retention"] = (report.get("retention") or {}).get("mean_retention")
    return row


def task_figure(result: dict) -> float | None:
    """A task's headline figure: perplexity, else accuracy."""
    return result.get("perplexity", result.get("acc"))


def dense_row(report: dict) -> dict:
    dense = (report.get("evaluation") or {}).get("dense", {})
    tasks = {task: task_figure(t) for task, t in dense.get("tasks", {}).items()}
    return {"params": report.get("model", {}).get("params"), "tasks": tasks}


def write_sweep_report(out: Path, recorded: dict, rows: list[dict], dense: dict | None, times: dict,
                       unfinished: list[str]) -> dict:
    """The sweep's report.json and report.md: the points finished so far, and those not yet (`unfinished`)."""
    report = {**recorded, "dense": dense, "points": rows, "unfinished": unfinished, "times": times,
              "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (out / "plots").mkdir(exist_ok=True)
    if dense and any(r["params"] for r in rows):
        plot_sweep(rows, dense, out / "plots" / "sweep.png")
        report["plot"] = "plots/sweep.png"
    write_json(report, out / "report.json")
    write_atomic(out / "report.md", sweep_markdown(jsonable(report)))
    return report


def run_sweep(model: str | None, config_file: str | None, overrides: list[str], axes, out: Path,
              stages=settings.STAGES, *, overwrite: bool = False, progress: bool = True,
              target: str | None = None) -> dict:
    """Every point of `axes` (see `parse_axes`) into OUT/points/<name>/; return the sweep's report."""
    from .distributed import is_main_process

    out = Path(out).absolute()
    base, preset = settings.build_config(model, config_file, overrides)
    plan = []  # every point's settings are checked before any work
    for pairs in points(axes):
        config, _ = settings.build_config(model, config_file, point_overrides(overrides, pairs))
        try:
            run_inputs.check_inputs(config, stages)
        except settings.ConfigError as e:
            raise settings.ConfigError(f"sweep point {point_name(pairs)}: {e}") from None
        plan.append((point_name(pairs), pairs, config))
    recorded = {"model": model or settings.DEFAULT_MODEL, "base": base.to_dict(),
                "axes": [{"key": k, "values": v} for k, v in axes], "stages": list(stages)}
    _check_sweep_folder(out, recorded, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_atomic(out / SWEEP_SETTINGS, yaml.safe_dump(recorded, sort_keys=False))
    shared = pipeline.SharedWork()
    rows, dense, times = [], None, {}
    start = time.perf_counter()
    for i, (name, pairs, config) in enumerate(plan):
        folder = out / "points" / name
        if (folder / run_folder.DONE).exists() and not overwrite:
            log.info("sweep point %d/%d %s: finished already", i + 1, len(plan), name)
            report = json.loads((folder / "report.json").read_text())
        else:
            log.info("sweep point %d/%d: %s", i + 1, len(plan), name)
            report = pipeline.run(config, folder, stages, overwrite=overwrite, preset=preset, progress=progress,
                                 target=target, shared=shared)
            times[name] = report.get("stage_times", {})
        rows.append(point_row(name, pairs, report, folder))
        dense = dense or (dense_row(report) if report.get("evaluation") else None)
        times["total"] = time.perf_counter() - start
        if is_main_process():
            write_sweep_report(out, recorded, rows, dense, times, [n for n, _, _ in plan[i + 1:]])
    return {**recorded, "dense": dense, "points": rows, "times": times}
