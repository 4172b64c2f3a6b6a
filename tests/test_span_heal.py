"""score.metric=heal (streamline_jax/span_heal.py): the top cosine spans, each healed a few MSE steps, compared by
the pruned model's next-token loss on the validation chunks; its settings, its report and its resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from streamline_jax import pipeline, span_heal
from streamline_jax import run as run_mod
from streamline_jax.data import batches as make_batches
from streamline_jax.models.model import forward
from streamline_jax.pruning import prune
from streamline_jax.score import candidate_starts, choose_span, score_spans
from streamline_jax.train import TrainOptions
from helpers import run_args as _args
from tiny import SMALL_LLAMA, chunks, dense

LENGTH = 2


@pytest.fixture(scope="module")
def setup():
    model = dense(SMALL_LLAMA)
    calib = list(make_batches(chunks(8, seed=1), 4))
    valid = list(make_batches(chunks(4, seed=2), 4))
    return model, score_spans(model, calib), calib, valid


def _heal(setup, monkeypatch=None, losses=None, count=3, steps=2):
    model, scores, calib, valid = setup
    pruned_starts = []

    def prune_candidate(choice):
        pruned_starts.append(choice.start)
        return prune(model, choice.start, choice.length, "layer")

    if losses is not None:  # a stub of the validation loss: start -> loss
        monkeypatch.setattr(span_heal, "validation_loss", lambda m, b: (losses[m.config.pruned_spans[0][0]], 7))
    choice, heal = span_heal.choose_span_by_heal(model, scores, prune_candidate, calib, valid,
                                                 TrainOptions(lr=1e-3), count=count, steps=steps, length=LENGTH)
    return choice, heal, pruned_starts


def test_the_candidates_are_the_top_cosine_spans_and_the_lowest_loss_wins(setup, monkeypatch):
    model, scores, _, _ = setup
    _, starts = candidate_starts(model.config, LENGTH, None)
    by_cosine = sorted(starts, key=lambda s: -scores.cosine[s, LENGTH])[:3]
    assert by_cosine[0] == choose_span(scores, length=LENGTH).start
    losses = {s: 5.0 - i for i, s in enumerate(by_cosine)}  # the cosine's third is the lowest loss
    choice, heal, pruned_starts = _heal(setup, monkeypatch, losses)
    assert [h.start for h in heal.candidates] == by_cosine == pruned_starts
    assert choice.start == by_cosine[2] != choose_span(scores, length=LENGTH).start
    assert choice.score == 3.0 and heal.best().start == choice.start and heal.num_tokens == 7
    assert [h.cosine for h in heal.candidates] == [scores.cosine[s, LENGTH] for s in by_cosine]
    assert all(np.isfinite(h.heal_mse) and h.seconds > 0 for h in heal.candidates)


def test_the_heal_trains_the_block_and_the_loss_is_the_pruned_models_next_token_loss(setup):
    model, _, calib, valid = setup
    pruned = prune(model, 2, LENGTH, "layer")
    healed, mse = span_heal.heal(model, pruned, calib, TrainOptions(lr=1e-2), 3)
    block = lambda m: m.params["segments"]["seg_1"]  # noqa: E731
    assert np.isfinite(mse) and any(not np.array_equal(a, b) for a, b in
                                    zip(jax.tree.leaves(block(healed)), jax.tree.leaves(block(pruned))))
    loss, tokens = span_heal.validation_loss(healed, valid)
    logits = np.concatenate([np.asarray(forward(healed, b["input_ids"]), np.float64) for b in valid])
    ids = np.concatenate([b["input_ids"] for b in valid])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    reference = -np.mean(np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1))
    assert tokens == ids[:, 1:].size and abs(loss - reference) < 1e-4 * reference


def test_a_none_block_is_compared_without_training(setup):
    model, _, calib, _ = setup
    pruned = prune(model, 2, LENGTH, "none")
    assert span_heal.heal(model, pruned, calib, TrainOptions(), 3) == (pruned, None)


@pytest.mark.parametrize("override, message", [
    ("score.heal_candidates=0", "score.heal_candidates must be >= 1, got 0"),
    ("score.heal_steps=0", "score.heal_steps must be >= 1, got 0"),
    ("score.spans=2", "score.spans=2 places spans by their similarity scores; score.metric=heal"),
    ("data.valid=null", "score.metric=heal compares the healed candidates by their loss on the validation chunks"),
    ("data.valid_chunks=0", "set data.valid and data.valid_chunks >= 1"),
])
def test_heal_settings_are_checked(override, message):
    with pytest.raises(run_mod.ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run_mod.build_config(None, None, ["score.metric=heal", override])


@pytest.mark.pipeline
def test_a_run_by_heal_reports_its_candidates_and_a_resume_reads_them_back(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = _args(files, "llama", out, "score.metric=heal", "score.heal_candidates=2", "score.heal_steps=2",
                 "--stages", "train")
    heals = []
    real_heal = span_heal.choose_span_by_heal
    monkeypatch.setattr(span_heal, "choose_span_by_heal", lambda *a, **k: heals.append(1) or real_heal(*a, **k))
    real_train = pipeline.train_stage
    monkeypatch.setattr(pipeline, "train_stage", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here")))
    assert run_mod.main(args) == 2 and heals == [1]
    recorded = json.loads((out / pipeline.SPAN_HEAL).read_text())
    monkeypatch.setattr(pipeline, "train_stage", real_train)
    assert run_mod.main(args) == 0 and heals == [1]  # the resume read the heal back
    report = json.loads((out / "report.json").read_text())
    heal = report["span_heal"]
    assert heal == recorded and len(heal["candidates"]) == 2 and heal["steps"] == 2
    best = min(heal["candidates"], key=lambda h: h["loss"])
    assert report["span"]["start"] == heal["chosen"] == best["start"] and report["span"]["metric"] == "heal"
    assert report["span"]["score"] == best["loss"] and heal["cosine_choice"] == heal["candidates"][0]["start"]
    assert all(h["seconds"] > 0 and np.isfinite(h["cosine"]) for h in heal["candidates"])
    assert "| loss after the heal |" in (out / "report.md").read_text()
