"""Protocol P1 on SmolLM2-135M: dense vs pruned (none / layer / ffn / mlp in MSE mode, layer in LM-loss and KD mode).

Calibration: the first 50 chunks of 512 tokens of corpus/train.jsonl (documents in file order, EOS between them);
training: the next 1000 chunks; validation: the first 100 chunks of corpus/valid.jsonl built the same way. Span: 8
layers chosen by cosine, replaced by one block. AdamW lr 2e-4, weight decay 1e-3, warm-up then cosine to 5e-5,
clipping at 5, batch 8, one epoch, keep the best block on validation loss. Evaluation: WikiText-2 perplexity on the
first 128 windows of 1024 tokens, PIQA accuracy on the first 1000 items (with its standard error).

The MSE rows share one tensorstore cache of the frozen span's (input, target) pairs, so the frozen model runs once.
Each finished row is appended to OUT/results.json, and a rerun skips rows already there.

    python scripts/p1_protocol.py [--out runs/p1] [--rows ROW,...] [--ridge 1e-4]
        [--fit-weighting token|uniform|balanced] [--shuffle [--seed 0]] [--piqa-items 0]
        [--lr 2e-4 --min-lr 5e-5 --lr-schedule cosine --warmup N]
        [--grad-accum 1] [--authors-bidirectional] [--freeze self_attn,input_layernorm] [--tag name]
        [--compute-dtype float32|bfloat16|auto] [--trainable block,segments/seg_2/.*mlp.*]
        [--kd-temperature 1 --kd-ce-weight 0 --kd-hidden-layers -1 --kd-hidden-weight 0]
        [--distill-steps 0 --distill-lr 1e-3 --distill-freeze REGEX,... --distill-trainable REGEX,...
        --distill-tag SUFFIX]

Rows (default: all): dense, none, layer, ffn, mlp, layer-lm, layer-kd, layer-token, layer-balanced, layer-untrained,
mlp-token, linear, mlp-linit, layer-ppl, none-ppl, none-last.

`--shuffle` reads the 1000 training chunks in a seeded random order (the authors' DataLoader shuffles); without it
they go in file order, so a batch holds neighbouring pieces of the same documents. `--piqa-items 0` skips PIQA, for
quick screening on perplexity. `--grad-accum 16` is the authors' default (batch 8 x 16 per optimizer step: 7 steps on
1000 chunks). `--authors-bidirectional` trains the `layer` block without a causal mask, the way the authors' code
calls its layer, to compare with their figures; it is never what the package does. `--freeze` keeps the block's
parameters whose paths match as initialised (`train_replacement(freeze=...)`); `self_attn,input_layernorm` trains
only the `layer` block's feed-forward half.

`--compute-dtype` sets the dot products' input dtype for everything (scoring, the frozen model in training,
evaluation; float32 accumulation either way); each row records it. The default is float32, as the table's
figures were first measured; the README compares the two.

`linear` is ReplaceMe's training-free replacement (`linear_fit.py`): x + xW fitted in closed form on the 50
calibration chunks, no training; `mlp-linit` is the `mlp` block with its output projection fitted the same way, then
trained. `layer-ppl` trains the `layer` block on the span whose removal costs the least calibration loss
(`score.metric=perplexity`) instead of the cosine one; `none-ppl` and `none-last` remove that span, or the last 8
layers (the depth-pruning papers' baseline), with nothing in their place.

`layer-token` and `mlp-token` are those blocks trained on a per-token relative MSE (`mse_weighting="token"`): the span's output
at position 0 carries a massive activation that makes up ~98% of the plain MSE of a block that starts as the
identity (`scripts/span_pair_stats.py`). `layer-untrained` is the `layer`
block as initialised (a copy of the span's first layer), the same model as the authors' `none` row (layers 12-18
removed when the span is 11-18).

`layer-balanced` is the `layer` block on the pipeline's default MSE weighting (`balanced`). `--distill-steps N`
follows each MSE or LM row with the pipeline's distillation phase (`train.distill_steps`: N steps of mode kd at
`--distill-lr`, training what the row trained or `--distill-trainable` less `--distill-freeze`, the better of before
and after on the validation KL); the row before it is recorded too, and the distilled one as ROW+kdN. The row's
trained model is kept in OUT/trained_ROW (Orbax), and a later variant of the distillation (another --distill-tag)
starts from it instead of training the row again. The
pipeline's default recipe on P1's chunks is `--rows layer-balanced --shuffle --lr 1e-2 --freeze attention
--distill-steps 16`.

`layer-kd` distils the dense model into the pruned one (`mode="kd"`): KL between their next-token distributions at
`--kd-temperature`, `--kd-ce-weight` of next-token cross-entropy mixed in, and with `--kd-hidden-weight` the MSE of
the hidden states leaving the span and the original layers `--kd-hidden-layers`. `--trainable` (LM and KD rows)
lists regexes over the pruned model's parameter paths that train besides or instead of the block (`block`); with an
8-layer span, seg_0 is the layers before it, seg_1 the block and seg_2 the layers after it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import jax.numpy as jnp

import streamline_jax as sj
from streamline_jax import data, linear_fit, score, settings, tasks, train
from streamline_jax.evaluation import evaluate as evaluate_tasks, perplexity
from streamline_jax.model_io import ORBAX_MARKER
from streamline_jax.models import layers, llama
from streamline_jax.pruning import prune

# row: (replacement, training mode, MSE weighting)
ROW_SPECS = {"dense": (None, None, None), "none": ("none", None, None), "layer": ("layer", "mse", "uniform"),
             "ffn": ("ffn", "mse", "uniform"), "mlp": ("mlp", "mse", "uniform"), "layer-lm": ("layer", "lm", None),
             "layer-kd": ("layer", "kd", None),
             "layer-token": ("layer", "mse", "token"), "layer-balanced": ("layer", "mse", "balanced"),
             "layer-untrained": ("layer", None, None),
             "mlp-token": ("mlp", "mse", "token"), "linear": ("linear", None, None),
             "mlp-linit": ("mlp", "mse", "uniform"), "layer-ppl": ("layer", "mse", "uniform"),
             "none-ppl": ("none", None, None), "none-last": ("none", None, None)}
ROWS = tuple(ROW_SPECS)
ROW_SPAN_METRIC = {"layer-ppl": "perplexity", "none-ppl": "perplexity", "none-last": "last"}  # others: cosine
LINEAR_FIT_ROWS = ("linear", "mlp-linit")  # closed-form fit on the calibration chunks (mlp-linit: then trained)


def chunk_lists(model, args):
    corpus = tasks.shared_data_dir() / "corpus"
    train_chunks = data.token_chunks(data.text_source(str(corpus / "train.jsonl")), model.tokenizer, args.seq)
    split = data.split_chunks(train_chunks, calib=args.calib_chunks, train=args.train_chunks)
    train_list = list(split.train)
    valid = data.split_chunks(data.token_chunks(data.text_source(str(corpus / "valid.jsonl")), model.tokenizer,
                                                args.seq), calib=args.valid_chunks).calib
    return split.calib, train_list, valid


@contextlib.contextmanager
def authors_bidirectional_training(enabled):
    """The authors' flaw, reproduced for comparison only: their training calls the replacement layer without an
    attention mask, so (with eager attention) every position sees the whole chunk, later tokens included. Evaluation
    afterwards is causal as always. P1's chunks have no padding, so every key is real."""
    if not enabled:
        yield
        return
    causal_attend = llama.attend

    def attend_everything(q, k, v, mask, causal=False):
        return layers.attend(q, k, v, jnp.ones_like(mask))  # not causal: dense attention over every key

    llama.attend = attend_everything
    try:
        yield
    finally:
        llama.attend = causal_attend


