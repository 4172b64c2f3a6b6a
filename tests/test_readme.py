"""Every command README.md and docs/*.md show, and every command in the docstrings of the scripts and modules they
run, runs as written; and the README's Python example runs on a tiny model.

Commands come from the indented code blocks, the ```bash / ```sh blocks and the inline code that starts with a
command (`python ...`, `VAR=... python ...`, a console script such as `streamline-jax ...`), and from the indented
`python ...` lines of the docstrings. Each must have an entry in COMMANDS saying how it runs here: as written, tiny
(arguments appended that shrink it onto a tiny random model), parsed (pod-sized work, long benchmarks: the program
runs up to its argparse parser, which parses the documented arguments, and stops there, so a renamed flag fails, and
the run's settings it names (--model, --config, key=value, --sweep, --stages, --target) must resolve; a synopsis's
`[--flag ...]` has each flag checked against the parser) or with --help. A command without an entry
fails, and so does an entry whose command is documented nowhere any more. Console scripts run through the entry
point pyproject.toml declares for them.

Each runs in a fresh folder that holds links to the checkout's scripts/, streamline_jax/ and .venv (the
test's venv), so relative paths resolve as they do in the checkout and whatever it writes (runs/..., /tmp/...
rewritten into the folder) stays out of the repository. `python` and `.venv/bin/python` are the test's interpreter;
`bash scripts/setup.sh ... &&` is not run again (this venv is what it made). The shared data is a tiny folder laid
out like ../shared/data ($STREAMLINE_JAX_DATA), and the runs share one compilation cache, so that only the first
compiles.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PYTHONS = ("python", "python3", ".venv/bin/python")
CONSOLE_SCRIPTS = ("streamline-jax", "streamline-jax-data", "streamline-jax-convert", "streamline-jax-export",
                   "streamline-jax-lm-eval", "streamline-jax-plan")
PROGRAMS = PYTHONS + ("bash",) + CONSOLE_SCRIPTS
# what a fresh folder links to, so that the commands' relative paths resolve as in the checkout
LINKED = ("scripts", "streamline_jax")  # `configs/...` in a command: the shipped copy (config_files.config_path)


# --------------------------------------------------------------------------------------------------------------
# What each documented command does here


@dataclasses.dataclass(frozen=True)
class Run:
    how: str  # "as written", "tiny" (`extra` appended), "parse" (its argparse parser, nothing else) or "help"
    why: str = ""  # why not as written
    extra: tuple[str, ...] = ()
    subs: tuple[tuple[str, str], ...] = ()  # (written, replacement); {llama}: a tiny model, {shared}: tiny data
    first: str | None = None  # a documented command whose finished folder this one starts from
    then: Callable[[Path], None] | None = None  # what happens to that folder before this command
    makes: tuple[str, ...] = ()  # paths the command must leave in its folder
    setup: bool = False  # `bash scripts/setup.sh ... && rest`: only the rest runs (setup.sh's flags are checked)
    pip: bool = False  # `pip install .[extras]`: not run (this venv is the install); the extras must be declared
    needs_libtpu: bool = False


PARSE_BENCH = Run("parse", "a benchmark: minutes on the real model")
# `python -m streamline_jax.run` on the tiny model and the tiny shared data, every stage in seconds (float32: the
# large presets' bfloat16 is slow on CPU)
TINY_RUN = ("--quiet", "model.source={llama}", "model.architecture=null", "model.dtype=float32", "data.seq_len=32",
            "data.calib_chunks=4", "data.train_chunks=16", "data.valid_chunks=2", "data.batch_size=4",
            "eval.limit=4", "eval.ppl_windows=1", "samples.max_new_tokens=4",
            "train.distill_steps=2")  # a distillation phase, as the default's, but short
# the default run evaluates and samples; the others need not again
TINY_QUICK = TINY_RUN + ("eval.tasks=[]", "samples.prompts=[]")
DEFAULT_RUN = "python -m streamline_jax.run"
SELF_DATA_RUN = ("python -m streamline_jax.run --out runs/47s-a --quiet --stages score,prune,train,evaluate,save "
                 "model.dtype=bfloat16 data.seq_len=256 data.batch_size=4 data.train_chunks=96 train.epochs=2 "
                 "train.distill_steps=16 eval.limit=200 eval.ppl_windows=16 eval.batch_size=4 export.hf=false "
                 "export.gguf=false")
SCORE_RUN = "python -m streamline_jax.run --stages score"


def _interrupt(folder: Path):
    """A finished run's folder as a run that stopped before it finished (the same settings continue it)."""
    (folder / "runs" / "smollm2-135m" / "DONE").unlink()


