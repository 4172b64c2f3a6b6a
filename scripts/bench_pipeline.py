"""The P1 pipeline, score + train, timed honestly: ours against the authors' path re-created in PyTorch, in one run.

On a slice of protocol P1's chunks (scripts/p1_protocol.py: 512 tokens from corpus/train.jsonl in file order; the
first N of its 50 calibration chunks, the first N of its training chunks after them, the first N chunks of
corpus/valid.jsonl; batch 8; a span of 8 layers by cosine; a `layer` block with its attention and input norm frozen;
MSE; AdamW lr 1e-2, one epoch; validation at step 0 and every ceil(steps / 5) steps, P1's 25 of 125) both sides do
the same job:

- ours: `sj.score_spans` + `sj.choose_span(length=8)` + `sj.prune`, then `sj.train_replacement(mode="mse",
  freeze=("self_attn", "input_layernorm"))`: the span's (input, target) pairs are computed inside the jitted step;
  the validation batches' pairs are computed once, before the first pass (dispatched asynchronously, so their time
  mostly lands in the first validation pass).
- the authors' path (LLM_Streamline/get_cosine.py, get_train_data.py, train_lightweightnetwork.py) in transformers,
  float32: score with a full forward (`LlamaForCausalLM`, LM head included, as they call it) with
  `output_hidden_states=True`, the cosine of every span read off the hidden states (h[s] against h[s+n], mean over
  real tokens; their last entry is after the final norm); collect the span's pairs with the same full forward on
  every training and validation batch and keep them on the host (their memory problem); then train a copy of the
  span's first `LlamaDecoderLayer` on the cached pairs (causal, rotary positions, the same parameters frozen,
  AdamW, clipping, the same schedule, validation at the same steps).

Each side runs in its own child process, so its peak resident memory (ru_maxrss) is its own (the chunks are
tokenized and batched by the project's data functions in a third child, outside the timings, so that the parent
stays small: a child's ru_maxrss starts from its parent's size at the fork), and measures its own float32 matmul
ceiling (2048^3, jax's dot or torch's mm, before and after its work; the machine is shared and drifts). Our compile
time comes from jax's compile events, and our train steps and validation passes are timed by wrapping the jitted
steps `train.program.make_steps` builds (the loop blocks on each step's loss anyway).

The limit is the matmul work a stage cannot avoid, at the best ceiling measured in this run: scoring is L layers
forward on the calibration tokens (no LM head); training is the prefix and span (start + n layers) forward on the
training tokens plus the block's forward and its feed-forward half's backward (2x its matmuls: the frozen attention
needs none); validation is the prefix and span once on the validation tokens plus one block forward per pass.
Attention counts the causal half of the T x T square; norms and element-wise work are not counted.

    python scripts/bench_pipeline.py                                   # 16 calibration + 64 training chunks
    python scripts/bench_pipeline.py --calib-chunks 8 --train-chunks 16 --valid-chunks 8   # a quick check
    python scripts/bench_pipeline.py --calib-chunks 50 --train-chunks 1000 --valid-chunks 100 --rounds 2   # P1

`--rounds 2` runs ours, torch, torch, ours and keeps each stage's best time (the machine drifts between the children;
compare ratios from rounds run in turn). `--out` (default runs/bench_pipeline.json) gets every figure as JSON,
with our per-step times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

P1_CALIB = 50  # P1's calibration chunks: its training chunks start after them
FREEZE = ("self_attn", "input_layernorm")  # our best recipe: train the layer block's feed-forward half


# ----------------------------------------------------------------------------------------------------------------
# Work that cannot be avoided


def per_token_flops(cfg: dict, seq: int) -> dict:
    """Matmul FLOPs per token of one decoder layer (causal attention: (seq+1)/2 keys per query on average), of its
    feed-forward half, and of the LM head. `cfg` is the model's Hugging Face config.json."""
    d, i, h, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    hd = cfg.get("head_dim") or d // h
    proj = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d)
    attn = 2 * 2 * h * hd * (seq + 1) / 2
    mlp = 2 * 3 * d * i
    return {"layer": proj + attn + mlp, "mlp": mlp, "head": 2 * d * cfg["vocab_size"]}


