"""The dense span offloaded to disk while training reads cached pairs (streamline_jax/train/offload.py), and the run's
choice of when (train.offload_span)."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from streamline_jax.pruning import prune, split_stack
from streamline_jax.train import offload, train_replacement
from tiny import SMALL_LLAMA as LLAMA, chunks, dense

KW = dict(batch_size=4, lr=3e-3, warmup_steps=1, valid_batches=chunks(4, seed=2), eval_every=2, progress=False,
          return_history=True)


def split_pair():
    """(dense model cut at the span [2, 4), pruned model sharing its other layers' arrays)."""
    model = split_stack(dense(LLAMA), [2, 4])
    return model, prune(model, 2, 2, "layer")


def values(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize("mode", ["mse", "kd"])
def test_offloaded_span_trains_as_in_memory_and_comes_back(tmp_path, mode):
    model, pruned = split_pair()
    span_before = values(model.params["segments"]["seg_1"])
    seen = []

    def deleted_while_stepping(step, loss):
        seen.append(all(a.is_deleted() for a in jax.tree.leaves(model.params["segments"]["seg_1"])))

    kwargs = dict(KW, mode=mode, num_steps=4)
    kept, kept_history = train_replacement(model, pruned, chunks(16), pair_cache=tmp_path / "a", **kwargs)
    moved, history = train_replacement(model, pruned, chunks(16), pair_cache=tmp_path / "b",
                                       on_step=deleted_while_stepping, offload_span=tmp_path / "span", **kwargs)
    assert seen == [True] * 4  # the span's arrays were gone while the steps ran
    assert history["offloaded"]["segments"] == ["seg_1"] and "offloaded" not in kept_history
    assert history["offloaded"]["bytes"] == sum(a.nbytes for a in span_before)
    for a, b in zip(values(kept.params), values(moved.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose([v for _, v in history["valid"]], [v for _, v in kept_history["valid"]], rtol=0)
    for a, b in zip(span_before, values(model.params["segments"]["seg_1"])):  # read back in place
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "span").exists()


def test_the_span_comes_back_when_training_fails(tmp_path):
    model, pruned = split_pair()

    def stop(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_replacement(model, pruned, chunks(16), pair_cache=tmp_path / "p", on_step=stop,
                          offload_span=tmp_path / "span", **dict(KW, num_steps=2, log_every=1))
    assert not any(a.is_deleted() for a in jax.tree.leaves(model.params))
    assert not (tmp_path / "span").exists()


def test_nothing_is_offloaded_that_a_step_reads_or_the_pruned_model_holds(tmp_path):
    # unsplit, the dense stack is one segment: the pruned model's layers are copies, and the teacher reads it
    model = dense(LLAMA)
    _, history = train_replacement(model, prune(model, 2, 2, "layer"), chunks(8), pair_cache=tmp_path / "p",
                                   offload_span=tmp_path / "span", **dict(KW, num_steps=1, mode="kd",
                                                                          valid_batches=None))
    assert "offloaded" not in history
    model, pruned = split_pair()
    assert offload.own_segments_before(model, pruned, 4) == ["seg_1"]
    assert offload.own_segments_before(model, pruned, 3) == []  # the span ends later
    # without a pair cache the steps run the span: nothing is offloaded
    _, history = train_replacement(model, pruned, chunks(8), offload_span=tmp_path / "span",
                                   **dict(KW, num_steps=1, valid_batches=None))
    assert "offloaded" not in history


def test_too_little_disk_keeps_the_span_in_memory_with_a_warning(tmp_path, monkeypatch, caplog):
    model, pruned = split_pair()
    monkeypatch.setattr(offload, "DISK_MARGIN", 1e15)  # as if the disk had a millionth of the span's bytes free
    with caplog.at_level(logging.WARNING):
        _, history = train_replacement(model, pruned, chunks(16), pair_cache=tmp_path / "p",
                                       offload_span=tmp_path / "span", **dict(KW, num_steps=2))
    assert "offloaded" not in history and "offloading it needs" in caplog.text
    assert not (tmp_path / "span").exists()


@pytest.mark.parametrize("setting, pair_cache, fills, expected", [
    ("auto", True, True, True), ("auto", True, False, False), ("disk", True, False, True),
    ("none", True, True, False), ("disk", False, True, False)])
def test_the_run_offloads_where_the_setting_and_the_host_say(monkeypatch, setting, pair_cache, fills, expected):
    from streamline_jax import pipeline
    from streamline_jax.settings import build_config

    monkeypatch.setattr(pipeline, "weights_fill_host", lambda weight_bytes, platform: fills)
    c, _ = build_config(None, None, [f"train.offload_span={setting}", f"train.pair_cache={str(pair_cache).lower()}"])
    assert pipeline.offloads_span(c, dense(LLAMA)) is expected
