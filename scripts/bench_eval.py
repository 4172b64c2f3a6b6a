"""Our evaluation against the same evaluation with transformers' PyTorch model, in one run: tokens per second
(compile time included on our side; tokenizing is timed on neither side), compiles, and parity of the figures.

Perplexity goes batch by batch, PyTorch's batch and ours in turn (which goes first alternates, with a pause between
them): the machine is shared and its speed drifts by 10-20% within a minute, and taking turns puts the same drift on
both sides. Ours is timed in three passes, each against its own PyTorch pass:
- first run: compiles from scratch (the persistent compilation cache starts empty), the compile counted;
- compiled: the same process again;
- later run: jax's in-memory caches cleared, as in a new process; the compile is read from the persistent cache
  that `streamline_jax.run` keeps (here a fresh temporary folder).
Our batches are the calls `streamline_jax.perplexity` makes (`score_sequences` on the same windows, same batch);
the public call is then timed whole once, compiled, for its figure.

    python scripts/bench_eval.py [--windows 16] [--window 1024] [--items 50] [--batch-size 8] [--mc-batch-size 32]
        [--passes first,compiled,later]

Perplexity: the first `--windows` windows of WikiText-2 test. Multiple choice: the first `--items` PIQA items, every
(item, choice) request sorted by length. PyTorch gets batches of --mc-batch-size requests, each padded to its
longest; we pack requests into rows of 256 tokens, --mc-batch-size/4 rows a call (the same slots as 32 requests of
64 tokens), and the two choices of an item read their shared context once (`share_prefixes`; also timed without,
compiled). PyTorch runs once before ours and once after, and ratios use the mean of the two. Also prints how many
compiles a full PIQA run needs and the tokens its shared prefixes spare (no model work).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import streamline_jax as sj  # noqa: E402
from streamline_jax import distributed  # noqa: E402
from streamline_jax import evaluation as ev  # noqa: E402
from streamline_jax import tasks as tk  # noqa: E402


def torch_model():
    from transformers import AutoModelForCausalLM

    from streamline_jax.loading import embedded_gguf

    path = embedded_gguf("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def torch_score(model, sequences, num_scored, batch_size):
    """The same batching as ours (longest first), padded to each batch's longest; per-token log-probs."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [None] * len(sequences)
    for k in range(0, len(order), batch_size):
        batch = order[k:k + batch_size]
        length = max(len(sequences[i]) for i in batch) - 1
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(sequences[i]) - 1
            ids[row, :n] = torch.tensor(sequences[i][:-1])
            mask[row, :n] = 1
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), -1)
        for row, i in enumerate(batch):
            seq = sequences[i]
            n = len(seq) - 1
            targets = torch.tensor(seq[1:])
            lp = logp[row, :n].gather(-1, targets[:, None])[:, 0].double().numpy()
            out[i] = lp[n - num_scored[i]:]
    return out


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def interleaved(batches, ours, theirs, pause=0.5):
    """Run each batch on both sides in turn, alternating which goes first, with a pause before each (PyTorch's
    OpenMP threads spin for a while after its work, and would slow ours). Per side: outputs, seconds, compiles."""
    sides = {"ours": ours, "torch": theirs}
    out = {side: {"out": [], "seconds": 0.0, "compiles": 0} for side in sides}
    for k, rows in enumerate(batches):
        for side in (("torch", "ours") if k % 2 == 0 else ("ours", "torch")):
            time.sleep(pause)
            (result, compiles), seconds = timed(sides[side], rows)
            out[side]["out"].append(result)
            out[side]["seconds"] += seconds
            out[side]["compiles"] += compiles
    return out


# perplexity passes: --passes name -> printed label
PASSES = {"first": "first run (compiles from scratch, counted)", "compiled": "compiled",
          "later": "later run (compile read from the persistent cache)"}


def perplexity_of(batch_outputs):
    """exp(mean NLL) over the per-window log-probs of every batch."""
    logprobs = [x for batch in batch_outputs for x in batch]
    return math.exp(-sum(float(x.sum()) for x in logprobs) / sum(len(x) for x in logprobs))