def stage_flops(cfg, seq, tokens, start, length, passes):
    f = per_token_flops(cfg, seq)
    pairs = (start + length) * f["layer"]  # h[start] and h[start + length]: the prefix and the span, forward
    block = f["layer"] + 2 * f["mlp"]  # the block forward, and its feed-forward half backward (input + weights)
    return {"score": cfg["num_hidden_layers"] * f["layer"] * tokens["calib"],
            "pairs": pairs * tokens["train"], "block": block * tokens["train"],
            "valid": (pairs + passes * f["layer"]) * tokens["valid"],
            # what the authors' full forward does instead of `pairs` (all layers and the LM head)
            "full_forward_per_token": cfg["num_hidden_layers"] * f["layer"] + f["head"]}


def eval_steps(num_steps: int, every: int) -> list[int]:
    """The steps after which training validates, as train_replacement does (and step 0, before training)."""
    return [0] + [s for s in range(1, num_steps + 1) if s % every == 0 or s == num_steps]


# ----------------------------------------------------------------------------------------------------------------
# Child processes


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_batches(path, name):
    arrays = np.load(path)
    count = sum(1 for k in arrays.files if k.startswith(f"{name}/") and k.endswith("/ids"))
    return [{"input_ids": arrays[f"{name}/{i}/ids"], "attention_mask": arrays[f"{name}/{i}/mask"]}
            for i in range(count)]


def best_of(fn, repeats=5):
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ceiling_torch(dtype="float32", n=2048):
    """FLOP/s of one n^3 torch product in `dtype`."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    return 2 * n ** 3 / best_of(lambda: a @ b)


def child_ours(args):
    import jax

    import streamline_jax as sj
    from streamline_jax import train

    compile_s = [0.0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_s.__setitem__(0, compile_s[0] + secs)
        if event.startswith("/jax/core/compile/") else None)
    from streamline_jax.backend import matmul_rate, resolve_compute_dtype

    compute, why = resolve_compute_dtype(args.compute_dtype)
    out = {"ceiling": [matmul_rate()], "ceiling_bf16": [matmul_rate("bfloat16")], "rss_before_load_mib": peak_rss_mib(),
           "compute_dtype": compute, "compute_dtype_why": why}
    t = time.perf_counter()
    model = sj.with_compute_dtype(sj.load("smollm2-135m"), compute)
    out.update(load_s=time.perf_counter() - t, rss_after_load_mib=peak_rss_mib())
    calib, train_batches = load_batches(args.data, "calib"), load_batches(args.data, "train")
    valid = load_batches(args.data, "valid") if args.valid_chunks else None

    c0, t = compile_s[0], time.perf_counter()
    scores = sj.score_spans(model, calib, metric="cosine")
    choice = sj.choose_span(scores, length=args.span)
    out.update(score_s=time.perf_counter() - t, score_compile_s=compile_s[0] - c0, start=choice.start,
               cosine=scores.cosine[:scores.num_layers - args.span + 1, args.span].tolist(),
               rss_after_score_mib=peak_rss_mib())

    # time each jitted train / eval step as train_replacement calls it (it reads every loss, so each call ends
    # with the step done); compile time is booked apart from the steps' own time
    timings = {"train_step": [], "eval_step": []}
    make_steps = train.program.make_steps

    def timed(name, fn):
        def call(*a):
            c, t = compile_s[0], time.perf_counter()
            result = jax.block_until_ready(fn(*a))
            timings[name].append(time.perf_counter() - t - (compile_s[0] - c))
            return result
        return call

    def timed_make_steps(*args, **kwargs):
        train_step, eval_step = make_steps(*args, **kwargs)
        return timed("train_step", train_step), timed("eval_step", eval_step)

    train.program.make_steps = timed_make_steps  # what train_replacement's program is built with
    pruned = sj.prune(model, choice.start, args.span, "layer")
    c0, t = compile_s[0], time.perf_counter()
    _, history = sj.train_replacement(model, pruned, train_batches, mode="mse", valid_batches=valid, lr=args.lr,
                                      min_lr=5e-5, weight_decay=1e-3, clip_norm=5.0, eval_every=args.eval_every,
                                      freeze=FREEZE, progress=False, return_history=True)
    out.update(train_s=time.perf_counter() - t, train_compile_s=compile_s[0] - c0,
               steps_s=sum(timings["train_step"]), valid_s=sum(timings["eval_step"]),
               train_step_s=timings["train_step"], eval_step_s=timings["eval_step"],
               step_s_median=statistics.median(timings["train_step"]), num_steps=len(timings["train_step"]),
               valid_passes=len(history["valid"]), valid_loss=[v for _, v in history["valid"]],
               train_loss_last=history["train"][-1][1], rss_after_train_mib=peak_rss_mib())
    out["ceiling"].append(matmul_rate())
    out["ceiling_bf16"].append(matmul_rate("bfloat16"))
    return out


def torch_score(model, calib, n):
    """The authors' scoring: the full forward with output_hidden_states, the cosine of every (s, s + n) over real
    tokens; the span's start and the cosine of each start."""
    import torch
    import torch.nn.functional as F

    gram, tokens = 0.0, 0
    with torch.no_grad():
        for b in calib:
            hidden = model(**b, output_hidden_states=True).hidden_states
            mask = b["attention_mask"].reshape(-1).float()
            unit = torch.stack([F.normalize(h.reshape(-1, h.shape[-1]), dim=-1) for h in hidden])  # [L+1, N, D]
            gram = gram + torch.einsum("ind,jnd->ij", unit * mask[None, :, None], unit)
            tokens += int(mask.sum())
            del hidden, unit
    cosine = (gram / tokens).double().numpy()
    depth = cosine.shape[0] - 1
    by_start = [float(cosine[s, s + n]) for s in range(depth - n + 1)]
    return int(np.argmax(by_start)), by_start