COMMANDS: dict[str, Run] = {
    # README: two commands for a fresh machine
    "bash scripts/setup.sh && .venv/bin/python -m streamline_jax.run": Run(
        "tiny", "the default run takes minutes", TINY_RUN, setup=True, makes=("runs/smollm2-135m/DONE",)),
    "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q": Run(
        "help", "this test suite is that command", setup=True),
    '.venv/bin/python -m pytest -m "not slow and not pipeline"': Run(
        "help", "this test suite is that command, less the tests marked slow or pipeline"),
    # README: command line
    DEFAULT_RUN: Run("tiny", "the default run takes minutes", TINY_RUN,
                     makes=("runs/smollm2-135m/DONE", "runs/smollm2-135m/report.md", "runs/smollm2-135m/hf")),
    "python -m streamline_jax.run --model llama2-13b --out runs/l13 prune.replacement=ffn train.lr=1e-4": Run(
        "tiny", "13B parameters", TINY_QUICK, makes=("runs/l13/DONE", "runs/l13/hf")),
    SCORE_RUN: Run("tiny", "the default run's scoring takes a minute", TINY_QUICK,
                   makes=("runs/smollm2-135m/report.json",)),
    "python -m streamline_jax.run --resume": Run(
        "tiny", "the default run takes minutes", TINY_QUICK, first=SCORE_RUN, then=_interrupt,
        makes=("runs/smollm2-135m/DONE", "runs/smollm2-135m/model")),
    "python -m streamline_jax.run --config paper": Run(
        "tiny", "the paper's sizes take hours", TINY_QUICK, makes=("runs/smollm2-135m/DONE",)),
    "python -m streamline_jax.run --config paper eval.limit=1000": Run(
        "parse", "the paper's recipe above, on the real model with 1000 PIQA items: minutes"),
    "python -m streamline_jax.run --help": Run("as written"),
    # README: install (this venv is what they made)
    "pip install .": Run("as written", "this venv is the install", pip=True),
    'pip install ".[gpu]"': Run("as written", "a CUDA jax is no test's; issue 44's test resolves it", pip=True),
    'pip install ".[tpu]"': Run("as written", "libtpu is no test's; issue 44's test resolves it", pip=True),
    'pip install ".[lm-eval]"': Run("as written", "the test setup installs it", pip=True),
    "bash scripts/setup.sh": Run("as written", "this venv is what it made", setup=True),
    "bash scripts/setup.sh --test": Run("as written", "this venv is what it made", setup=True),
    "bash scripts/setup.sh --gpu": Run("as written", "a CUDA jax is no test's", setup=True),
    "bash scripts/setup.sh --tpu": Run("as written", "libtpu in the venv is no test's", setup=True),
    # README: data and your own model
    "python -m streamline_jax.data download DIR": Run("parse", "the hub is not reachable from the tests"),
    "streamline-jax-data download DIR": Run("parse", "the hub is not reachable from the tests"),
    "STREAMLINE_JAX_DATA=DIR python -m streamline_jax.run": Run(
        "parse", "the default run takes minutes; every tiny run here reads its data through $STREAMLINE_JAX_DATA"),
    "streamline-jax --model Qwen/Qwen2.5-0.5B-Instruct --config quick": Run(
        "tiny", "the hub is not reachable from the tests; the tiny model in its place", TINY_QUICK,
        subs=(("Qwen/Qwen2.5-0.5B-Instruct", "{llama}"),), makes=("runs/llama_2k/DONE",)),
    "streamline-jax-export runs/smollm2-135m /tmp/pruned-hf": Run(
        "as written", first=DEFAULT_RUN, makes=("tmp/pruned-hf/config.json",)),
    "streamline-jax-convert path/to/hf-folder-or.gguf /tmp/m-orbax && streamline-jax-convert /tmp/m-orbax "
    "/tmp/m-hf": Run("as written", subs=(("path/to/hf-folder-or.gguf", "{llama}"),), makes=("tmp/m-hf/config.json",)),
    "python -m streamline_jax.run --sweep score.sparsity=0.1,0.2,0.3,0.4": Run(
        "tiny", "four trained points take many minutes", TINY_RUN + ("samples.prompts=[]",),
        makes=("runs/smollm2-135m-sweep/report.md", "runs/smollm2-135m-sweep/plots/sweep.png",
               "runs/smollm2-135m-sweep/points/score.sparsity=0.4/DONE")),
    "python -m streamline_jax.run --out runs/p1-default --stages score,prune,train,evaluate data.calib_chunks=50 "
    "data.train_chunks=1000 data.valid_chunks=100 score.num_layers=8 score.sparsity=null train.epochs=1 "
    "eval.ppl_windows=128 eval.limit=1000": Run("parse", "P1's sizes on the real model: 40 minutes"),
    "python -m streamline_jax.run --out runs/heal --stages score,prune,train,evaluate model.dtype=bfloat16 "
    "data.seq_len=512 data.batch_size=4 data.calib_chunks=32 data.valid_chunks=32 data.train_chunks=96 "
    "train.epochs=2 train.distill_steps=8 eval.limit=200 eval.ppl_windows=16 eval.batch_size=4 score.metric=heal": Run(
        "parse", "the real model: 23 minutes on a shared CPU; tests/test_span_heal.py heals on the tiny model"),
    # docs/results.md: the closed-form start of the `layer` block (issue 47, item 3)
    "python -m streamline_jax.run --out runs/47c-zero --stages score,prune,evaluate --sweep prune.init=default,linear "
    "data.calib_chunks=32 data.batch_size=2 eval.batch_size=4 eval.limit=200 eval.ppl_windows=16": Run(
        "parse", "two points on the real model: 16 minutes; tests/test_run.py fits a layer block on the tiny one"),
    "python -m streamline_jax.run --out runs/47c-zero-uniform --stages score,prune,evaluate prune.init=linear "
    "prune.fit_weighting=uniform data.calib_chunks=32 data.batch_size=2 eval.batch_size=4 eval.limit=200 "
    "eval.ppl_windows=16": Run("parse", "the real model: 18 minutes"),
    "python -m streamline_jax.run --out runs/47c-trained --stages score,prune,train,evaluate --sweep "
    "prune.init=default,linear prune.fit_weighting=uniform data.calib_chunks=32 data.batch_size=4 eval.batch_size=4 "
    "data.train_chunks=96 train.epochs=2 train.distill_steps=8 eval.limit=200 eval.ppl_windows=16": Run(
        "parse", "two trained points on the real model: an hour"),
    # docs/results.md: the `balanced` fit (Session 34)
    "python -m streamline_jax.run --out runs/s34/zero-copy --quiet --stages score,prune,evaluate data.calib_chunks=32 "
    "data.batch_size=2 eval.batch_size=4 eval.limit=200 eval.ppl_windows=16": Run("parse", "the real model: 2 minutes"),
    # docs/results.md: the teacher's top-k cache at P1's sizes (Session 34)
    "python -m streamline_jax.run --out runs/s34/p1-topk --stages score,prune,train,evaluate data.calib_chunks=50 "
    "data.train_chunks=1000 data.valid_chunks=100 score.num_layers=8 score.sparsity=null train.epochs=1 "
    "eval.ppl_windows=128 eval.limit=1000 train.distill_steps=96 'train.distill_trainable=[block,\"segments/.*\"]' "
    "train.kd_hidden_weight=1.0 'train.kd_hidden_layers=[22,26]' train.kd_top_k=64": Run(
        "parse", "P1's sizes on the real model: 51 minutes"),
    # docs/results.md: the model's answers beside the corpus, and at P1's sizes (Session 35)
    "python -m streamline_jax.run --out runs/s35/base": Run("parse", "the default run on the real model: 10 minutes"),
    "python scripts/bench_default.py --keep runs/s35/r1_mix data.distill_text=self data.self_chunks=16 "
    "data.self_mix=0.5 data.train_chunks=192 train.epochs=10": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s35/r2_self16_topk data.distill_text=self data.self_chunks=16 "
    "train.kd_top_k=64": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s35/r3_mix data.distill_text=self data.self_chunks=16 "
    "data.self_mix=0.5": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s36/r4_mix data.distill_text=self data.self_chunks=16 "
    "data.self_mix=0.5": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s36/r5_ck data.distill_text=self data.self_chunks=16 "
    "data.self_mix=0.5 train.checkpoint_every=16": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s36/r6_mixck data.distill_text=self data.self_chunks=16 "
    "data.self_mix=0.5": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s36/r7_default": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s36/r8_topk train.kd_top_k=64": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s36/r9_top256 train.kd_top_k=256": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s37/r1_default": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s37/r2_top256 train.kd_top_k=256": PARSE_BENCH,
    "python -m streamline_jax.run --out runs/s35/p1-self --stages score,prune,train,evaluate data.calib_chunks=50 "
    "data.train_chunks=1000 data.valid_chunks=100 score.num_layers=8 score.sparsity=null train.epochs=1 "
    "eval.ppl_windows=128 eval.limit=1000 train.distill_steps=96 'train.distill_trainable=[block,\"segments/.*\"]' "
    "train.kd_hidden_weight=1.0 'train.kd_hidden_layers=[22,26]' train.kd_top_k=64 data.distill_text=self "
    "data.self_chunks=128": Run("parse", "P1's sizes on the real model: 70 minutes"),
    "python -m streamline_jax.run --sweep score.sparsity=0.2,0.3 --sweep prune.replacement=none,layer": Run(
        "parse", "tests/test_sweep.py sweeps two settings at once on the tiny model"),
    "python -m streamline_jax.run --sweep score.spans=1,2 score.num_layers=8 score.sparsity=null": Run(
        "parse", "tests/test_sweep.py runs two spans with their own blocks, and sweeps on the tiny model"),
    # README: pod scale
    "streamline-jax-plan --model llama2-13b --topology v5e:4x4 --stage lm train.distill_trainable=[block]":
        Run("parse", "compiles the 13B LM step for minutes; tests/test_plan.py plans with overrides on small presets"),
    "LIBTPU_PATH=.venv/libtpu-site python scripts/plan_memory.py --model llama2-13b --topology v5e:4x4": Run(
        "tiny", "all three stages compile for 4 minutes; the scoring step at 128 tokens for 30 s",
        ("--stage", "scoring", "--seq-len", "128"), needs_libtpu=True),
    # README: benchmarks
    ".venv/bin/python scripts/bench_forward.py": PARSE_BENCH,
    "python scripts/bench_forward.py --dtypes float32 --float32-dots both": PARSE_BENCH,
    ".venv/bin/python scripts/profile_forward.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_score.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_eval.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_generate.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_train.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_backward.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_attention.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_vocab_memory.py": PARSE_BENCH,
    "python scripts/bench_vocab_memory.py --steps 3": PARSE_BENCH,
    "python scripts/bench_vocab_memory.py [--vocabs 49152,151936] [--steps 3] [--kd-chunk-logits N]": PARSE_BENCH,
    "python scripts/bench_vocab_memory.py --vocabs 151936 --dtype bfloat16 --compute-dtype float32 --head whole":
        PARSE_BENCH,
    "python scripts/bench_vocab_memory.py --vocabs 151936 --losses kd_cached,eval --dtype bfloat16 --compute-dtype "
    "float32 --steps 3 --head whole": PARSE_BENCH,
    ".venv/bin/python scripts/bench_load.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_default.py": PARSE_BENCH,  # the README's next benchmarks
    ".venv/bin/python scripts/bench_pipeline.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_lm_eval.py": PARSE_BENCH,
    ".venv/bin/python scripts/bench_sweep.py": PARSE_BENCH,
    "python scripts/bench_sweep.py": PARSE_BENCH,
    "python scripts/bench_sweep.py --sweep prune.replacement=none,layer,ffn,mlp": PARSE_BENCH,
    "python scripts/bench_sweep.py -- train.epochs=8 data.train_chunks=192": PARSE_BENCH,
    "python scripts/bench_lm_eval.py [--model smollm2-135m] [--tasks piqa_local] [--limit 100] [--batch-size 32] "
    "[--order ours,hf,ours]": PARSE_BENCH,
    # README: lm-evaluation-harness (the first is also lm_eval.py's docstring)
    "python -m streamline_jax.lm_eval --model streamline-jax --model_args pretrained=smollm2-135m --tasks piqa_local "
    "--limit 50": Run("tiny", "the real model on 50 items takes a minute", ("--limit", "4"),
                      subs=(("pretrained=smollm2-135m", "pretrained={llama}"),)),
    "python -m streamline_jax.lm_eval --model streamline-jax --model_args pretrained=runs/smollm2-135m --tasks "
    "piqa_local,wikitext_local --limit 20 --output_path runs/lm-eval --log_samples": Run(
        "as written", first=DEFAULT_RUN, makes=("runs/lm-eval",)),
    # docstrings: the options' synopsis is no command line
    "python scripts/bench_eval.py [--windows 16] [--window 1024] [--items 50] [--batch-size 8] [--mc-batch-size 32] "
    "[--passes first,compiled,later]": PARSE_BENCH,
    "python scripts/bench_forward.py": PARSE_BENCH,
    "python scripts/bench_forward.py --shapes 4x512 --rounds 3": PARSE_BENCH,
    "python scripts/bench_generate.py [--new-tokens 128] [--batches 1 8] [--torch-threads N] [--sample] [--ours-only]":
        PARSE_BENCH,
    "python scripts/bench_generate.py --sample --ours-only --batches 16 64 --new-tokens 256": PARSE_BENCH,
    "python scripts/bench_generate.py --ours-only --sample --batches 16 --new-tokens 256": PARSE_BENCH,
    "python scripts/bench_generate.py --sample --batches 16 64 --new-tokens 256": PARSE_BENCH,
    "python scripts/bench_load.py [--layers 4] [--devices 8] [--mesh 1,8,1] [--keep DIR]": PARSE_BENCH,
    "python scripts/bench_score.py [--batches 2] [--batch-size 4] [--seq-len 512] [--repeats 2] "
    "[--compute-dtype auto]": PARSE_BENCH,
    "python scripts/bench_train.py --counts none --speed-steps 12 --mode mse": PARSE_BENCH,
    "python scripts/bench_train.py [--mode mse|lm|kd] [--seq 64] [--counts 1000,4000|none] [--speed-steps 16] "
    "[--log-every 4]": PARSE_BENCH,
    "python scripts/bench_backward.py [--batch 8] [--seq 512] [--reps 2] [--top-k 64] "
    "[--losses kd,kd_cached,kd_cached_topk,kd_autodiff,lm,mse_cached]": PARSE_BENCH,
    "python -m streamline_jax.run --out runs/47k-a --stages score,prune,train,evaluate data.train_chunks=96 "
    "train.epochs=2 train.distill_steps=8 eval.limit=200 eval.ppl_windows=16 model.dtype=bfloat16 "
    "data.batch_size=4 eval.batch_size=8 samples.prompts=[]": Run("parse", "two real-model runs: 25 minutes"),
    "python scripts/bench_backward.py --batch 2 --weights bfloat16 --kd-chunk-tokens 256 "
    "--losses kd_cached,kd_cached_topk": PARSE_BENCH,
    "python scripts/bench_backward.py --losses kd_cached --trainable block,after_block": PARSE_BENCH,
    "python scripts/bench_attention.py [--batch 8] [--seq 512] [--dtype bfloat16] [--reps 3]": PARSE_BENCH,
    "python scripts/profile_forward.py [--batch 8] [--seq 512] [--causal-block 128] [--trace [--torch]]": PARSE_BENCH,
    "python scripts/bench_default.py": PARSE_BENCH,  # bench_default's and bench_pipeline's, once the README names them
    "python scripts/bench_default.py --config paper": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/bench_default": PARSE_BENCH,
    "python scripts/bench_default.py 'train.distill_trainable=[block,\"segments/.*\"]'": PARSE_BENCH,
    "python scripts/bench_default.py model.compute_dtype=float32": PARSE_BENCH,
    "python scripts/bench_default.py train.distill_lr_beyond_block=1e-3": PARSE_BENCH,
    "python scripts/bench_default.py train.distill_lr_beyond_block=5e-4": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s34/e1_balfit prune.init=linear prune.fit_weighting=balanced "
    "prune.ridge=0.03 data.calib_chunks=64": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s34/e2_self data.distill_text=self": PARSE_BENCH,
    "python scripts/bench_default.py --keep runs/s34/e3_self16 data.distill_text=self data.self_chunks=16": PARSE_BENCH,
    "python scripts/bench_pipeline.py": PARSE_BENCH,
    "python scripts/bench_pipeline.py --calib-chunks 8 --train-chunks 16 --valid-chunks 8": PARSE_BENCH,
    "python scripts/bench_pipeline.py --calib-chunks 50 --train-chunks 1000 --valid-chunks 100 --rounds 2": PARSE_BENCH,
    "python scripts/eval_full.py [--model smollm2-135m] [--batch-size 32] [--json results.json]": Run(
        "parse", "full PIQA and WikiText-2 on the real model"),
    "python scripts/score_smollm2.py [--length 8] [--chunks 50] [--seq-len 512] [--batch-size 8] [--table]": Run(
        "parse", "the real model on the real corpus"),
    "python scripts/p1_protocol.py [--out runs/p1] [--rows ROW,...] [--ridge 1e-4] "
    "[--fit-weighting token|uniform|balanced] [--shuffle [--seed 0]] [--piqa-items 0] "
    "[--lr 2e-4 --min-lr 5e-5 --lr-schedule cosine --warmup N] [--grad-accum 1] [--authors-bidirectional] [--freeze self_attn,input_layernorm] [--tag name] "
    "[--compute-dtype float32|bfloat16|auto] [--trainable block,segments/seg_2/.*mlp.*] "
    "[--kd-temperature 1 --kd-ce-weight 0 --kd-hidden-layers -1 --kd-hidden-weight 0] "
    "[--distill-steps 0 --distill-lr 1e-3 --distill-freeze REGEX,... --distill-trainable REGEX,... "
    "--distill-tag SUFFIX]": Run(
        "parse", "hours on the real model"),
    "python scripts/span_pair_stats.py runs/p1/pairs_11_8/valid": Run("parse", "reads a pair cache p1_protocol makes"),
    # docs/results.md: the model's own data (issue 47 item 2), the corpus and the self-data runs
    SELF_DATA_RUN: Run("parse", "20 minutes on the real model"),
    SELF_DATA_RUN.replace("runs/47s-a", "runs/47s-b") + " data.distill_text=self": Run(
        "parse", "20 minutes on the real model, a third of them generating"),
    "streamline-jax-convert smollm2-135m /tmp/smollm2-orbax": Run(
        "parse", "20 s to write the 135M model; the README's convert command runs the same code on a tiny one"),
    "streamline-jax-convert path/to/hf-folder /tmp/m-orbax --dtype bfloat16": Run(
        "as written", subs=(("path/to/hf-folder", "{llama}"),), makes=("tmp/m-orbax",)),
    "streamline-jax-convert /tmp/m-orbax /tmp/m-hf": Run(
        "as written", first="streamline-jax-convert path/to/hf-folder /tmp/m-orbax --dtype bfloat16",
        makes=("tmp/m-hf/config.json",)),
    "streamline-jax-export runs/smollm2-135m /tmp/smollm2-pruned-hf": Run(
        "as written", first=DEFAULT_RUN, makes=("tmp/smollm2-pruned-hf/config.json",)),
    "streamline-jax-plan --model llama2-13b --topology v5e:4x4": Run(
        "parse", "4 minutes of compiling; the README's form of it is planned tiny"),
    "streamline-jax-plan --model llama2-70b --topology v5p-32 --stage lm --batch 16": Run(
        "parse", "minutes of compiling; the README's plan command is planned tiny"),
    "streamline-jax --model llama3-8b --target v5e-8": Run("parse", "an 8B model on a TPU VM"),
    "streamline-jax-plan --model llama3-8b --topology v5e-8": Run("parse", "minutes of compiling for a TPU"),
    "streamline-jax-plan --model llama2-13b --topology v5e-16": Run(
        "parse", "10 minutes of compiling; tests/test_step_estimates.py plans smollm2-135m for gpu:8 and checks the "
        "printed step times and run estimate"),
    "python scripts/bench_device.py": Run("parse", "1B and 7B models: for a GPU or TPU machine"),
    "streamline-jax-convert run/model m.gguf --to gguf --tokenizer src.gguf": Run(
        "parse", "tests/test_export_gguf.py converts to GGUF and loads the file in llama.cpp"),
    "streamline-jax-convert runs/smollm2-135m/model /tmp/pruned-q8.gguf --to gguf --gguf-type q8_0 --tokenizer "
    "SOURCE.gguf": Run("parse", "tests/test_export_gguf.py converts to GGUF and loads the file in llama.cpp"),
    "python scripts/bench_device.py --models llama2-7b --batch 8 --seq 2048 --no-torch": Run(
        "parse", "a 7B model: for a GPU or TPU machine"),
    "python scripts/bench_device.py --models tiny --batch 2 --seq 64": Run(
        "parse", "tests/test_bench_device.py runs it at tiny shapes with its figures checked"),
    "python scripts/rehearse_scale.py --preset llama2-7b --devices 8": Run(
        "parse", "a 7B model in 17 GB of memory for many minutes; tests/test_rehearse_scale.py runs it tiny"),
    "python scripts/rehearse_scale.py --preset llama2-7b --devices 8 --batch 1 --set 'train.distill_trainable=[block]'":
        Run("parse", "llama2-7b end to end: 17 GB of memory, 7 minutes; tests/test_rehearse_scale.py runs it tiny"),
    "python scripts/rehearse_scale.py --preset llama2-7b --devices 8 --batch 1 --set 'train.distill_trainable=[block]' "
    "--set model.compute_dtype=float32": Run(
        "parse", "llama2-7b with float32 products: 16 GB of memory, 7 minutes; tests/test_rehearse_scale.py runs it "
        "tiny"),
    "python scripts/rehearse_scale.py --config-json runs/mem/l7b4.json --devices 8 --batch 1 --set "
    "'train.distill_trainable=[block]'": Run(
        "parse", "4 llama2-7b layers: 6 GB of memory, 2 minutes; tests/test_rehearse_scale.py runs it tiny"),
    "python scripts/rehearse_scale.py --preset qwen2.5-7b --devices 4 --restore-devices 2 --set "
    "'train.distill_trainable=[block]'": Run(
        "parse", "qwen2.5-7b end to end: 20 GB of memory, 8 minutes; tests/test_rehearse_scale.py runs it tiny"),
    "python scripts/rehearse_scale.py --preset qwen2.5-7b --devices 4 --restore-devices 2 --set "
    "'train.distill_trainable=[block]' --set model.compute_dtype=float32": Run(
        "parse", "qwen2.5-7b with float32 products: 18 GB of memory, 15 minutes; tests/test_rehearse_scale.py runs "
        "it tiny"),
    "python scripts/rehearse_scale.py --preset qwen2.5-7b --devices 8": Run(
        "parse", "a 7B model in 19 GB of memory for many minutes; tests/test_rehearse_scale.py runs it tiny"),
}


