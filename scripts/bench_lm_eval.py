"""The same lm-evaluation-harness tasks through our adapter (`streamline-jax`) and through lm-eval's own `hf` model
(PyTorch) on the same weights, in one run: wall time, tokens per second, and the tasks' figures side by side.

    python scripts/bench_lm_eval.py [--model smollm2-135m] [--tasks piqa_local] [--limit 100] [--batch-size 32]
        [--order ours,hf,ours]

Both read the same Hugging Face folder (for the embedded model, its cached conversion of the GGUF), float32, on the
CPU (or, for ours, the accelerator JAX finds). Each pass is timed whole (wall: lm-eval's `simple_evaluate` on a
task index built once beforehand, the dataset, prompts and metrics included) and in the model's calls alone
(`loglikelihood`, `loglikelihood_rolling`, `generate_until`, tokenizing included); the first `ours` pass includes
compiling (a later one in the same process does not). Tokens are the tokens the model reads (context and
continuation, one position less per request), counted by our adapter; the `hf` model reads the same requests. `--order` runs the passes in turn (the machine's speed drifts);
the ratios use the mean of each backend's passes after the first of ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(method, totals: dict, key: str):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="an embedded name or a Hugging Face folder")
    p.add_argument("--tasks", default="piqa_local", help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=100, help="items per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--order", default="ours,hf,ours", help="the passes, in turn: ours and hf")
    args = p.parse_args(argv)
    order = args.order.split(",")
    if not set(order) <= {"ours", "hf"} or not order:
        p.error(f"--order takes 'ours' and 'hf', got {args.order!r}")

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from streamline_jax.lm_eval import StreamlineLM, check_tasks
    from streamline_jax.loading import EMBEDDED_MODELS, embedded_hf_folder

    folder = embedded_hf_folder(args.model) if args.model in EMBEDDED_MODELS else Path(args.model)
    tasks = args.tasks.split(",")
    manager = check_tasks(tasks)
    ours = StreamlineLM(pretrained=str(folder), batch_size=args.batch_size)
    theirs = HFLM(pretrained=str(folder), batch_size=args.batch_size, device="cpu", dtype="float32")
    model_seconds = {"ours": 0.0, "hf": 0.0}
    for backend, lm in (("ours", ours), ("hf", theirs)):
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, timed(getattr(lm, name), model_seconds, backend))
    print(f"model {folder}, tasks {','.join(tasks)}, limit {args.limit}, batch size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")

    passes, results, tokens = [], {}, None
    for k, backend in enumerate(order):
        lm = ours if backend == "ours" else theirs
        before, in_model = dict(ours.stats), model_seconds[backend]
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=manager)
        seconds = time.perf_counter() - start
        in_model = model_seconds[backend] - in_model
        if backend == "ours":
            tokens = ours.stats["tokens"] - before["tokens"]
            compiles = ours.stats["compiles"] - before["compiles"]
        first = backend == "ours" and "ours" not in [b for b, _ in passes]
        passes.append((backend, in_model))
        results.setdefault(backend, out["results"])
        label = f"{backend} pass {k + 1}" + (" (compiles included)" if first else "")
        extra = f", {compiles} compiles" if backend == "ours" else ""
        print(f"{label:32s} wall {seconds:7.1f} s, model calls {in_model:7.1f} s: "
              f"{tokens / in_model if tokens else float('nan'):7.0f} tokens/s{extra}")

    print(f"\ntokens read per pass: {tokens}")
    for task in tasks:
        for metric, value in results.get("ours", {}).get(task, {}).items():
            if "_stderr" in metric or not isinstance(value, float):
                continue
            want = results.get("hf", {}).get(task, {}).get(metric)
            print(f"{task:16s} {metric:24s} ours {value:.6f}  hf {want if want is None else format(want, '.6f')}")
    first_ours = next(i for i, (b, _) in enumerate(passes) if b == "ours") if "ours" in order else None
    kept = {b: [s for i, (bb, s) in enumerate(passes) if bb == b and i != first_ours] for b in ("ours", "hf")}
    if kept["ours"] and kept["hf"]:
        mean = {b: sum(v) / len(v) for b, v in kept.items()}
        print(f"\nmodel calls, compiled: ours {mean['ours']:.1f} s, hf {mean['hf']:.1f} s: ours is "
              f"{mean['hf'] / mean['ours']:.2f}x the speed of lm-eval's hf model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