def torch_pairs(model, batches, start, n, out):
    """The span's pairs from the same full forward on every batch, kept on the host one row at a time; out["check"]
    gets the first batch's states before and after the span's first layer, to check the copy against."""
    import torch

    inputs, targets, masks = [], [], []
    with torch.no_grad():
        for b in batches:
            hidden = model(**b, output_hidden_states=True).hidden_states
            if not inputs:
                out.setdefault("check", (hidden[start], hidden[start + 1]))
            inputs += torch.unbind(hidden[start], dim=0)
            targets += torch.unbind(hidden[start + n], dim=0)
            masks += torch.unbind(b["attention_mask"], dim=0)
            del hidden
    return inputs, targets, masks


def copied_layer(model, start, check, rope):
    """A copy of the span's first LlamaDecoderLayer with FREEZE frozen, and the parameters that train; it must give
    the full forward's next hidden state (causal, the right positions)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer = LlamaDecoderLayer(model.config, start)
    layer.load_state_dict(model.model.layers[start].state_dict())
    trained = []
    for name, p in layer.named_parameters():
        p.requires_grad_(not any(f in name for f in FREEZE))
        if p.requires_grad:
            trained.append(p)
    # no attention mask: sdpa attention (asked for at loading) is then causal, as in the full model over unpadded rows
    with torch.no_grad():
        x0, ref = check
        err = float((layer(x0, position_embeddings=rope) - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, f"the copied layer does not reproduce the full forward: relative error {err:.2e}"
    return layer, trained


def cosine_factor(num_steps, warmup, lr, min_lr=5e-5):
    """optax.warmup_cosine_decay_schedule as a factor of lr, for torch's LambdaLR."""
    def factor(step):
        if step < warmup:
            return step / warmup
        frac = min((step - warmup) / max(num_steps - warmup, 1), 1.0)
        return (min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)) / lr
    return factor


def masked_mse(pred, target, mask):
    return ((pred - target).square().mean(-1) * mask).sum() / mask.sum().clamp(min=1)


def pair_batch(pairs, i, b):
    import torch

    rows = slice(i * b, (i + 1) * b)
    return torch.stack(pairs[0][rows]), torch.stack(pairs[1][rows]), torch.stack(pairs[2][rows]).float()