# --------------------------------------------------------------------------------------------------------------
# The documented commands


def _without_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def _starts_a_command(text: str) -> bool:
    words = text.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return bool(words) and words[0] in PROGRAMS


def readme_blocks(text: str) -> tuple[list[str], list[str], str]:
    """(shell commands of the indented and ```bash/```sh blocks, ```python blocks, the prose outside blocks)."""
    commands, python, prose = [], [], []
    fence, body, previous, in_code = None, [], "", False
    for line in text.splitlines():
        if fence is not None:
            if line.strip().startswith("```"):
                if fence in ("bash", "sh", "shell"):
                    joined = "\n".join(body).replace("\\\n", " ")
                    commands += [_without_comment(x) for x in joined.splitlines() if _without_comment(x)]
                elif fence == "python":
                    python.append("\n".join(body) + "\n")
                fence, body = None, []
            else:
                body.append(line)
        elif line.strip().startswith("```"):
            fence = line.strip()[3:].strip()
        elif line.startswith("    ") and line.strip() and (in_code or not previous.strip()):
            in_code = True  # an indented block starts after a blank line and lasts while its lines stay indented
            if _without_comment(line):  # a line of only a comment continues the comment above it
                commands.append(_without_comment(line))
        else:
            in_code = in_code and not line.strip()
            prose.append(line)
        previous = line
    return commands, python, "\n".join(prose)