def print_later_run(seconds, fed, t_torch, cache_hits):
    print(f"  ours in a later run (compile read from the persistent cache): {fed / seconds:8.0f} tokens/s "
          f"({seconds:.1f}s, {cache_hits} programs read from the cache so far); ratio ours/torch "
          f"{t_torch / seconds:.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="perplexity batch (windows)")
    parser.add_argument("--mc-batch-size", type=int, default=32, help="multiple-choice batch (requests)")
    parser.add_argument("--passes", default="first,compiled,later",
                        help="perplexity passes to run, in this order: first (cold compile), compiled, later")
    args = parser.parse_args()
    chosen = args.passes.split(",")
    if any(p not in PASSES for p in chosen) or chosen[0] != "first":
        parser.error(f"--passes: a comma-separated list of {', '.join(PASSES)}, starting with first")
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    cache_dir = tempfile.TemporaryDirectory(prefix="bench_eval_xla_")
    distributed.enable_compilation_cache(cache_dir.name)  # empty: the first runs below compile from scratch
    cache_hits = []
    jax.monitoring.register_event_listener(lambda e, **kw: cache_hits.append(e) if "cache_hits" in e else None)

    model = sj.load("smollm2-135m")
    ref = torch_model()

    # --- perplexity
    text, _ = ev.read_text("wikitext2")
    ids = ev.tokenize_text(model.tokenizer, text)
    spans = ev.perplexity_windows(len(ids), args.window)[:args.windows]
    seqs = [ids[b:e] for b, e, _ in spans]
    scored = [s for _, _, s in spans]
    fed = sum(len(s) - 1 for s in seqs)
    length = min(args.window, max(len(s) for s in seqs)) - 1  # what perplexity() pads every window to
    batches = [range(k, min(k + args.batch_size, len(seqs))) for k in range(0, len(seqs), args.batch_size)]

    def ours_batch(rows):
        logprobs, stats = ev.score_sequences(model, [seqs[i] for i in rows], [scored[i] for i in rows],
                                             batch_size=args.batch_size, fixed_length=length)
        return logprobs, stats["compiles"]

    def torch_batch(rows):
        return torch_score(ref, [seqs[i] for i in rows], [scored[i] for i in rows], args.batch_size), 0

    passes = {}
    for name in chosen:
        if name == "later":
            jax.clear_caches()
        passes[name] = interleaved(batches, ours_batch, torch_batch)
    ppl = {side: perplexity_of(passes["first"][side]["out"]) for side in ("ours", "torch")}
    print(f"perplexity, {len(seqs)} windows of {args.window} (batch {args.batch_size}, {len(batches)} batches, "
          f"PyTorch's and ours in turn): ours {ppl['ours']:.4f} torch {ppl['torch']:.4f} "
          f"(rel diff {abs(ppl['ours'] / ppl['torch'] - 1):.2e})", flush=True)
    for name, sides in passes.items():
        t_ours, t_torch = sides["ours"]["seconds"], sides["torch"]["seconds"]
        print(f"  {PASSES[name]}: ours {fed / t_ours:6.0f} tokens/s ({t_ours:.1f}s, {sides['ours']['compiles']} "
              f"compiles), torch {fed / t_torch:6.0f} tokens/s ({t_torch:.1f}s); ratio ours/torch "
              f"{t_torch / t_ours:.2f}x", flush=True)
    if "later" in passes:
        print(f"  {len(cache_hits)} programs read from the persistent cache in the later run", flush=True)
    t0 = time.perf_counter()
    ours = ev.perplexity(model, "wikitext2", args.window, batch_size=args.batch_size, max_windows=args.windows)
    print(f"  the public call, compiled: perplexity {ours['perplexity']:.4f}, {fed / ours['seconds']:.0f} tokens/s "
          f"({ours['seconds']:.1f}s, {ours['compiles']} compiles; {time.perf_counter() - t0:.1f}s with reading and "
          f"tokenizing all of WikiText-2)", flush=True)

    if args.items > 0:
        multiple_choice(model, ref, args, cache_hits)
    compile_timing(model, args, cache_dir.name, cache_hits)
    full_piqa_shapes(model, args)


def multiple_choice(model, ref, args, cache_hits):
    items = tk.load_items(tk.PIQA, args.items)
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    encoded = ev.encode_pairs(model.tokenizer, pairs)
    seqs = [np.asarray(c + x, np.int32) for c, x in encoded]
    theirs, t_before = timed(torch_score, ref, seqs, [len(x) for _, x in encoded], args.mc_batch_size)
    t0 = time.perf_counter()
    sums, counts, stats = ev.loglikelihoods(model, pairs, batch_size=args.mc_batch_size)
    t_call = time.perf_counter() - t0
    t_ours = stats["seconds"]  # model work and compiles, not tokenizing (untimed on the PyTorch side too)
    for _ in range(2):  # the first call compiles the unshared rows' program; the second is timed
        unshared, _, plain = ev.loglikelihoods(model, pairs, batch_size=args.mc_batch_size, share_prefixes=False)
    _, _, again = ev.loglikelihoods(model, pairs, batch_size=args.mc_batch_size)  # compiled, as `plain`
    _, t_after = timed(torch_score, ref, seqs, [len(x) for _, x in encoded], args.mc_batch_size)
    t_torch = (t_before + t_after) / 2
    theirs = np.array([x.sum() for x in theirs])
    fed = sum(len(s) - 1 for s in seqs)
    acc = lambda s: np.mean([np.argmax(s[2 * i:2 * i + 2]) == it.label for i, it in enumerate(items)])
    print(f"PIQA, first {len(items)} items = {len(pairs)} requests (batch {args.mc_batch_size}): acc ours "
          f"{acc(sums):.4f} torch {acc(theirs):.4f}; per-request log-likelihood max abs diff "
          f"{np.max(np.abs(sums - theirs)):.2e} (max rel {np.max(np.abs(sums - theirs) / np.abs(theirs)):.2e})")
    print(f"  ours  {fed / t_ours:8.0f} tokens/s ({t_ours:.1f}s, {stats['compiles']} compiles included; "
          f"{t_call:.1f}s with tokenizing)\n"
          f"  torch {fed / t_torch:8.0f} tokens/s ({t_torch:.1f}s: {t_before:.1f}s before ours, {t_after:.1f}s after)\n"
          f"  ratio ours/torch {t_torch / t_ours:.2f}x\n"
          f"  compiled: ours {fed / again['seconds']:8.0f} tokens/s ({again['seconds']:.1f}s), prefixes not "
          f"shared {fed / plain['seconds']:8.0f} tokens/s ({plain['seconds']:.1f}s; log-likelihoods within "
          f"{np.max(np.abs(sums - unshared)):.1e}): {stats['shared']:,} of {fed:,} tokens spared, "
          f"{plain['seconds'] / again['seconds']:.2f}x", flush=True)
    jax.clear_caches()
    _, _, later = ev.loglikelihoods(model, pairs, batch_size=args.mc_batch_size)
    print_later_run(later["seconds"], fed, t_torch, len(cache_hits))


def compile_timing(model, args, cache_dir, cache_hits):
    """The perplexity program's trace and compile: from scratch, and read from the persistent cache."""
    shape = jax.ShapeDtypeStruct((args.batch_size, args.window - 1), np.int32)

    def compile_once():
        jax.clear_caches()
        program = ev.target_logprobs.jitted(model.config)  # the jit a call with this config runs
        lowered, t_lower = timed(program.lower, model.config, model.params, shape, shape, shape)
        return t_lower, timed(lowered.compile)[1]

    distributed.enable_compilation_cache("off")
    scratch = compile_once()
    distributed.enable_compilation_cache(cache_dir)
    compile_once()  # makes sure the cache holds it (jax caches compiles over 1 s only)
    hits_before = len(cache_hits)
    cached = compile_once()
    read = "read from the persistent cache" if len(cache_hits) > hits_before else "again (too quick to be cached)"
    for label, (t_lower, t_compile) in (("from scratch", scratch), (read, cached)):
        print(f"perplexity program [{args.batch_size}, {args.window - 1}], {label}: trace and lower {t_lower:.2f}s, "
              f"compile {t_compile:.2f}s", flush=True)


def full_piqa_shapes(model, args):
    """How many compiles a full PIQA run needs, its padding and the tokens its shared prefixes spare (no model
    work)."""
    items = tk.load_items(tk.PIQA)
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    encoded = ev.encode_pairs(model.tokenizer, pairs)
    seqs, scored = [np.asarray(c + x, np.int32) for c, x in encoded], [len(x) for _, x in encoded]
    fed = sum(len(s) - 1 for s in seqs)
    per_call = max(1, args.mc_batch_size // 4)
    for share in (True, False):
        length, calls = ev.packed_calls(seqs, scored, 256, per_call, share_prefixes=share)
        rows = sum(1 for call in calls for row in call if row)
        read = sum(unit.slots for call in calls for row in call for unit in row)
        slots = sum(len(call) for call in calls) * length
        print(f"full PIQA{'' if share else ', prefixes not shared'}: {len(pairs)} requests, {fed:,} tokens read as "
              f"{read:,} ({1 - read / fed:.1%} spared by shared prefixes), packed into {rows} rows of {length} "
              f"({per_call} rows a call): {len({len(c) for c in calls})} compiles (rows per call "
              f"{sorted({len(c) for c in calls})}); padding {1 - read / slots:.1%} of the fed slots")


if __name__ == "__main__":
    main()