def torch_validate(layer, valid_pairs, b, rope):
    import torch

    with torch.no_grad():
        total = weight = 0.0
        for i in range(len(valid_pairs[0]) // b):
            x, y, m = pair_batch(valid_pairs, i, b)
            total += float(masked_mse(layer(x, position_embeddings=rope), y, m)) * float(m.sum())
            weight += float(m.sum())
    return total / max(weight, 1.0)


def torch_train(layer, trained, pairs, valid_pairs, b, rope, args):
    """The copied layer trained on the cached pairs (AdamW, clipping, our schedule), validated at our steps, the best
    block kept; its times and losses."""
    import torch

    num_steps = len(pairs[0]) // b
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_factor(num_steps, max(1, num_steps // 20), args.lr))
    checks = set(eval_steps(num_steps, args.eval_every)) if valid_pairs else set()
    out, valid_s, valid_loss, best = {}, 0.0, [], None
    t = time.perf_counter()
    for step in range(num_steps + 1):
        if step:
            x, y, m = pair_batch(pairs, step - 1, b)
            loss = masked_mse(layer(x, position_embeddings=rope), y, m)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 5.0)
            opt.step()
            sched.step()
            out["train_loss_last"] = float(loss)
        if step in checks:
            tv = time.perf_counter()
            valid_loss.append(torch_validate(layer, valid_pairs, b, rope))
            if valid_loss[-1] <= min(valid_loss):  # keep the best block, as the authors and we do
                best = {k: v.clone() for k, v in layer.state_dict().items()}
            valid_s += time.perf_counter() - tv
    train_s = time.perf_counter() - t
    return {**out, "train_s": train_s, "valid_s": valid_s, "steps_s": train_s - valid_s, "num_steps": num_steps,
            "valid_passes": len(valid_loss), "valid_loss": valid_loss, "kept_best": best is not None}


def child_torch(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"ceiling": [ceiling_torch()], "ceiling_bf16": ceiling_torch("bfloat16"), "threads": args.threads,
           "rss_before_load_mib": peak_rss_mib()}
    t = time.perf_counter()
    # sdpa: without an attention mask its attention is causal, which the copied layer's training relies on
    model = AutoModelForCausalLM.from_pretrained(args.hf_folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    out.update(load_s=time.perf_counter() - t, rss_after_load_mib=peak_rss_mib())
    batches = {name: [{k: torch.from_numpy(v).long() for k, v in b.items()} for b in load_batches(args.data, name)]
               for name in ("calib", "train", "valid")}

    t = time.perf_counter()
    start, by_start = torch_score(model, batches["calib"], args.span)
    out.update(score_s=time.perf_counter() - t, start=start, cosine=by_start, rss_after_score_mib=peak_rss_mib())

    t = time.perf_counter()
    pairs = torch_pairs(model, batches["train"], start, args.span, out)
    out.update(collect_s=time.perf_counter() - t, rss_after_collect_mib=peak_rss_mib())
    t = time.perf_counter()
    valid_pairs = torch_pairs(model, batches["valid"], start, args.span, out) if args.valid_chunks else None
    out["collect_valid_s"] = time.perf_counter() - t
    held = [x for p in (pairs, valid_pairs or ()) for x in p[0] + p[1]]
    out["pairs_mib"] = sum(x.numel() * x.element_size() for x in held) / 2 ** 20

    b, seq = batches["train"][0]["input_ids"].shape
    positions = torch.arange(seq)[None].expand(b, seq)
    with torch.no_grad():  # the same rotary tables for every batch of this shape
        rope = model.model.rotary_emb(pairs[0][0][None], positions)
    layer, trained = copied_layer(model, start, out.pop("check"), rope)
    out.update(torch_train(layer, trained, pairs, valid_pairs, b, rope, args), rss_after_train_mib=peak_rss_mib())
    out["ceiling"].append(ceiling_torch())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Parent


def child_data(args):
    """P1's chunks through the project's own data functions, batched once for both sides, in a child of its own:
    the torch child does not import jax, and the parent stays small (a child's ru_maxrss starts from its parent's
    resident size at the fork)."""
    from streamline_jax import data, loading, tasks

    # the folder our `load("smollm2-135m")` reads: the same safetensors for transformers (what the authors load)
    folder = loading.embedded_hf_folder("smollm2-135m")
    tokenizer = loading.load_tokenizer(folder)
    corpus = tasks.shared_data_dir() / "corpus"
    t = time.perf_counter()
    chunks = data.token_chunks(data.text_source(str(corpus / "train.jsonl")), tokenizer, args.seq)
    split = data.split_chunks(chunks, calib=max(P1_CALIB, args.calib_chunks), train=args.train_chunks)
    calib, train = split.calib[:args.calib_chunks], list(split.train)
    valid = data.split_chunks(data.token_chunks(data.text_source(str(corpus / "valid.jsonl")), tokenizer, args.seq),
                              calib=args.valid_chunks).calib
    # batched as the product batches them: calibration keeps a short last batch, training drops one, validation
    # pads one with masked rows
    arrays, tokens = {}, {}
    for name, source, kwargs in (("calib", calib, {}), ("train", train, {"drop_last": True}),
                                 ("valid", valid, {"pad_last": True})):
        group = list(data.batches(source, args.batch, **kwargs)) if source else []
        for i, b in enumerate(group):
            arrays[f"{name}/{i}/ids"], arrays[f"{name}/{i}/mask"] = b["input_ids"], b["attention_mask"]
        tokens[name] = int(sum(b["attention_mask"].sum() for b in group))
    np.savez(args.data, **arrays)
    return {"tokens": tokens, "data_s": time.perf_counter() - t, "hf_folder": str(folder),
            "config": json.loads((folder / "config.json").read_text())}


def run_child(side, args):
    flags = {"data": args.data, "hf-folder": args.hf_folder, "span": args.span, "lr": args.lr, "seq": args.seq,
             "batch": args.batch, "calib-chunks": args.calib_chunks, "train-chunks": args.train_chunks,
             "valid-chunks": args.valid_chunks, "eval-every": args.eval_every, "threads": args.threads,
             "compute-dtype": args.compute_dtype}
    cmd = [sys.executable, __file__, "--child", side] + [f"--{k}={v}" for k, v in flags.items() if v is not None]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("JAX_PLATFORMS", "cpu")  # both sides on the same CPU cores
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{side} child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = time.perf_counter() - t
    if side != "data":
        print(f"  {side}: done in {result['child_wall_s']:.0f} s", flush=True)
    return result


def merge(runs):
    """Each stage's best time over the rounds, the largest peak memory, every ceiling measured."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key.endswith("_s") and isinstance(value, float):
            out[key] = min(r[key] for r in runs)
        elif key.endswith("_mib"):
            out[key] = max(r[key] for r in runs)
    out["ceiling"] = [c for r in runs for c in r["ceiling"]]
    if isinstance(runs[0].get("ceiling_bf16"), list):
        out["ceiling_bf16"] = [c for r in runs for c in r["ceiling_bf16"]]
    out["rounds"] = runs
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-chunks", type=int, default=16, help="the first N of P1's 50 calibration chunks")
    ap.add_argument("--train-chunks", type=int, default=64, help="the first N of P1's training chunks")
    ap.add_argument("--valid-chunks", type=int, default=8, help="the first N validation chunks (0: no validation)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--span", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-every", type=int, default=None,
                    help="validate every N steps (default: ceil(steps / 5), P1's five validations after step 0; "
                         "the product's steps // 5 would validate after every step of a short slice)")
    ap.add_argument("--rounds", type=int, default=1, help="2: ours, torch, torch, ours; each stage's best time")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch's intra-op threads")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="our dot products' input dtype (the pipeline's model.compute_dtype); torch stays float32, "
                         "as the authors run it")
    ap.add_argument("--out", default="runs/bench_pipeline.json")
    ap.add_argument("--child", choices=("data", "ours", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--hf-folder", help=argparse.SUPPRESS)
    return ap


def run_rounds(args):
    """The data child, then each side's children round by round; the tokens, the model's config.json, the number of
    training steps and each side's rounds merged."""
    runs = {"ours": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        args.data = str(Path(tmp) / "batches.npz")
        prepared = run_child("data", args)
        tokens, cfg, args.hf_folder = prepared["tokens"], prepared["config"], prepared["hf_folder"]
        print(f"data: {tokens['calib']} calibration, {tokens['train']} training, {tokens['valid']} validation tokens "
              f"(tokenized in {prepared['data_s']:.1f} s, outside the timings)", flush=True)
        num_steps = tokens["train"] // (args.batch * args.seq)
        args.eval_every = args.eval_every or max(1, math.ceil(num_steps / 5))  # both sides validate at these steps
        for r in range(args.rounds):
            for side in ("ours", "torch") if r % 2 == 0 else ("torch", "ours"):
                runs[side].append(run_child(side, args))
    return tokens, cfg, num_steps, merge(runs["ours"]), merge(runs["torch"])


def stage_rows(ours, theirs, limit, passes):
    """(stage, ours s, torch s, limit s) of the table, None where a side has no such stage."""
    ours_valid = ours["valid_s"]
    ours_other = ours["train_s"] - ours["train_compile_s"] - ours["steps_s"] - ours_valid
    torch_train = theirs["collect_s"] + theirs["collect_valid_s"] + theirs["train_s"]
    return [
        ("score", ours["score_s"], theirs["score_s"], limit["score"]),
        ("  of which compile", ours["score_compile_s"], None, 0.0),
        ("train, all", ours["train_s"], torch_train, limit["pairs"] + limit["block"] + limit["valid"]),
        ("  compile", ours["train_compile_s"], None, 0.0),
        ("  pairs + block steps", ours["steps_s"], theirs["collect_s"] + theirs["steps_s"],
         limit["pairs"] + limit["block"]),
        ("    pairs (span I/O)", None, theirs["collect_s"], limit["pairs"]),
        ("    block fwd + bwd", None, theirs["steps_s"], limit["block"]),
        (f"  validation ({passes} passes)", ours_valid, theirs["collect_valid_s"] + theirs["valid_s"],
         limit["valid"]),
        ("  other (host, setup)", ours_other, None, None),
        ("score + train", ours["score_s"] + ours["train_s"], theirs["score_s"] + torch_train,
         limit["score"] + limit["pairs"] + limit["block"] + limit["valid"]),
    ]


def cell(x, fmt="{:9.1f}"):
    return fmt.format(x) if x is not None else f"{'-':>9}"


def print_header(args, ours, theirs, num_steps, ceiling, ceiling_ours):
    print(f"\nP1 pipeline on SmolLM2-135M, ours with {ours['compute_dtype']} dot inputs ({ours['compute_dtype_why']}), "
          f"torch float32: {args.calib_chunks} calibration + {args.train_chunks} training + "
          f"{args.valid_chunks} validation chunks of {args.seq}, batch {args.batch}, span {args.span}, `layer` block "
          f"with {'/'.join(FREEZE)} frozen, lr {args.lr:g}, {num_steps} steps, {args.rounds} round(s)")
    print(f"threads: {len(os.sched_getaffinity(0))} cores, torch {theirs['threads']}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"matmul ceiling (2048^3 f32, best of before/after): jax {max(ours['ceiling']) / 1e9:.1f} GFLOP/s, torch "
          f"{max(theirs['ceiling']) / 1e9:.1f} GFLOP/s; bf16 inputs with f32 accumulation: jax "
          f"{max(ours['ceiling_bf16']) / 1e9:.1f}, torch {theirs['ceiling_bf16'] / 1e9:.1f}. Limits at "
          f"{ceiling_ours / 1e9:.1f} for ours (its dtype), {ceiling / 1e9:.1f} for torch's float32")
    same = "the same span" if ours["start"] == theirs["start"] else "DIFFERENT spans (limits use ours)"
    print(f"span by cosine: ours layers [{ours['start']}, {ours['start'] + args.span}), torch layers "
          f"[{theirs['start']}, {theirs['start'] + args.span}): {same}")


def print_table(rows, ours, theirs, torch_scale):
    """The stages' table; its rows as dicts, for the JSON."""
    print(f"\n| {'stage':<24} | {'ours s':>9} | {'torch s':>9} | {'torch/ours':>10} | {'limit s':>9} | "
          f"{'ours frac':>10} | {'torch frac':>11} |")
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 11}|{'-' * 12}|{'-' * 13}|")
    table = []
    for name, o, th, lim in rows:
        ratio = th / o if o and th else None
        fo = lim / o if o and lim else None  # the fraction of the limit reached: 1.0 is the limit
        ft = lim * torch_scale / th if th and lim else None
        table.append({"stage": name.strip(), "ours_s": o, "torch_s": th, "ratio": ratio, "limit_s": lim})
        print(f"| {name:<24} | {cell(o)} | {cell(th)} | {cell(ratio, '{:10.2f}'):>10} | {cell(lim)} | "
              f"{cell(fo, '{:10.2f}'):>10} | {cell(ft, '{:11.2f}'):>11} |")
    po, pt = ours["peak_rss_mib"], theirs["peak_rss_mib"]
    print(f"| {'peak host memory, MiB':<24} | {po:9.0f} | {pt:9.0f} | {pt / po:10.2f} | {'-':>9} | {'-':>10} | "
          f"{'-':>11} |")
    return table


def print_notes(args, ours, theirs, flops, tokens, passes):
    print("\nfrac: the fraction of the limit reached (limit s / measured s, each side against its own dtype's "
          "ceiling; the limit s column is ours); torch/ours > 1: we are faster")
    print(f"load (not in the table): ours {ours['load_s']:.1f} s, torch {theirs['load_s']:.1f} s")
    print(f"peak host memory before load / after load / score / train: ours {ours['rss_before_load_mib']:.0f} / "
          f"{ours['rss_after_load_mib']:.0f} / {ours['rss_after_score_mib']:.0f} / {ours['rss_after_train_mib']:.0f} "
          f"MiB; torch {theirs['rss_before_load_mib']:.0f} / {theirs['rss_after_load_mib']:.0f} / "
          f"{theirs['rss_after_score_mib']:.0f} / {theirs['rss_after_train_mib']:.0f} MiB, of which "
          f"{theirs['pairs_mib']:.0f} MiB of cached pairs (their memory grows with the data, ours does not)")
    print(f"work: the pairs need {flops['pairs'] / tokens['train'] / 1e6:.0f} MFLOP per training token (layers 0.."
          f"{ours['start'] + args.span - 1}); torch's full forward does {flops['full_forward_per_token'] / 1e6:.0f} "
          f"(all layers and the LM head); both sides compute the validation pairs once for its {passes} passes")
    if ours["valid_loss"]:
        print(f"our steps: {ours['num_steps']} x {ours['step_s_median']:.2f} s (median); validation loss start -> "
              f"best: ours {ours['valid_loss'][0]:.4g} -> {min(ours['valid_loss']):.4g}, torch "
              f"{theirs['valid_loss'][0]:.4g} -> {min(theirs['valid_loss']):.4g}")


def main():
    args = parser().parse_args()
    if args.child:
        result = {"data": child_data, "ours": child_ours, "torch": child_torch}[args.child](args)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    tokens, cfg, num_steps, ours, theirs = run_rounds(args)
    # the limit is the work at the best rate measured for the dtype each side computes in: ours (float32 or bf16
    # inputs), torch float32 (the authors' path)
    ceiling = max(ours["ceiling"] + theirs["ceiling"])
    bf16 = ours["compute_dtype"] == "bfloat16"
    ceiling_ours = max(ours["ceiling_bf16"] + [theirs["ceiling_bf16"]]) if bf16 else ceiling
    passes = len(eval_steps(num_steps, args.eval_every)) if args.valid_chunks else 0
    flops = stage_flops(cfg, args.seq, tokens, ours["start"], args.span, passes)
    limit = {k: v / ceiling_ours for k, v in flops.items() if not k.endswith("per_token")}
    print_header(args, ours, theirs, num_steps, ceiling, ceiling_ours)
    table = print_table(stage_rows(ours, theirs, limit, passes), ours, theirs, ceiling_ours / ceiling)
    print_notes(args, ours, theirs, flops, tokens, passes)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "data")}, "tokens": tokens,
              "ceiling_flops": ceiling, "flops": flops, "limit_s": limit, "eval_passes": passes, "table": table,
              "same_span": ours["start"] == theirs["start"], "ours": ours, "torch": theirs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
