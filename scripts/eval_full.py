"""Full PIQA validation (1838 items) and full WikiText-2 test perplexity (1024-token windows) of SmolLM2-135M.

Reference figures (../shared/data/README.md, measured with PyTorch transformers): PIQA acc 0.643, WikiText-2 ppl
24.98. Too slow for CI; run by hand:

    python scripts/eval_full.py [--model smollm2-135m] [--batch-size 32] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamline_jax as sj  # noqa: E402
from streamline_jax import evaluation as ev  # noqa: E402

EXPECTED = {"piqa": ("acc", 0.643, 0.005), "wikitext2": ("perplexity", 24.98, 0.05)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "wikitext2"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    start = time.perf_counter()
    model = sj.load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s", flush=True)
    results = {"num_params": model.num_params, "layers": model.config.depth, "tasks": {}}
    ok = True
    for name in args.tasks:
        t0 = time.perf_counter()
        batch = args.batch_size if name != "wikitext2" else max(1, args.batch_size // 4)
        r = ev.evaluate(model, name, batch_size=batch, progress=True)["tasks"][name]
        wall = time.perf_counter() - t0
        results["tasks"][name] = r
        metric, want, tol = EXPECTED.get(name, (None, None, None))
        if r["kind"] == "perplexity":
            line = (f"{name}: perplexity {r['perplexity']:.4f} over {r['tokens']:,} predicted tokens in "
                    f"{r['windows']} windows of {r['window']}")
        else:
            line = f"{name}: acc {r['acc']:.4f}" + (f" acc_norm {r['acc_norm']:.4f}" if "acc_norm" in r else "")
            line += f" over {r['n']} items"
        line += f"; {r['tokens_fed' if 'tokens_fed' in r else 'tokens']:,} tokens fed, {r['compiles']} compiles, " \
                f"wall {wall:.1f}s ({r['tokens_fed' if 'tokens_fed' in r else 'tokens'] / wall:.0f} tokens/s)"
        if metric:
            good = abs(r[metric] - want) <= tol
            ok &= good
            line += f" | expected {metric} {want} ± {tol}: {'OK' if good else 'MISMATCH'}"
        print(line, flush=True)
        if args.json:  # after every task, so a long run that is stopped keeps what it finished
            with open(args.json, "w") as f:
                json.dump(results, f)
    print(f"total wall {time.perf_counter() - start:.1f}s", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