def evaluate_row(model, args):
    t = time.perf_counter()
    ppl = perplexity(model, "wikitext2", window=1024, max_windows=args.eval_windows, batch_size=4)
    out = {"wikitext2_ppl": ppl["perplexity"], "ppl_windows": ppl["windows"]}
    if args.piqa_items > 0:  # 0: perplexity only, for quick screening
        piqa = evaluate_tasks(model, ["piqa"], limit=args.piqa_items, batch_size=32)["tasks"]["piqa"]
        acc = piqa["acc"]
        out.update(piqa_acc=acc, piqa_stderr=math.sqrt(acc * (1 - acc) / piqa["n"]), piqa_n=piqa["n"])
    return {**out, "num_params": model.num_params, "eval_s": time.perf_counter() - t}


def split_or_none(text):
    """A comma-separated list of regexes as a tuple; None stays None (the setting's default)."""
    return None if text is None else tuple(t for t in text.split(",") if t)


TRAINING_FIELDS = ("shuffle_seed", "lr_schedule", "lr", "min_lr", "grad_accum", "bidirectional_training", "freeze",
                   "trainable", "kd_temperature", "kd_ce_weight", "kd_hidden_layers", "kd_hidden_weight",
                   "valid_loss_start", "valid_loss_best", "best_step", "steps")


