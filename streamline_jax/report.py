"""The run's report: report.json (everything, machine-readable), report.md (a readable summary) and three plots:
the span-score heatmap over (start, length) with the chosen span marked, block influence per layer, and the
training loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .files import atomic_open, write_atomic


RETENTION_HEADER = "| task | metric | dense | pruned | retention | stability | agreement | flips |"


def answer_columns(row: dict, stability: dict, agreement: dict) -> str:
    """The stability, agreement and flips cells of a retention row: filled on a multiple-choice task's `acc` row."""
    if row["metric"] != "acc" or row["task"] not in stability:
        return " | ".join([""] * 3)
    agree = agreement.get(row["task"])
    cells = [f"{stability[row['task']]:.4f}"]
    cells += [f"{agree['agreement']:.2%}", f"{agree['flips']:.2%} (-{agree['right_to_wrong']:.2%} "
                                           f"+{agree['wrong_to_right']:.2%})"] if agree else ["", ""]
    return " | ".join(cells)


def jsonable(x):
    """numpy scalars/arrays to Python, NaN/inf to None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(report: dict, path: Path) -> None:
    write_atomic(path, json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Plots


def save_figure(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format=Path(path).suffix.lstrip("."))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_span_scores(table, metric: str, chosen: tuple[int, int] | None, path: Path) -> None:
    """Heatmap of a [L, L+1] (start, length) table: start on x, length on y; the chosen span is boxed."""
    plt = _pyplot()
    table = np.asarray(table, np.float64)
    layers = table.shape[0]
    grid = table[:, 1:].T  # [length-1, start]
    fig, ax = plt.subplots(figsize=(7, 5.5))
    cmap = "viridis" if metric == "cosine" else "viridis_r"  # bright = redundant either way
    im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap=cmap,
                   extent=(-0.5, layers - 0.5, 0.5, layers + 0.5))
    fig.colorbar(im, ax=ax, label=f"{metric} between h[start] and h[start+length]")
    if chosen is not None:
        s, n = chosen
        ax.add_patch(plt.Rectangle((s - 0.5, n - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.annotate(f"chosen: layers {s}..{s + n - 1}", (s, n), xytext=(8, 8), textcoords="offset points",
                    color="red", fontsize=9, fontweight="bold")
    ax.set_xlabel("start layer")
    ax.set_ylabel("span length (layers)")
    ax.set_title(f"span scores ({metric}); bright = most redundant")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_block_influence(block_influence, chosen: tuple[int, int] | None, path: Path) -> None:
    """ShortGPT's block influence 1 - cos(h[i], h[i+1]) per layer; the pruned span's bars in red."""
    plt = _pyplot()
    bi = np.asarray(block_influence, np.float64)
    colors = ["tab:blue"] * len(bi)
    if chosen is not None:
        for i in range(chosen[0], chosen[0] + chosen[1]):
            colors[i] = "tab:red"
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(np.arange(len(bi)), bi, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("block influence (1 - cos)")
    ax.set_title("block influence per layer" + ("; red: pruned span" if chosen else ""))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_loss(history: dict, path: Path) -> None:
    """Training loss per step, and the validation loss where it was measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    train = history.get("train") or []
    if train:
        steps, losses = zip(*[(s, l) for s, l, *_ in train])
        ax.plot(steps, losses, label="train", color="tab:blue")
    valid = history.get("valid") or []
    if valid:
        steps, losses = zip(*[(s, l) for s, l in valid])
        ax.plot(steps, losses, "o-", label="valid", color="tab:orange")
    if history.get("best_step") is not None and valid:
        ax.axvline(history["best_step"], color="grey", linestyle=":", label="best (kept)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{history.get('mode', 'training')} loss")
    if train or valid:
        values = [l for _, l, *_ in train] + [l for _, l in valid]
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
    ax.legend()
    ax.set_title("replacement block training")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(v, spec=".4f"):
    return "n/a" if v is None else format(v, spec)


