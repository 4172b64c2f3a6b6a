"""One command for the first GPU or TPU machine: bf16 forward and training-step throughput with MFU at 1B and 7B
shapes (random weights), the joint dense/pruned evaluation step, and transformers' PyTorch on the same device and
shapes as the comparison.

    python scripts/bench_device.py                                  # tinyllama-1.1b and llama2-7b shapes, 4 x 2048
    python scripts/bench_device.py --models llama2-7b --batch 8 --seq 2048 --no-torch
    python scripts/bench_device.py --models tiny --batch 2 --seq 64   # a CPU smoke test (what the test suite runs)

Each model is pruned at the default run's place (a span of a quarter of its layers, starting at a third of its
depth, one `layer` block). Timed: the forward with logits (ours and torch's); the train step the run executes
(`train.training_program`, optimizer included) for the MSE phase from cached pairs, the distillation phase from
cached pairs, and the LM loss (torch's counterpart: the pruned model's next-token loss, its block trainable); the
dense and pruned models' log-probabilities in one call (`evaluation.shared_prefix_logprobs`) against two calls.
MFU is the program's FLOPs over the device's bf16 peak: the spec sheet's for a known GPU or TPU, else a 4096^3
product measured here (both printed). Forward FLOPs are counted from the shapes (every weight product and the full
T x T attention square); a train step's are XLA's count of its compiled program. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from streamline_jax import evaluation, train
from streamline_jax.backend import matmul_rate
from streamline_jax.models import transformer
from streamline_jax.models.config import ModelConfig, to_hf_config
from streamline_jax.models.model import Model, forward
from streamline_jax.models.presets import preset
from streamline_jax.pruning import prune

from bench_forward import forward_flops  # scripts/ is on the path

# bf16 dense peak FLOP/s by jax's device_kind (spec sheets; no sparsity)
PEAK_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
             "NVIDIA A100 80GB PCIe": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
             "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                 num_kv_heads=4, head_dim=64, max_position_embeddings=2048)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=512)


def model_config(name: str) -> ModelConfig:
    """A preset's shapes in bf16, or one of the two shapes named here (TinyLlama-1.1B's; a tiny Llama for tests)."""
    extra = {"tinyllama-1.1b": TINYLLAMA, "tiny": TINY}
    base = preset("llama2-7b").replace(layout=(), **extra[name]) if name in extra else preset(name)
    return base.replace(dtype="bfloat16", compute_dtype="bfloat16")


def seconds(fn, reps: int, sync=jax.block_until_ready) -> float:
    """Best wall time of `reps` calls, after one warm-up call (the compile)."""
    sync(fn())
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        sync(fn())
        best = min(best, time.perf_counter() - start)
    return best


def compiled_flops(jitted, *args) -> float | None:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (cost or {}).get("flops")


def train_steps(dense: Model, pruned: Model, start: int, length: int, ids, mask, reps: int) -> dict:
    """Seconds and compiled FLOPs of the run's train step for each loss, from the same random batch."""
    block = train.trainable_blocks(pruned.config)[0]
    x_in, target = jax.jit(lambda p: train.span_pairs(dense.config, p, ids, mask, start, length))(dense.params)
    batches = {"mse_cached": {"x_in": x_in, "target": target, "attention_mask": mask},
               "kd_cached": {"input_ids": ids, "attention_mask": mask, "x_in": x_in, "target": target},
               "lm": {"input_ids": ids, "attention_mask": mask}}
    out = {}
    for loss, batch in batches.items():
        paths = set(train.trained_paths(pruned.params, block, ("block",), ("attention",)))
        kd = (train.distillation_settings(dense.config, pruned.config, block, paths, 1.0, 0.0, (), 0.0)
              if loss == "kd_cached" else None)
        program = train.training_program(dense.config, pruned.config, block, paths, loss, lr=1e-3, min_lr=1e-5,
                                         warmup_steps=1, num_steps=1000, weight_decay=0.0, clip_norm=1.0,
                                         grad_accum=1, kd=kd, mse_weighting="balanced")
        trained, frozen_pruned = train.split_params(pruned.params, paths.__contains__)
        state = {"trained": jax.tree.map(lambda a: a.astype(jnp.float32), trained)}
        state["opt"] = program.tx.init(state["trained"])
        frozen = {"pruned": frozen_pruned, **({"dense": dense.params} if loss != "lm" else {})}
        flops = compiled_flops(program.train_step, state["trained"], state["opt"], frozen, batch)

        def step(state=state, program=program, frozen=frozen, batch=batch):
            state["trained"], state["opt"], loss_value = program.train_step(state["trained"], state["opt"], frozen,
                                                                            batch)
            return loss_value
        out[loss] = {"s": seconds(step, reps), "flops": flops}
    return out


def joint_evaluation(dense: Model, pruned: Model, start: int, ids, mask, reps: int) -> dict:
    targets = jnp.roll(ids, -1, axis=1)
    configs, params = (dense.config, pruned.config), (dense.params, pruned.params)
    together = seconds(lambda: evaluation.shared_prefix_logprobs(configs, params, ids, targets, mask, shared=start),
                       reps)
    apart = seconds(lambda: [evaluation.target_logprobs(m.config, m.params, ids, targets, mask)
                             for m in (dense, pruned)], reps)
    return {"together_s": together, "apart_s": apart, "speedup": apart / together}


def span_of(config: ModelConfig) -> tuple[int, int]:
    return config.num_layers // 3, max(2, config.num_layers // 4)


def token_ids(config: ModelConfig, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)


