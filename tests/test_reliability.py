"""Runs that never lose work: Ctrl-C and SIGKILL at any point of training resume bitwise; --overwrite replaces a
finished run only once the new one has finished; one run per folder; every setting checked before any work; every
error names its file and field. One test (or more) per row of the README's reliability table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from streamline_jax import train
from streamline_jax.pruning import prune
from streamline_jax.train import train_replacement
from test_train import LLAMA, chunks, dense

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------------------------
# Training: interrupted anywhere, resumed bitwise

TRAIN_KW = dict(batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, checkpoint_every=3, grad_accum=2,
                progress=False, return_history=True)


def make_setup():
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    return model, pruned, chunks(32), chunks(4, seed=2)


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def _train(setup, folder, **kw):
    model, pruned, data, valid = setup
    return train_replacement(model, pruned, data, valid_batches=valid, checkpoint_dir=folder, **TRAIN_KW, **kw)


def _same_result(a, b):
    (model_a, hist_a), (model_b, hist_b) = a, b
    for x, y in zip(jax.tree.leaves(model_a.params), jax.tree.leaves(model_b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    norm = lambda h: json.loads(json.dumps({k: v for k, v in h.items() if k != "wall_s"}))  # noqa: E731
    assert norm(hist_a) == norm(hist_b)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The loop's interrupt points, in order, in an uninterrupted run; and that run's result."""
    seen = []
    train.LOOP_HOOK = seen.append
    try:
        result = _train(setup, tmp_path_factory.mktemp("straight"))
    finally:
        train.LOOP_HOOK = None
    return seen, result


def _latest_checkpoint(folder: Path) -> int | None:
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=None)


def _interrupt_at(k, signum):
    calls = []

    def hook(point):
        calls.append(point)
        if len(calls) == k + 1:
            os.kill(os.getpid(), signum)

    return hook


def test_ctrl_c_at_any_point_of_training_checkpoints_that_step_and_resumes_bitwise(setup, straight, tmp_path):
    points, straight = straight
    num_steps = points.count("logged")
    assert num_steps == 4 and {"batch", "stepped", "validated", "saved"} <= set(points)
    # one of each kind of point, at different steps (every one of the 25 passes too; each costs a run and a resume):
    # mid-accumulation, between a step and its bookkeeping, after validation, after a checkpoint, after the last step
    picks = [points.index("stepped"), [i for i, p in enumerate(points) if p == "logged"][1],
             points.index("validated"), points.index("saved"), len(points) - 1]
    for k in picks:
        folder = tmp_path / f"int{k}"
        train.LOOP_HOOK = _interrupt_at(k, signal.SIGINT)
        try:
            with pytest.raises(KeyboardInterrupt):
                _train(setup, folder)
        finally:
            train.LOOP_HOOK = None
        # the step under way is finished and checkpointed: no work is lost, none is done twice
        step = min(points[:k].count("logged") + (points[k] not in ("validated", "saved")), num_steps)
        assert _latest_checkpoint(folder) == step, (k, points[k])
        _same_result(_train(setup, folder, resume=True), straight)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import orbax.checkpoint as ocp
from streamline_jax import train
import test_reliability as t

point = {point!r}
if point == "mid-save":  # killed while Orbax writes the checkpoint
    def save(manager, step, state, history):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   history=ocp.args.JsonSave(history)))
        os.kill(os.getpid(), signal.SIGKILL)
    train._save = save
else:
    train.LOOP_HOOK = t._interrupt_at(point, signal.SIGKILL)
model, pruned, data, valid = t.make_setup()
train.train_replacement(model, pruned, data, valid_batches=valid, checkpoint_dir={folder!r}, **t.TRAIN_KW)
"""


def test_sigkill_at_any_point_of_training_resumes_bitwise(setup, straight, tmp_path):
    points, straight = straight
    after_checkpoint = points.index("saved") + 3  # in the step after the first checkpoint
    for point in ("mid-save", after_checkpoint):
        folder = tmp_path / f"kill{point}"
        script = KILLED_RUN.format(tests=str(TESTS), point=point, folder=str(folder))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        _same_result(_train(setup, folder, resume=True), straight)