def documented_commands() -> dict[str, list[str]]:
    """Every documented command → where it is documented."""
    found: dict[str, list[str]] = {}
    texts = {path: path.read_text() for path in [README, *DOCS]}
    for path, text in texts.items():
        commands, _, prose = readme_blocks(text)
        inline = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
        # inline, a console script's bare name (`streamline-jax`) is a name, not a command
        inline = [c for c in inline if _starts_a_command(c) and (c.split()[0] not in CONSOLE_SCRIPTS or " " in c)]
        for c in commands + inline:
            found.setdefault(c, []).append(str(path.relative_to(ROOT)))
    # the docstrings of the scripts and modules they run
    text = "\n".join(texts.values())
    scripts = set(re.findall(r"\bscripts/\w+\.py\b", text))
    modules = {m.replace(".", "/") + ".py" for m in re.findall(r"python -m (streamline_jax[\w.]*)", text)}
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    modules |= {entry_points[name].split(":")[0].replace(".", "/") + ".py" for name in CONSOLE_SCRIPTS
                if name in entry_points and re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
    for path in sorted(ROOT / p for p in scripts | modules if (ROOT / p).exists()):  # a missing one fails to run
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            indent = len(line) - len(line.lstrip())
            if indent < 4 or not _starts_a_command(line):
                continue
            command = line.strip()
            for more in lines[i + 1:]:  # continuation lines are indented deeper
                if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                    break
                command += " " + more.strip()
            found.setdefault(_without_comment(command), []).append(str(path.relative_to(ROOT)))
    return found


DOCUMENTED = documented_commands()


# --------------------------------------------------------------------------------------------------------------
# Running them


def _has_libtpu() -> bool:
    """libtpu where `scripts/setup.sh --test` puts it, or installed (checked apart from plan.py's own search)."""
    return (Path(sys.prefix) / "libtpu-site" / "libtpu").is_dir() or importlib.util.find_spec("libtpu") is not None


# `python -c PROGRAM_UNTIL_PARSED MODE KIND TARGET ARGS...`: runs a program (KIND: `path` a script, `module` as
# `python -m`, `entry` a console script's `module:function`) with ARGS. MODE `run` runs it; `parse` stops it at its
# first argparse call (parse_args, parse_intermixed_args or their `known` forms), after its own parser has parsed ARGS
# (a renamed flag exits 2 with argparse's message) and the values the run's settings give meaning to resolve as the
# run resolves them (`check_values`); `flags` checks that each of ARGS (a synopsis's flags) is one of that parser's
# options instead. A program that never parses its arguments with argparse fails.
PROGRAM_UNTIL_PARSED = r"""
import argparse, importlib, os, runpy, sys
mode, kind, target, *args = sys.argv[1:]
depth = 0

# --model, --config and key=value settings (`overrides`; bench_sweep's `settings`) as the run builds them, --sweep's
# keys, --stages, and --target/--topology among configs/meshes.yaml's layouts; exits 2 naming a bad one
def check_values(parser, parsed):
    from streamline_jax.settings import ConfigError
    get = lambda name: getattr(parsed, name, None)
    try:
        if get("overrides") is not None or get("settings") is not None or get("sweep"):
            from streamline_jax.settings import build_config
            build_config(get("model"), get("config"), [*(get("overrides") or ()), *(get("settings") or ())])
        if get("sweep"):
            from streamline_jax.sweep import parse_axes
            parse_axes([get("sweep")] if isinstance(get("sweep"), str) else get("sweep"))
        if isinstance(get("stages"), str):
            from streamline_jax.run import parse_stages
            parse_stages(get("stages"))
        for flag in ("target", "topology"):
            if get(flag) is not None and f"--{flag}" in parser._option_string_actions:  # not convert's `target`
                import yaml
                from streamline_jax.config_files import CONFIG_DIR
                targets = yaml.safe_load((CONFIG_DIR / "meshes.yaml").read_text())["targets"]
                known = [*targets, *(t["topology"] for t in targets.values() if "topology" in t)]
                if get(flag) not in known:
                    raise ConfigError(f"--{flag} {get(flag)}: not a layout of configs/meshes.yaml ({known})")
    except ConfigError as e:
        print(f"error: a documented value: {e}", file=sys.stderr)
        sys.exit(2)

def stop_after(original):
    def parse(self, args=None, namespace=None):
        global depth
        if depth:  # nested: parse_args's own parse_known_args, or a subparser
            return original(self, args, namespace)
        depth += 1
        words = sys.argv[1:] if args is None else list(args)
        if mode == "flags":
            unknown = [w for w in words if w.split("=")[0] not in self._option_string_actions]
            if unknown:
                self.error("unrecognized arguments: " + " ".join(unknown))
        else:
            parsed = original(self, args, namespace)
            check_values(self, parsed[0] if isinstance(parsed, tuple) else parsed)
        print("parsed by", self.prog, words)
        sys.exit(0)
    return parse

if mode != "run":
    for name in ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args"):
        setattr(argparse.ArgumentParser, name, stop_after(getattr(argparse.ArgumentParser, name)))
sys.argv = [target, *args]
if kind == "path":
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
elif kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    module, _, function = target.partition(":")
    sys.exit(getattr(importlib.import_module(module), function)())
if mode != "run":
    sys.exit(f"{target} never parsed its arguments with argparse")
"""


def console_script(name: str) -> str:
    """The `module:function` pyproject.toml declares for a console script."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert name in scripts, f"pyproject.toml declares no console script {name!r} ([project.scripts])"
    return scripts[name]


def program_words(words: list[str], how: str) -> list[str]:
    """The arguments that run a documented program (python, or a console script) here, as its entry says."""
    if words[0] in PYTHONS and how not in ("parse", "flags"):
        return [sys.executable, *words[1:]]
    if words[0] in PYTHONS:
        kind, target, args = ("module", words[2], words[3:]) if words[1] == "-m" else ("path", words[1], words[2:])
    else:
        kind, target, args = "entry", console_script(words[0]), words[1:]
    if how == "flags":
        args = [w.strip("[]") for w in args if re.match(r"-{1,2}[A-Za-z]", w.strip("[]"))]  # not values: -1
    return [sys.executable, "-c", PROGRAM_UNTIL_PARSED, how if how in ("parse", "flags") else "run", kind, target,
            *args]


@dataclasses.dataclass
class Result:
    folder: Path
    log: str = ""
    error: str | None = None


class Runner:
    """Runs documented commands, each in a fresh folder. The same work (the same programs with the same arguments,
    from the same starting folder) runs once per session: the README's benchmark and its docstring's synopsis are
    one `--help`, and a command other commands start from runs once."""

    def __init__(self, root: Path, files: dict):
        self.root, self.files = root, files
        self.done: dict[str, Result] = {}
        self.env = {k: v for k, v in os.environ.items() if k != "LIBTPU_PATH"} | {
            "STREAMLINE_JAX_DATA": str(files["shared"]),
            # one compilation cache for every run, every compile kept: only the first run compiles
            "STREAMLINE_JAX_COMPILATION_CACHE": str(root / "xla-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def steps(self, command: str, how: Run) -> list[tuple[dict, list[str]]]:
        """(environment, arguments) of each program the command runs here; FOLDER stands for its folder."""
        text = command.replace("/tmp/", "FOLDER/tmp/")
        names = {"llama": self.files["llama_2k"], "shared": self.files["shared"]}
        for written, replacement in how.subs:
            assert written in text, f"{written!r} is not in {command!r}: update its entry in COMMANDS"
            text = text.replace(written, replacement.format(**names))
        # a synopsis (`[--flag VALUE]`) is no command line: only its flags are checked
        synopsis = how.how == "parse" and any(w.startswith("[") for w in shlex.split(text))
        steps = []
        for step in text.split("&&"):
            words = shlex.split(step)
            if words[:2] == ["bash", "scripts/setup.sh"]:
                assert how.setup, f"{command!r} runs the setup: its entry must say setup=True"
                setup = (ROOT / "scripts" / "setup.sh").read_text()
                # a flag setup.sh tests ("--test" = ...) or matches in its `case` (--gpu) ...)
                unknown = [flag for flag in words[2:] if f'"{flag}"' not in setup and f"{flag})" not in setup]
                assert not unknown, f"scripts/setup.sh does not know {unknown}"
                continue
            if words[:2] == ["pip", "install"]:
                assert how.pip, f"{command!r} installs the package: its entry must say pip=True"
                declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                extras = [x for w in words[2:] for x in re.findall(r"^\.\[(.*)\]$", w) for x in x.split(",")]
                unknown = [x for x in extras if x not in declared]
                assert not unknown, f"pyproject.toml declares no extra {unknown} ([project.optional-dependencies])"
                continue
            env = {}
            while "=" in words[0]:
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            if how.how == "help":
                words = words[:3 if words[1:2] == ["-m"] else 2] + ["--help"]
            elif how.how == "tiny":
                words += [x.format(**names) for x in how.extra]
            if words[0] in PROGRAMS and words[0] != "bash":
                words = program_words(words, "flags" if synopsis else how.how)
            steps.append((env, words))
        return steps

    def run(self, command: str) -> Result:
        how = COMMANDS[command]
        steps = self.steps(command, how)
        key = repr((steps, how.first, how.then))
        if key not in self.done:
            self.done[key] = self.execute(command, how, steps)
        result = self.done[key]
        missing = [p for p in how.makes if not (result.folder / p).exists()]
        if missing and result.error is None:
            return Result(result.folder, result.log, f"it did not make {missing}")
        return result

    def execute(self, command: str, how: Run, steps) -> Result:
        before = self.run(how.first) if how.first else None
        folder = self.root / f"{len(self.done)}-{re.sub(r'[^A-Za-z0-9.]+', '-', command)[:60]}"
        if before:
            if before.error:
                return Result(folder, before.log, f"{how.first!r}, which it starts from, failed: {before.error}")
            shutil.copytree(before.folder, folder, symlinks=True)
        else:
            folder.mkdir()
            for link in LINKED:
                (folder / link).symlink_to(ROOT / link)
            (folder / ".venv").symlink_to(sys.prefix)
            (folder / "tmp").mkdir()
        if how.then:
            how.then(folder)
        log = []
        for env, words in steps:
            words = [w.replace("FOLDER", str(folder)) for w in words]
            out = subprocess.run(words, cwd=folder, env=self.env | env, capture_output=True, text=True, timeout=600)
            log.append(f"$ {shlex.join(words)}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            if out.returncode != 0:
                return Result(folder, "\n".join(log), f"exit status {out.returncode}")
            if how.how == "help" and "usage" not in out.stdout.lower():
                return Result(folder, "\n".join(log), "--help printed no usage")
            if how.how == "parse" and "parsed by" not in out.stdout:
                return Result(folder, "\n".join(log), "its argparse parser did not parse the arguments")
        return Result(folder, "\n".join(log))


@pytest.fixture(scope="session")
def runner(tmp_path_factory, tiny_files):
    return Runner(tmp_path_factory.mktemp("readme"), tiny_files)


def _runs_the_pipeline(command: str) -> bool:
    """The command runs the pipeline, made tiny, or starts from the folder of one that did."""
    how = COMMANDS.get(command)
    return bool(how) and (how.how == "tiny" or (how.first is not None and _runs_the_pipeline(how.first)))


def _marks(command: str) -> list:
    return [pytest.mark.pipeline] if _runs_the_pipeline(command) else []


@pytest.mark.parametrize("command", [pytest.param(c, marks=_marks(c)) for c in sorted(DOCUMENTED)],
                         ids=lambda c: c if len(c) <= 90 else c[:87] + "...")
def test_documented_command_runs(command, runner):
    where = ", ".join(DOCUMENTED[command])
    if command not in COMMANDS:
        pytest.fail(f"{where} shows {command!r}, which has no entry in COMMANDS (tests/test_readme.py): add one "
                    f"saying how this test runs it (as written, tiny, parse or --help)")
    how = COMMANDS[command]
    if how.needs_libtpu and not _has_libtpu():
        pytest.skip("libtpu is not installed: `bash scripts/setup.sh --test` puts it in .venv/libtpu-site")
    result = runner.run(command)
    assert result.error is None, f"{command!r} ({where}, {how.how}) failed: {result.error}\n{result.log}"


def test_readme_is_a_short_guide_with_the_ci_commands():
    """At most 250 lines, and `.ci/run`'s section with its two indented commands."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md is a user's guide of at most 250 lines: measurements go to docs/"
    section = text.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("    ") and line.strip()] == [
        "    bash scripts/setup.sh && .venv/bin/python -m streamline_jax.run",
        "    bash scripts/setup.sh --test && .venv/bin/python -m pytest -q"]


