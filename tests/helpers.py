"""Helpers that several test modules share, or that the processes a test starts import (a test module imports no
other test module): a Python program on simulated CPU devices, the command line's tiny run arguments, and the
training setup and loop hooks of the interrupted-training tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tiny import SMALL_LLAMA, chunks, dense

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, devices: int = 8, env: dict | None = None, timeout: int = 240, wait=True):
    """Runs `code` in a fresh interpreter on `devices` simulated CPU devices; its stdout (or, wait=False, the
    process)."""
    full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                    PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def run_args(files, model, out, *extra):
    """`streamline_jax.run`'s arguments for a run of seconds on a tiny model of `files` (the tiny_files fixture)."""
    d = files["data"]
    return ["--model", str(files[model]), "--out", str(out), "--quiet",
            f"data.calibration={d / 'train.jsonl'}", f"data.valid={d / 'valid.jsonl'}", "data.seq_len=32",
            "data.calib_chunks=4", "data.train_chunks=16", "data.valid_chunks=2", "data.batch_size=4",
            "score.sparsity=null", "score.num_layers=2", "eval.tasks=[]", f"eval.perplexity_text={d / 'eval.txt'}",
            "eval.window=64", "samples.prompts=[the cat]", "samples.max_new_tokens=4", "train.lr=1e-3",
            "train.distill_steps=0", *extra]  # the distillation phase where a test asks for it


def small_model(seed=3):
    """A random SMALL_LLAMA model (std 0.02 weights)."""
    import jax

    from streamline_jax.models import transformer
    from streamline_jax.models.model import Model

    return Model(SMALL_LLAMA, transformer.init_params(SMALL_LLAMA, jax.random.PRNGKey(seed)))


def padded_calibration(num_batches=4, batch=4, seq=16, seed=0, vocab=SMALL_LLAMA.vocab_size):
    """Batches with left padding, right padding and one fully padded row: padding must count nowhere."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(num_batches):
        ids = rng.randint(2, vocab, (batch, seq)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, :5] = 0
        mask[1, -4:] = 0
        if i == 1:
            mask[2] = 0
        ids[mask == 0] = rng.randint(2, vocab, int((mask == 0).sum()))  # padding ids are arbitrary
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# --------------------------------------------------------------------------------------------------------------
# Interrupted training (tests/test_reliability.py and the processes it kills)

TRAIN_KW = dict(batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, checkpoint_every=3, grad_accum=2,
                progress=False, return_history=True)


def make_setup():
    """(dense model, its pruned copy, training chunks, validation chunks)."""
    from streamline_jax.pruning import prune

    model = dense(SMALL_LLAMA)
    pruned = prune(model, 1, 2, "layer")
    return model, pruned, chunks(32), chunks(4, seed=2)


def interrupt_at(k, signum):
    """A train.loop.LOOP_HOOK sending `signum` at the loop's k-th interrupt point (from 0)."""
    calls = []

    def hook(point):
        calls.append(point)
        if len(calls) == k + 1:
            os.kill(os.getpid(), signum)

    return hook


def signal_after_first_checkpoint(signum):
    """A train.loop.LOOP_HOOK sending `signum` once the first periodic checkpoint is written."""
    saved = []

    def hook(point):
        if point == "saved" and not saved:
            saved.append(point)
            os.kill(os.getpid(), signum)

    return hook