def training_options(args, mode, weighting, freeze, trainable, kd_hidden_layers, num_chunks):
    """The row's TrainSection: the protocol's optimizer with the command line's departures from it."""
    steps = num_chunks // args.batch // args.grad_accum
    return settings.TrainSection(
        mode=mode, lr=args.lr, min_lr=args.min_lr, weight_decay=1e-3, clip_norm=5.0,
        warmup_steps=args.warmup or max(1, steps // 20), grad_accum=args.grad_accum, lr_schedule=args.lr_schedule,
        # the LM and KD losses validate through the whole model: only at the start and the end
        eval_every=max(1, steps // (1 if mode in ("lm", "kd") else 5)),
        mse_weighting=weighting or "uniform", shuffle=args.shuffle, seed=args.seed, freeze=freeze,
        trainable=trainable, kd_temperature=args.kd_temperature, kd_ce_weight=args.kd_ce_weight,
        kd_hidden_layers=kd_hidden_layers, kd_hidden_weight=args.kd_hidden_weight,
        distill_steps=args.distill_steps, distill_lr=args.distill_lr,
        distill_lr_beyond_block=args.distill_lr_beyond_block, distill_freeze=split_or_none(args.distill_freeze),
        distill_trainable=split_or_none(args.distill_trainable))


def training_fields(args, mode, freeze, trainable, kd_hidden_layers, history):
    """What a trained row records of its training (TRAINING_FIELDS)."""
    kd = ({"kd_temperature": args.kd_temperature, "kd_ce_weight": args.kd_ce_weight,
           "kd_hidden_layers": list(kd_hidden_layers), "kd_hidden_weight": args.kd_hidden_weight}
          if mode == "kd" else {})
    return {"shuffle_seed": args.seed if args.shuffle else None, "lr_schedule": args.lr_schedule, "lr": args.lr,
            "min_lr": args.min_lr, "grad_accum": args.grad_accum, "bidirectional_training": args.authors_bidirectional,
            "freeze": list(freeze), "trainable": list(trainable), **kd,
            "valid_loss_start": history["valid"][0][1], "valid_loss_best": history["best_valid"],
            "best_step": history["best_step"], "steps": history["train"][-1][0]}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/p1")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--pairs", default=None, help="folder for the MSE rows' pair cache (default: --out)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=50)
    ap.add_argument("--train-chunks", type=int, default=1000)
    ap.add_argument("--valid-chunks", type=int, default=100)
    ap.add_argument("--span", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--min-lr", type=float, default=5e-5)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--piqa-items", type=int, default=1000, help="0: perplexity only")
    ap.add_argument("--shuffle", action="store_true", help="read the training chunks in a seeded random order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr-schedule", default="cosine", choices=train.LR_SCHEDULES)
    ap.add_argument("--tag", default="", help="suffix for the row names (row@tag), for runs off the protocol")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of the steps)")
    ap.add_argument("--authors-bidirectional", action="store_true",
                    help="train the block without a causal mask, as the authors' code does (comparison only)")
    ap.add_argument("--freeze", default="",
                    help="comma-separated regexes over the block's parameter paths to keep as initialised "
                         "(e.g. self_attn,input_layernorm: train the layer block's feed-forward half only)")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    ap.add_argument("--ridge", type=float, default=linear_fit.DEFAULT_RIDGE,
                    help="relative ridge of the closed-form fit (linear, mlp-linit rows)")
    ap.add_argument("--fit-weighting", default="token", choices=linear_fit.WEIGHTINGS,
                    help="token weights of the closed-form fit (uniform: ReplaceMe's)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="batches per optimizer step (the authors' code defaults to 16)")
    ap.add_argument("--trainable", default="block",
                    help="comma-separated regexes over the pruned model's parameter paths that train (LM and KD rows; "
                         "`block`: the replacement block)")
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--kd-ce-weight", type=float, default=0.0, help="the cross-entropy's share of the KD loss")
    ap.add_argument("--kd-hidden-layers", default="",
                    help="comma-separated original layers after the span (-1: the last) matched by hidden-state MSE")
    ap.add_argument("--kd-hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE (0: none)")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="after an MSE or LM row, this many steps of distillation from there, as the pipeline's "
                         "train.distill_steps (the row before it is kept too, as ROW; this one is ROW+kdN)")
    ap.add_argument("--distill-lr", type=float, default=settings.TrainSection.distill_lr)
    ap.add_argument("--distill-lr-beyond-block", type=float, default=None,
                    help="the distillation phase's peak lr of what trains outside the block (default: --distill-lr), "
                         "as train.distill_lr_beyond_block")
    ap.add_argument("--distill-freeze", default=None,
                    help="comma-separated regexes kept frozen in the distillation phase ('': nothing, so the layer "
                         "block's attention trains there too; default: --freeze), as train.distill_freeze")
    ap.add_argument("--distill-tag", default="",
                    help="suffix for the distilled row only (ROW+kdNSUFFIX), so that the row before it is reused; "
                         "a suffix that starts with a dash needs the = form (--distill-tag=-x)")
    ap.add_argument("--distill-trainable", default=None,
                    help="what the distillation phase trains (default: --trainable), as train.distill_trainable")
    return ap


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """The rows asked for and the training settings they share, checked against each other."""
    rows: list[str]
    freeze: tuple[str, ...] | None
    trainable: tuple[str, ...] | None
    kd_hidden_layers: tuple[int, ...]


def row_plan(args) -> RowPlan:
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    trained = [r for r in rows if ROW_SPECS[r][1] is not None]
    freeze = split_or_none(args.freeze)
    if freeze and any(ROW_SPECS[r][0] != "layer" for r in trained):
        raise SystemExit(f"--freeze names parts of the layer block; train only layer rows with it, not {trained}")
    trainable = split_or_none(args.trainable)
    if trainable != ("block",) and any(ROW_SPECS[r][1] == "mse" for r in trained):
        raise SystemExit(f"--trainable beyond the block is for the LM and KD rows, not {trained}")
    if args.authors_bidirectional and trained != ["layer"]:
        raise SystemExit(f"--authors-bidirectional applies to the MSE layer row only, not {trained}")
    return RowPlan(rows, freeze, trainable, tuple(int(h) for h in args.kd_hidden_layers.split(",") if h))


@dataclasses.dataclass(frozen=True)
class Row:
    """One row as it runs: its names, what it replaces the span with, how it trains, its span and when it began."""
    name: str  # ROW or ROW@TAG
    final: str  # what it is recorded as: ROW+kdN... (with --distill-tag and @TAG) where a distillation follows
    replacement: str | None
    mode: str | None
    weighting: str | None
    span_metric: str
    start: int
    distils: bool
    t0: float


class Protocol:
    """P1's model, chunks and spans, and OUT/results.json, which grows by a row as each finishes."""

    def __init__(self, args):
        self.args = args
        self.plan = row_plan(args)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.pairs_dir = Path(args.pairs) if args.pairs else self.out
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.model = sj.with_compute_dtype(sj.load("smollm2-135m"), args.compute_dtype)
        calib, self.train_chunks, self.valid_chunks = chunk_lists(self.model, args)
        self.calib_batches = list(data.batches(calib, args.batch))
        scores = sj.score_spans(self.model, self.calib_batches, metric="cosine")
        cosine_start = sj.choose_span(scores, length=args.span).start
        print(f"span: layers [{cosine_start}, {cosine_start + args.span}) by cosine "
              f"{scores.to_numpy()[cosine_start, args.span]:.4f}")
        self.span_starts = {"cosine": cosine_start}

    def span_start(self, metric):
        if metric not in self.span_starts:
            if metric == "perplexity":
                t = time.perf_counter()
                choice, costs = score.choose_span_by_loss(self.model, self.calib_batches, length=self.args.span)
                print(costs, f"\n({time.perf_counter() - t:.0f} s)", flush=True)
            else:
                choice = score.choose_last_span(self.model.config, length=self.args.span)
            self.span_starts[metric] = choice.start
            print(f"span by {metric}: layers [{choice.start}, {choice.end})", flush=True)
        return self.span_starts[metric]

    def record(self, name, row: Row, candidate, train_s, extra):
        """Evaluate `candidate` as row `name`, add it to OUT/results.json."""
        fields = {"span": [row.start, row.start + self.args.span - 1], "span_metric": row.span_metric,
                  "train_s": train_s, "compute_dtype": self.model.config.compute_dtype, **extra}
        self.results[name] = {**fields, **evaluate_row(candidate, self.args), "row_s": time.perf_counter() - row.t0}
        # merge into what is on disk now, so runs of different rows into one folder keep each other's rows
        on_disk = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.results = {**on_disk, name: self.results[name]}
        self.results_path.write_text(json.dumps(self.results, indent=1))
        print(name, self.results[name], flush=True)

    def run_row(self, row_name):
        """The row, unless OUT/results.json has it: prune, fit, train and distil as it says, then evaluate."""
        args = self.args
        replacement, mode, weighting = ROW_SPECS[row_name]
        name = f"{row_name}@{args.tag}" if args.tag else row_name
        distils = args.distill_steps > 0 and mode in ("mse", "lm")
        final = (f"{row_name}+kd{args.distill_steps}{args.distill_tag}" + (f"@{args.tag}" if args.tag else "")
                 if distils else name)
        if final in self.results:
            return
        t0 = time.perf_counter()
        span_metric = ROW_SPAN_METRIC.get(row_name, "cosine")
        row = Row(name, final, replacement, mode, weighting, span_metric, self.span_start(span_metric), distils, t0)
        train_s, extra, candidate = 0.0, {}, self.model
        if row_name != "dense":
            candidate = prune(self.model, row.start, args.span, replacement)
            if row_name in LINEAR_FIT_ROWS:
                candidate, extra = self.fit(row, candidate)
            if replacement != "none" and mode is not None:
                candidate, train_s, extra = self.train_row(row, candidate, extra)
        self.record(final, row, candidate, train_s, extra)

    def fit(self, row: Row, candidate):
        """The block fitted in closed form on the calibration chunks, and what the fit records."""
        args = self.args
        t = time.perf_counter()
        candidate, [fit] = linear_fit.fit_linear(self.model, candidate, self.calib_batches, ridge=args.ridge,
                                                 weighting=args.fit_weighting)
        extra = {"fit_s": time.perf_counter() - t, "fit_tokens": fit.tokens, "ridge": args.ridge,
                 "fit_weighting": args.fit_weighting,
                 "fit_relative_error": fit.relative_error}
        print(f"{row.name}: closed-form fit {extra}", flush=True)
        return candidate, extra

    def train_row(self, row: Row, candidate, extra):
        """The block trained (or, before another variant of its distillation, the one trained then), and distilled
        where the row says."""
        plan, args = self.plan, self.args
        options = training_options(args, row.mode, row.weighting, plan.freeze, plan.trainable, plan.kd_hidden_layers,
                                   len(self.train_chunks))
        trained_dir = self.out / f"trained_{row.name}"  # kept where a distillation follows, for the next variant
        if row.distils and row.name in self.results and (trained_dir / ORBAX_MARKER).exists():
            candidate = sj.with_compute_dtype(sj.load_orbax_model(trained_dir), args.compute_dtype)
            train_s, extra = self.results[row.name]["train_s"], {**extra, **{
                k: v for k, v in self.results[row.name].items() if k in TRAINING_FIELDS}}
            print(f"{row.name}: the trained model reused from {trained_dir}", flush=True)
        else:
            candidate, train_s, extra = self.train_block(row, candidate, options, extra)
            if row.distils:
                sj.save_orbax_model(candidate, trained_dir, overwrite=True)
        if row.distils:  # the pipeline's distillation phase from the trained block; the row before it kept too
            if row.name not in self.results:
                self.record(row.name, row, candidate, train_s, extra)
            candidate, train_s, extra = self.distil(row, candidate, options, train_s, extra)
        return candidate, train_s, extra

    def train_block(self, row: Row, candidate, options, extra):
        plan, args = self.plan, self.args
        t = time.perf_counter()
        with authors_bidirectional_training(args.authors_bidirectional):
            candidate, history = train.train_replacement(
                self.model, candidate, self.train_chunks, options, batch_size=args.batch,
                valid_batches=self.valid_chunks, return_history=True,
                pair_cache=self.pairs_dir / f"pairs_{row.start}_{args.span}" if row.mode == "mse" else None)
        train_s = time.perf_counter() - t
        (self.out / f"history_{row.name}.json").write_text(json.dumps(history, indent=1))
        extra = {**extra, **training_fields(args, row.mode, plan.freeze, plan.trainable, plan.kd_hidden_layers,
                                            history)}
        return candidate, train_s, extra

    def distil(self, row: Row, candidate, options, train_s, extra):
        args = self.args
        t = time.perf_counter()
        candidate, distilled = train.train_replacement(
            self.model, candidate, self.train_chunks, options.distillation(len(self.train_chunks), args.batch),
            batch_size=args.batch, valid_batches=self.valid_chunks, return_history=True)
        extra = {**extra, "distill_steps": args.distill_steps, "distill_lr": args.distill_lr,
                 "distill_lr_beyond_block": args.distill_lr_beyond_block,
                 "distill_freeze": args.distill_freeze, "distill_trainable": args.distill_trainable,
                 "distill_s": time.perf_counter() - t, "distill_valid_kd_start": distilled["valid"][0][1],
                 "distill_valid_kd_best": distilled["best_valid"],
                 "distill_best_step": distilled["best_step"]}
        (self.out / f"history_{row.final}.json").write_text(json.dumps(distilled, indent=1))
        return candidate, train_s + extra["distill_s"], extra


def print_table(results, args):
    print(f"\nP1 on SmolLM2-135M ({args.train_chunks} training chunks of {args.seq}; WikiText-2 first "
          f"{args.eval_windows} x 1024; PIQA first {args.piqa_items})")
    print("| row | WikiText-2 ppl | PIQA acc | params | training wall time |")
    print("|---|---|---|---|---|")
    for row in sorted(results, key=lambda k: (ROWS.index(k.split("@")[0].split("+")[0]), k)):
        r = results[row]
        piqa = f"{r['piqa_acc']:.3f} ± {r['piqa_stderr']:.3f}" if "piqa_acc" in r else "–"
        print(f"| {row} | {r['wikitext2_ppl']:.2f} | {piqa} | {r['num_params']:,} | {r['train_s']:.0f} s |")


def main():
    args = parser().parse_args()
    protocol = Protocol(args)
    for row in protocol.plan.rows:
        protocol.run_row(row)
    print_table(protocol.results, args)


if __name__ == "__main__":
    main()
