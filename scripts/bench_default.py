"""The README's main command as a new user runs it: `python -m streamline_jax.run`, no arguments, first run.

It runs in a fresh working folder with empty model and compilation caches (so the GGUF conversion and every compile
count), then prints the wall time, the stage times from report.json and the two quality ratios the default run must
deliver (issue 47's goals): WikiText-2 perplexity pruned/dense (goal <= 2.2) and PIQA accuracy pruned/dense (goal >=
0.95), with the parameters removed (goal >= 20%) and the wall time (goal <= 600 s on a 2-core CPU). The machine's
matmul rates, taken before and after the run, say how fast it was meanwhile (a shared machine drifts by 2x and more
between days).

    python scripts/bench_default.py                                    # the default recipe
    python scripts/bench_default.py --config paper                     # the paper's recipe, same sizes
    python scripts/bench_default.py --keep runs/bench_default            # keep the run's folder there
    python scripts/bench_default.py 'train.distill_trainable=[block,"segments/.*"]'   # with a setting changed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"wall_s": 600.0, "removed": 0.20, "perplexity": 2.2, "piqa": 0.95}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a settings file passed on to the command (e.g. paper, a shipped recipe)")
    p.add_argument("--keep", metavar="DIR", help="copy the finished run folder here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings passed on to the command")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_default-") as work:
        work = Path(work)
        env = {**os.environ, "STREAMLINE_JAX_CACHE": str(work / "models"),
               "STREAMLINE_JAX_RESULTS_CACHE": str(work / "results"),
               "STREAMLINE_JAX_COMPILATION_CACHE": str(work / "xla")}
        env.pop("STREAMLINE_JAX_DATA", None)
        command = [sys.executable, "-m", "streamline_jax.run", "--quiet"]
        # a file from here (the run works in `work`); a shipped recipe's name (paper) as it is
        config = str(Path(args.config).absolute()) if args.config and Path(args.config).exists() else args.config
        command += ["--config", config] if config else []
        command += args.overrides
        print("$ python", " ".join(command[1:]), f"(in {work}, empty caches; --quiet: no progress bars)", flush=True)
        rates = matmul_rates()
        start = time.perf_counter()
        subprocess.run(command, cwd=work, env=env, check=True)
        wall = time.perf_counter() - start
        rates = {k: max(v, after) for (k, v), after in zip(rates.items(), matmul_rates().values())}
        out = work / "runs" / "smollm2-135m"
        report = json.loads((out / "report.json").read_text())
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(out, args.keep)
    print("matmul rates, 2048^3 (best of before and after the run): " + ", ".join(
        f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in rates.items()))
    print_figures(report, wall)
    return 0


def matmul_rates() -> dict[str, float]:
    """FLOP/s of a 2048^3 product in float32 and with bfloat16 inputs accumulated in float32 (the run's products)."""
    from streamline_jax.backend import matmul_rate

    return {"float32": matmul_rate("float32"), "bf16->f32": matmul_rate("bfloat16")}


def print_figures(report: dict, wall: float) -> None:
    rows = {(r["task"], r["metric"]): r for r in report["retention"]["rows"]}
    ppl, piqa = rows[("wikitext2", "perplexity")], rows[("piqa", "acc")]
    ev = report["evaluation"]["dense"]["tasks"]
    removed = 1 - report["params"]["pruned"] / report["params"]["dense"]
    figures = {
        "wall_s": (wall, wall <= GOALS["wall_s"], f"{wall:.0f} s (goal <= {GOALS['wall_s']:.0f} s)"),
        "removed": (removed, removed >= GOALS["removed"],
                    f"{removed:.2%} of parameters (goal >= {GOALS['removed']:.0%})"),
        "perplexity": (ppl["pruned"] / ppl["dense"], ppl["pruned"] / ppl["dense"] <= GOALS["perplexity"],
                       f"WikiText-2 perplexity {ppl['dense']:.2f} dense, {ppl['pruned']:.2f} pruned: "
                       f"{ppl['pruned'] / ppl['dense']:.3f}x (goal <= {GOALS['perplexity']}x; "
                       f"{ev['wikitext2']['windows']} windows of {ev['wikitext2']['window']})"),
        "piqa": (piqa["retention"], piqa["retention"] >= GOALS["piqa"],
                 f"PIQA accuracy {piqa['dense']:.4f} dense, {piqa['pruned']:.4f} pruned: {piqa['retention']:.2%} "
                 f"(goal >= {GOALS['piqa']:.0%}; {ev['piqa']['n']} items)"),
    }
    span = report["span"]
    training = report.get("training", {})
    model = report["model"]
    print(f"compute dtype: {model.get('compute_dtype')} ({model.get('compute_dtype_why')})")
    print(f"span: layers {span['start']}..{span['end'] - 1} -> {span['replacement']}; training: "
          f"{len(training.get('train', []))} steps, best validation {training.get('best_valid')}")
    print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["stage_times"].items()))
    for name, (value, met, text) in figures.items():
        print(f"{'met ' if met else 'MISS'}  {name:10s} {text}")
    print(json.dumps({"wall_s": wall, "stage_times": report["stage_times"], "removed": removed,
                      "perplexity_ratio": figures["perplexity"][0], "piqa_retention": figures["piqa"][0]}))


if __name__ == "__main__":
    sys.exit(main())