def torch_figures(name: str, batch: int, seq: int, reps: int) -> dict:
    """transformers' model of the same shapes in bf16 on this machine's torch device: the forward with logits, and
    the pruned model's LM-loss step with its block trainable (AdamW). Run in a process of its own (`--torch-only`),
    before this one's JAX takes the accelerator's memory."""
    import torch
    import transformers

    config = model_config(name)
    start, length = span_of(config)
    ids = token_ids(config, batch, seq)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = to_hf_config(config.replace(dtype="bfloat16"))
    cfg_cls = transformers.AutoConfig.for_model(hf["model_type"]).__class__
    hf_config = cfg_cls(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    tids = torch.tensor(ids, dtype=torch.long, device=device)
    with torch.inference_mode():
        fwd = seconds(lambda: model(tids).logits, reps, sync)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([*layers[:start + 1], *layers[start + length:]])  # the block: layer 0
    for p in model.parameters():
        p.requires_grad_(False)
    block = model.model.layers[start]
    for p in block.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-3)

    def lm_step():
        opt.zero_grad()
        loss = model(tids, labels=tids).loss
        loss.backward()
        opt.step()
        return loss
    model.train()
    return {"device": device, "forward_s": fwd, "lm_s": seconds(lm_step, reps, sync)}


def bench(name: str, batch: int, seq: int, reps: int, theirs: dict | None, peak: float) -> dict:
    config = model_config(name)
    start, length = span_of(config)
    dense = Model(config, transformer.init_params(config))
    pruned = prune(dense, start, length, replacement="layer")
    ids = token_ids(config, batch, seq)
    jids, mask = jnp.asarray(ids), jnp.ones((batch, seq), jnp.int32)
    tokens = batch * seq
    fwd_flops = forward_flops(config, batch, seq)
    row = {"model": name, "params": dense.num_params, "batch": batch, "seq": seq, "span": [start, length]}
    fwd = seconds(lambda: forward(dense, ids), reps)
    row["forward"] = {"s": fwd, "tokens_per_s": tokens / fwd, "flops": fwd_flops, "mfu": fwd_flops / fwd / peak}
    steps = train_steps(dense, pruned, start, length, jids, mask, reps)
    row["train"] = {k: {**v, "tokens_per_s": tokens / v["s"],
                        "mfu": v["flops"] / v["s"] / peak if v["flops"] else None} for k, v in steps.items()}
    row["joint_evaluation"] = joint_evaluation(dense, pruned, start, jids, mask, reps)
    if theirs:
        row["torch"] = {**theirs, "forward_mfu": fwd_flops / theirs["forward_s"] / peak}
        row["ours_over_torch"] = {"forward": theirs["forward_s"] / fwd, "lm_step": theirs["lm_s"] / steps["lm"]["s"]}
    return row


def print_row(row: dict) -> None:
    f = row["forward"]
    print(f"\n{row['model']} ({row['params'] / 1e9:.2f}B parameters), {row['batch']} x {row['seq']} tokens, span "
          f"{row['span'][0]}+{row['span'][1]} -> one layer block")
    print(f"  forward: {f['s'] * 1e3:.1f} ms, {f['tokens_per_s']:,.0f} tok/s, MFU {f['mfu']:.3f}")
    for loss, t in row["train"].items():
        mfu = f"MFU {t['mfu']:.3f}" if t["mfu"] is not None else "no FLOP count"
        print(f"  train step {loss}: {t['s'] * 1e3:.1f} ms, {t['tokens_per_s']:,.0f} tok/s, {mfu}")
    j = row["joint_evaluation"]
    print(f"  dense + pruned log-probs: together {j['together_s'] * 1e3:.1f} ms, apart {j['apart_s'] * 1e3:.1f} ms "
          f"({j['speedup']:.2f}x)")
    if "torch" in row:
        t, r = row["torch"], row["ours_over_torch"]
        print(f"  torch ({t['device']}): forward {t['forward_s'] * 1e3:.1f} ms (MFU {t['forward_mfu']:.3f}), "
              f"LM step {t['lm_s'] * 1e3:.1f} ms; ours / torch speed: forward {r['forward']:.2f}x, "
              f"LM step {r['lm_step']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tinyllama-1.1b,llama2-7b",
                   help="comma-separated: preset names, tinyllama-1.1b, or tiny (a CPU smoke test)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3, help="each figure is the best of this many timed calls")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip transformers' PyTorch")
    p.add_argument("--torch-only", metavar="MODEL", help=argparse.SUPPRESS)  # the child process for one model
    args = p.parse_args(argv)
    if args.torch_only:
        print(json.dumps(torch_figures(args.torch_only, args.batch, args.seq, args.reps)))
        return 0
    names = args.models.split(",")
    theirs = {name: json.loads(subprocess.run(
        [sys.executable, __file__, "--torch-only", name, "--batch", str(args.batch), "--seq", str(args.seq),
         "--reps", str(args.reps)], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        for name in names} if args.torch else {}
    device = jax.devices()[0]
    measured = matmul_rate("bfloat16", n=4096)
    peak = PEAK_BF16.get(device.device_kind, measured)
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} devices); jax {jax.__version__}; "
          f"bf16 peak {peak / 1e12:.1f} TFLOP/s ({'spec sheet' if device.device_kind in PEAK_BF16 else 'measured'});"
          f" 4096^3 bf16 product measured {measured / 1e12:.1f} TFLOP/s")
    rows = []
    for name in names:
        rows.append(bench(name, args.batch, args.seq, args.reps, theirs.get(name), peak))
        print_row(rows[-1])
    print(json.dumps({"device": device.device_kind, "platform": device.platform, "peak_flops": peak,
                      "measured_matmul_flops": measured, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