def test_the_quick_loop_deselects_by_registered_markers():
    """The README's quick loop names markers pyproject.toml registers: an unknown name would deselect nothing."""
    (command,) = [c for c in DOCUMENTED if c.startswith(".venv/bin/python -m pytest -m ")]
    expression = shlex.split(command)[4]
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    registered = {m.split(":")[0] for m in markers}
    assert set(re.findall(r"\w+", expression)) - {"not", "and", "or"} <= registered, (expression, registered)


def test_every_entry_is_a_documented_command():
    stale = sorted(set(COMMANDS) - set(DOCUMENTED))
    assert not stale, f"COMMANDS has entries for commands documented nowhere; remove or update them: {stale}"


def test_commands_are_found_in_every_kind_of_block():
    text = "\n".join(["Run:", "", "    python a.py   # comment", "                  # more comment", "    bash b.sh",
                      "", "  - a list item", "    continued, not code", "    nor this", "", "```bash",
                      "python c.py \\", "  --x 1",
                      "```", "```python", "import d", "```", "```", "python e.py", "```",
                      "and `X=1 python f.py` inline, `not a command`."])
    commands, python, prose = readme_blocks(text)
    assert commands == ["python a.py", "bash b.sh", "python c.py    --x 1"] and python == ["import d\n"]
    assert "`X=1 python f.py`" in prose and "python e.py" not in prose
    assert _starts_a_command("X=1 python f.py") and not _starts_a_command("not a command")


