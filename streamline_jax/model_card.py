"""The model card of a run's Hugging Face folder, `<out>/hf/README.md`: Hugging Face's model-card form (YAML front
matter with base_model, license, tags), then the source model, the span and what replaced it, the parameters before
and after, the dense-vs-pruned evaluation, the recipe (the settings that made it) and the exact command."""

from __future__ import annotations

from pathlib import Path

import yaml

from .files import write_atomic

RECIPE_SECTIONS = ("model", "data", "score", "prune", "train")


def front_matter(base_model: str | None, license: str | None) -> str:
    meta = {"base_model": base_model, "license": license, "library_name": "transformers",
            "pipeline_tag": "text-generation", "tags": ["pruned", "llm-streamline", "streamline-jax"]}
    meta = {k: v for k, v in meta.items() if v}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def span_lines(report: dict) -> list[str]:
    spans = report.get("spans") or ([report["span"]] if report.get("span") else [])
    block = lambda kind: "nothing" if kind == "none" else f"one `{kind}` block"
    return [f"- layers {s['start']}..{s['end'] - 1} ({s['length']} layers), chosen by {s['metric']}, replaced by "
            f"{block(s['replacement'])}" for s in spans]


def evaluation_lines(report: dict) -> list[str]:
    retention = report.get("retention")
    if not retention:
        return ["Not evaluated in this run."]
    lines = ["| task | metric | dense | pruned | retention |", "|---|---|---|---|---|"]
    for r in retention["rows"]:
        cells = [f"{v:.4f}" if isinstance(v, float) else "" for v in (r["dense"], r["pruned"])]
        share = f"{r['retention']:.2%}" if isinstance(r.get("retention"), float) else ""
        lines.append(f"| {r['task']} | {r['metric']} | {cells[0]} | {cells[1]} | {share} |")
    return lines


def model_card(report: dict, license: str | None = None) -> str:
    config = report.get("config", {})
    model = config.get("model", {})
    base = model.get("hub_id") or model.get("source")
    params = report.get("params") or {}
    lines = [f"# {Path(str(base)).name}, pruned with LLM-Streamline", "",
             f"Layer-pruned from `{base}` by streamline-jax (LLM-Streamline: the span of "
             f"consecutive layers whose input and output hidden states are most alike is cut out, and a "
             f"lightweight block trained in its place).", ""]
    lines += span_lines(report)
    if params:
        share = params["pruned"] / params["dense"]
        lines.append(f"- parameters: {params['dense']:,} → {params['pruned']:,} ({share:.2%}); "
                     f"layers {params['dense_layers']} → {params['pruned_layers']}")
    outputs = report.get("outputs") or {}
    lines += ["", "## Evaluation (dense vs pruned)", ""] + evaluation_lines(report)
    recipe = {k: config[k] for k in RECIPE_SECTIONS if k in config}
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    if report.get("command"):
        lines += ["", "## Command", "", "```", report["command"], "```"]
    if outputs:
        lines += ["", "## Files of the run", ""] + [f"- {k}: {v}" for k, v in outputs.items()]
    return front_matter(base, license) + "\n" + "\n".join(lines) + "\n"


def write_model_card(report: dict, folder: Path, license: str | None = None) -> Path:
    """Write README.md into `folder` (the Hugging Face folder) atomically."""
    return write_atomic(Path(folder) / "README.md", model_card(report, license))