def to_markdown(report: dict) -> str:
    lines = [f"# LLM-Streamline run: {report.get('model', {}).get('source', '?')}", ""]
    model = report.get("model", {})
    if model:
        lines += [f"- model: `{model.get('source')}`, {model.get('layers')} layers, {model.get('params', 0):,} "
                  f"parameters, {model.get('dtype')}"]
        if model.get("compute_dtype"):  # what the matmuls ran in, and why `auto` chose it
            why = f" ({model['compute_dtype_why']})" if model.get("compute_dtype_why") else ""
            lines.append(f"- compute: {model['compute_dtype']}{why}")
    stages = report.get("stages", [])
    layouts = report.get("layouts") or {}
    if any(layouts.values()):  # the meshes.yaml layout each stage ran on
        lines.append("- layouts: " + "; ".join(f"{name}: {layout or 'mesh.* settings'}"
                                               for name, layout in layouts.items()))
    lines += [f"- stages: {', '.join(stages)}", f"- finished: {report.get('finished', 'no')}", ""]
    spans = report.get("spans") or ([report["span"]] if report.get("span") else [])
    if spans:
        lines += ["## Chosen span" + ("s" if len(spans) > 1 else ""), ""]
        lines += [f"Layers {span['start']}..{span['end'] - 1} ({span['length']} layers) by {span['metric']} "
                  f"(score {_fmt(span.get('score'))}), replaced by `{span['replacement']}`: "
                  f"{span['params_removed']:,} of {span['params_total']:,} parameters removed net "
                  f"({span['sparsity']:.2%})." for span in spans]
        lines.append("")
    if report.get("span_heal"):
        lines += _heal_lines(report["span_heal"])
    params = report.get("params")
    if params:
        lines += [f"Parameters: dense {params['dense']:,} → pruned {params['pruned']:,} "
                  f"({params['pruned'] / params['dense']:.2%}); layers {params['dense_layers']} → "
                  f"{params['pruned_layers']}.", ""]
    plots = report.get("plots", {})
    if plots.get("span_scores"):
        lines += ["## Scores", "", f"![span scores]({plots['span_scores']})", ""]
    if plots.get("block_influence"):
        lines += [f"![block influence]({plots['block_influence']})", ""]
    if report.get("training"):
        lines += _training_lines(report["training"], plots)
    lines += _evaluation_lines(report)
    if report.get("samples"):
        lines += ["## Samples (greedy)", "", report["samples"], ""]
    outputs = report.get("outputs")
    if outputs:
        lines += ["## Outputs", ""] + [f"- {k}: {v}" for k, v in outputs.items()] + [""]
    times = report.get("stage_times")
    if times:
        lines += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
        lines.append("")
    return "\n".join(lines)


def _heal_lines(heal: dict) -> list[str]:
    """score.metric=heal: each candidate's cosine, validation loss after the heal, and seconds."""
    lines = [f"Candidates healed {heal['steps']} MSE steps each, by next-token loss over {heal['num_tokens']:,} "
             f"validation tokens (the cosine alone chose layers from {heal['cosine_choice']}):", "",
             "| start | length | cosine | loss after the heal | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {h['start']}{' (chosen)' if h['start'] == heal['chosen'] else ''} | {h['length']} | "
              f"{h['cosine']:.4f} | {h['loss']:.4f} | {h['seconds']:.1f} |" for h in heal["candidates"]]
    return lines + [""]


def _training_lines(training: dict, plots: dict) -> list[str]:
    lines = ["## Training", ""]
    for block in training.get("blocks", [training]):
        which = f"block {block['block']} (layers {block['span'][0]}..{sum(block['span']) - 1}): " \
            if "blocks" in training else ""
        for phase in (block, block.get("distill")):
            if phase is None:
                continue
            train = phase.get("train") or []
            then = "then distillation: " if phase is not block else which
            lines += [f"{then}{phase.get('mode')} loss, {len(train)} steps in {phase.get('wall_s', 0):.1f} s; "
                      f"first {_fmt(train[0][1] if train else None)}, last {_fmt(train[-1][1] if train else None)}"
                      f"; best validation {_fmt(phase.get('best_valid'))} at step {phase.get('best_step')}.", ""]
            if phase.get("self_data"):
                lines += [_self_data_line(phase["self_data"]), ""]
    if plots.get("loss"):
        lines += [f"![training loss]({plots['loss']})", ""]
    return lines