def test_parse_mode_stops_at_the_parser_and_fails_on_an_unknown_flag(tmp_path):
    """A documented command that is only parsed runs nothing past its parser, and a flag the parser lacks (in a
    command, or in a synopsis's brackets) fails it; a program without an argparse parser fails too."""
    script = tmp_path / "prog.py"
    script.write_text("import argparse, pathlib\n"
                      "p = argparse.ArgumentParser()\np.add_argument('--steps', type=int)\n"
                      "p.add_argument('rest', nargs='*')\n"
                      "args = p.parse_args()\npathlib.Path('ran').write_text('ran')\n")
    (tmp_path / "noparser.py").write_text("print('hello')\n")

    def run(words, how):
        out = subprocess.run(program_words(words, how), cwd=tmp_path, capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr

    assert run(["python", "prog.py", "--steps", "3", "a=b"], "parse")[0] == 0
    assert run(["python", "prog.py", "[--steps", "N]"], "flags")[0] == 0
    assert not (tmp_path / "ran").exists()
    code, log = run(["python", "prog.py", "--step-count", "3"], "parse")
    assert code == 2 and "unrecognized arguments: --step-count" in log
    code, log = run(["python", "prog.py", "[--steps", "-1]", "[--epochs", "N]"], "flags")
    assert code == 2 and "unrecognized arguments: --epochs" in log
    code, log = run(["python", "prog.py", "--steps", "x"], "parse")
    assert code == 2 and "invalid int value" in log
    code, log = run(["python", "noparser.py"], "parse")
    assert code != 0 and "never parsed its arguments" in log
    assert run(["python", "prog.py", "--steps", "3"], "run")[0] == 0 and (tmp_path / "ran").exists()


def test_parse_mode_checks_the_settings_a_command_names(tmp_path):
    """A program parsing as the run does (intermixed: flags among key=value overrides) fails on a renamed flag, and
    the values the run's settings resolve fail where the run would fail: an unknown override key, --model preset,
    --config recipe, stage or mesh layout."""
    (tmp_path / "run.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\n"
        "for flag in ('--model', '--config', '--stages', '--target'):\n    p.add_argument(flag)\n"
        "p.add_argument('overrides', nargs='*')\nargs = p.parse_intermixed_args()\nopen('ran', 'w')\n")

    def run(*words):
        out = subprocess.run(program_words(["python", "run.py", *words], "parse"), cwd=tmp_path, capture_output=True,
                             text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
        return out.returncode, out.stderr

    assert run("--model", "llama2-13b", "train.lr=1e-4", "--config", "paper", "--stages", "score",
               "--target", "v5e-8") == (0, "")
    assert not (tmp_path / "ran").exists()
    for words, message in [(("--modle", "llama2-13b", "train.lr=1e-4"), "unrecognized arguments: --modle"),
                           (("trian.lr=1e-4",), "unknown key 'trian'"),
                           (("--model", "llama2-31b"), "unknown model preset 'llama2-31b'"),
                           (("--config", "papr"), "--config papr"), (("--stages", "scor"), "unknown stage 'scor'"),
                           (("--target", "v5e-9"), "--target v5e-9: not a layout")]:
        code, log = run(*words)
        assert code == 2 and message in log, (words, log)


# --------------------------------------------------------------------------------------------------------------
# The Python API example


# the literals that must change for a tiny model: (as written, replacement); {llama}: the tiny model's folder
PYTHON_SUBS = (('sj.load("smollm2-135m")', "sj.load({llama!r})"),)


def _free_names(code: str) -> set[str]:
    """Names the code reads but neither assigns nor imports, builtins aside."""
    tree = ast.parse(code)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - bound - set(dir(builtins))


@pytest.mark.pipeline
def test_docs_python_blocks_run_in_a_tiny_default_runs_folder(runner, monkeypatch):
    """docs/'s ```python blocks (transformers reading a run's hf/) run as written where the README's first command,
    made tiny, has written runs/smollm2-135m."""
    result = runner.run(DEFAULT_RUN)
    assert result.error is None, result.log
    blocks = [(path, code) for path in DOCS for code in readme_blocks(path.read_text())[1]]
    assert blocks, "docs/ has no ```python block"
    monkeypatch.chdir(result.folder)
    for path, code in blocks:
        exec(compile(code, str(path), "exec"), {"__name__": "__docs__"})


@pytest.mark.pipeline
def test_python_example_runs_on_a_tiny_model(tiny_files, tmp_path, monkeypatch):
    """The README's ```python block as written on a tiny random Llama: only the model name changes, the data it
    names are tiny files in the working folder, and the names it leaves to the reader are bound to tiny arrays."""
    from transformers import AutoTokenizer

    from streamline_jax import data
    from tiny import sentences, write_jsonl

    (code,) = readme_blocks(README.read_text())[1]
    for written, replacement in PYTHON_SUBS:
        assert code.count(written) == 1, f"the README's Python example no longer has {written!r}: update PYTHON_SUBS"
        code = code.replace(written, replacement.format(llama=str(tiny_files["llama_2k"])))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAMLINE_JAX_DATA", str(tiny_files["shared"]))
    write_jsonl(tmp_path / "corpus.jsonl", sentences(3000, 9))  # the example's 50 chunks of 512 tokens
    chunks = list(data.token_chunks(sentences(1200, 10), AutoTokenizer.from_pretrained(tiny_files["llama_2k"]), 512))
    ids = np.asarray([chunks[0][:16], chunks[1][:16]])
    given = {"input_ids": ids, "attention_mask": np.ones_like(ids), "train_chunks": chunks[:16],
             "valid_chunks": chunks[16:24]}
    assert _free_names(code) == set(given), "bind every name the README's Python example leaves to the reader"
    namespace = dict(given)
    exec(compile(code, "README.md (python example)", "exec"), namespace)
    L = namespace["model"].config.depth
    assert namespace["logits"].shape == (2, 16, 128) and namespace["hidden"].shape == (L + 1, 2, 16, 64)
    assert namespace["pruned"].config.depth < L
    assert "piqa" in namespace["report"].to_markdown()
    assert (tmp_path / "out" / "model").is_dir() and (tmp_path / "out" / "hf" / "config.json").is_file()