def _self_data_line(made: dict) -> str:
    speed = f" ({made['tokens_per_s']:.0f} new tokens/s)" if made.get("tokens_per_s") else ""
    return (f"The distillation read the dense model's own text (data.distill_text=self, {made['cache']}): "
            f"{made['texts']} answers, {made['tokens']} tokens in {made['chunks']} chunks; {made['batches']} "
            f"batches, {made['batches_reused']} reused, the others generated in {made['generation_s']:.1f} s{speed}; "
            f"chat template: {'yes' if made['chat_template'] else 'no'}."
            + (f" Each batch held {made['self_rows']} rows of them, the rest training chunks (data.self_mix; "
               f"{made['corpus_chunks']} training chunks in all)." if made.get("self_rows") else ""))


def _evaluation_lines(report: dict) -> list[str]:
    """The retention table (else each model's figures), and lm-evaluation-harness's table."""
    lines = []
    retention = report.get("retention")
    if retention:
        lines += ["## Evaluation", "", RETENTION_HEADER, "|---|---|---|---|---|---|---|---|"]
        for r in retention["rows"]:
            cells = answer_columns(r, retention["stability"], retention.get("agreement", {}))
            lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['dense'])} | {_fmt(r['pruned'])} | "
                         f"{_fmt(r['retention'], '.2%')} | {cells} |")
        if retention.get("mean_retention") is not None:
            lines += ["", f"Mean accuracy retention: {retention['mean_retention']:.2%}."]
        lines.append("")
    elif report.get("evaluation"):
        lines += ["## Evaluation", ""]
        for which, res in report["evaluation"].items():
            for name, t in res.get("tasks", {}).items():
                value = t.get("perplexity", t.get("acc"))
                lines.append(f"- {which} {name}: {_fmt(value)}")
        lines.append("")
    harness = report.get("harness")
    if harness:
        lines += ["## lm-evaluation-harness", "", "| task | metric | " + " | ".join(harness) + " |",
                  "|---|---|" + "---|" * len(harness)]
        first = next(iter(harness.values()))
        for task, metrics in first.items():
            for metric in metrics:
                values = [harness[m].get(task, {}).get(metric) for m in harness]
                cells = [str(v) if isinstance(v, int) else _fmt(v) for v in values]
                lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_report(report: dict, folder: Path, scores=None, chosen=None, history=None) -> dict:
    """Write the plots (those whose data exist), report.json and report.md into `folder`; return the report."""
    folder = Path(folder)
    plots = {}
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    if scores is not None:
        plot_span_scores(scores.table(scores.span_metric), scores.span_metric, chosen,
                         folder / "plots" / "span_scores.png")
        plot_block_influence(scores.block_influence, chosen, folder / "plots" / "block_influence.png")
        plots.update(span_scores="plots/span_scores.png", block_influence="plots/block_influence.png")
    if history and (history.get("train") or history.get("valid")):
        plot_loss(history, folder / "plots" / "loss.png")
        plots["loss"] = "plots/loss.png"
    report = {**report, "plots": plots}
    write_json(report, folder / "report.json")
    write_atomic(folder / "report.md", to_markdown(jsonable(report)))
    return report


def summary(report: dict, folder: Path) -> str:
    """The few lines the command line prints at the end: span, parameters, dense vs pruned, time, outputs."""
    lines = []
    params = report.get("params")
    for span in report.get("spans") or ([report["span"]] if report.get("span") else []):
        lines.append(f"span: layers {span['start']}..{span['end'] - 1} ({span['length']} layers, {span['metric']} "
                     f"{_fmt(span.get('score'))}) -> one `{span['replacement']}` block")
    if params:
        lines.append(f"parameters: {params['dense']:,} -> {params['pruned']:,} "
                     f"({1 - params['pruned'] / params['dense']:.2%} removed); layers {params['dense_layers']} -> "
                     f"{params['pruned_layers']}")
    retention = report.get("retention")
    if retention:
        width = max(len(f"{r['task']} {r['metric']}") for r in retention["rows"])
        lines.append(f"{'':{width}}  {'dense':>9}  {'pruned':>9}  pruned/dense")
        for r in retention["rows"]:
            ratio = r["pruned"] / r["dense"] if r["dense"] else float("nan")
            agree = retention.get("agreement", {}).get(r["task"]) if r["metric"] == "acc" else None
            answers = f"  (same answer {agree['agreement']:.1%}, flips {agree['flips']:.1%})" if agree else ""
            lines.append(f"{r['task'] + ' ' + r['metric']:{width}}  {r['dense']:9.4f}  {r['pruned']:9.4f}  "
                         f"{ratio:.3f}{answers}")
    times = report.get("stage_times", {})
    if times:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in times.items() if k != "total")
        lines.append(f"time: {times.get('total', 0):.0f} s ({parts})")
    outputs = ", ".join(v.split(" ")[0] for v in report.get("outputs", {}).values() if not v.startswith("not "))
    lines.append(f"outputs in {folder}: report.md, report.json" + (f", {outputs}" if outputs else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# A sweep's report (streamline_jax.sweep)


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Points grouped into lines: by every swept setting except the one that sets the size."""
    size_keys = {"score.sparsity", "score.num_layers", "score.spans"}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["settings"].items() if k not in size_keys)
        groups.setdefault(label or (r.get("replacement") or "pruned"), []).append(r)
    return groups


def plot_sweep(rows: list[dict], dense: dict, path: Path) -> None:
    """Each task's figure (perplexity on a log axis, accuracy) against parameter count: a line per series of
    points, the dense model as a star."""
    plt = _pyplot()
    tasks = list(dense["tasks"])
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5.2 * max(len(tasks), 1), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ppl = dense["tasks"][task] > 1.5  # accuracies lie in [0, 1]
        values = [v for r in rows for v in [r["tasks"].get(task)] if v] + [dense["tasks"][task]]
        for label, group in _series(rows).items():
            pts = sorted((r["params"], r["tasks"].get(task)) for r in group if r["params"] and
                         r["tasks"].get(task) is not None)
            if pts:
                ax.plot([p / 1e6 for p, _ in pts], [v for _, v in pts], "o-", label=label)
        ax.plot([dense["params"] / 1e6], [dense["tasks"][task]], "k*", markersize=12, label="dense")
        if ppl and max(values) > 3 * min(values):  # a log axis only where the range calls for one
            ax.set_yscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("perplexity" if ppl else "accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _incomplete(report: dict) -> list[str]:
    """The line saying a sweep stopped before its last point (an interrupt, a failure), or none."""
    unfinished = report.get("unfinished") or []
    if not unfinished:
        return []
    done = len(report.get("points", []))
    return ["", f"**Incomplete: {done} of {done + len(unfinished)} points finished**; not yet run: "
                f"{', '.join(unfinished)}. The same command continues the sweep."]


def sweep_markdown(report: dict) -> str:
    rows, dense = report.get("points", []), report.get("dense") or {"tasks": {}, "params": None}
    axes = ", ".join(f"`{a['key']}` = {', '.join(a['values'])}" for a in report.get("axes", []))
    tasks = list(dense["tasks"]) or sorted({t for r in rows for t in r["tasks"]})
    lines = [f"# LLM-Streamline sweep: {report.get('model')}", "", f"Swept: {axes}. Updated {report.get('updated')}.",
             *_incomplete(report),
             "", "| point | span(s) | parameters | removed | " + " | ".join(tasks) + " | retention | train s |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    if dense["params"]:
        lines.append(f"| dense | | {dense['params']:,} | 0% | " +
                     " | ".join(_fmt(dense["tasks"].get(t)) for t in tasks) + " | | |")
    for r in rows:
        spans = "; ".join(f"{s}..{s + n - 1}" for s, n in r["spans"])
        params = f"{r['params']:,}" if r["params"] else "n/a"
        removed = _fmt(r["params_removed"], ".1%") if r["params_removed"] is not None else "n/a"
        train = _fmt(r["train_s"], ".0f") if r["train_s"] is not None else ""
        lines.append(f"| {r['point']} | {spans} | {params} | {removed} | " +
                     " | ".join(_fmt(r["tasks"].get(t)) for t in tasks) +
                     f" | {_fmt(r['retention'], '.1%') if r['retention'] is not None else ''} | {train} |")
    if report.get("plot"):
        lines += ["", f"![quality against size]({report['plot']})"]
    times = report.get("times", {})
    if times.get("total") is not None:
        lines += ["", f"Total {times['total']:.0f} s in this invocation; each point's folder under `points/` "
                      f"holds its own report."]
    return "\n".join(lines) + "\n"
