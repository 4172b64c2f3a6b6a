"""Training the replacement block: MSE and LM modes lower the loss, causal attention, resume, bad input."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamline_jax.models import transformer
from streamline_jax.models.config import ModelConfig, from_hf_config
from streamline_jax.pruning import prune
from streamline_jax.train import TrainingError, train_replacement, trainable_blocks
from streamline_jax.train.span_cache import SpanPairCache
from tiny import SMALL, SMALL_LLAMA as LLAMA, SMALL_OPT as OPT, chunks, dense

QWEN = {"qwen2": ModelConfig(family="llama", model_type="qwen2", num_kv_heads=2, qkv_bias=True, **SMALL),
        "qwen3": ModelConfig(family="llama", model_type="qwen3", num_kv_heads=2, qk_norm=True, **SMALL)}
GEMMA_HF = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4)
GEMMA = {"gemma2": from_hf_config(dict(GEMMA_HF, model_type="gemma2", attn_logit_softcapping=5.0,
                                       final_logit_softcapping=30.0)),
         "gemma3": from_hf_config(dict(GEMMA_HF, model_type="gemma3_text", sliding_window_pattern=3,
                                       rope_local_base_freq=100.0))}


def patterned_chunks(n, seq=16, seed=0):
    """Learnable text: each chunk counts up from a random start, modulo 11."""
    rng = np.random.default_rng(seed)
    return [((rng.integers(0, 11) + np.arange(seq)) % 11 + 3).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("family,replacement", [(f, r) for f in ("llama", "opt") for r in ("layer", "ffn", "mlp")]
                         + [("qwen2", "layer"), ("qwen3", "ffn"), ("qwen3", "layer"), ("gemma2", "layer"),
                            ("gemma3", "ffn"), ("gemma3", "mlp"), ("gemma3", "layer")])
def test_mse_training_lowers_validation_mse(family, replacement):
    model = dense({"llama": LLAMA, "opt": OPT, **QWEN, **GEMMA}[family])
    pruned = prune(model, 2, 3, replacement, mlp_width=32 if replacement == "mlp" else None)
    trained, history = train_replacement(model, pruned, chunks(64), batch_size=4, valid_batches=chunks(8, seed=1),
                                         mode="mse", lr=1e-2, min_lr=1e-3, warmup_steps=1, progress=False,
                                         return_history=True)
    first, last = history["valid"][0][1], history["best_valid"]
    # ffn and mlp blocks cannot absorb the span's attention on random tokens: gains are modest but real
    assert last < 0.98 * first, history["valid"]
    block = trainable_blocks(pruned.config)[0]
    changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), trained.params["segments"][block.key],
                           pruned.params["segments"][block.key])
    assert max(jax.tree.leaves(changed)) > 0
    # everything else stays frozen
    for key in trained.params["segments"]:
        if key != block.key:
            assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), trained.params["segments"][key],
                                             pruned.params["segments"][key]))


def test_lm_training_lowers_validation_loss():
    model = dense(LLAMA)
    pruned = prune(model, 1, 3, "layer")
    _, history = train_replacement(model, pruned, patterned_chunks(64), batch_size=8, mode="lm",
                                   valid_batches=patterned_chunks(8, seed=3), lr=1e-2, min_lr=1e-3,
                                   warmup_steps=1, progress=False, return_history=True)
    assert history["best_valid"] < 0.9 * history["valid"][0][1], history["valid"]


def test_opt_layer_block_starts_as_a_copy_of_the_pruned_layer():
    model = dense(OPT)
    pruned = prune(model, 2, 3, "layer")
    block = trainable_blocks(pruned.config)[0]
    assert (block.start, block.length) == (2, 3)
    original = jax.tree.map(lambda a: a[2], model.params["segments"]["seg_0"])
    copied = pruned.params["segments"][block.key]
    assert jax.tree.structure(original) == jax.tree.structure(copied)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), original, copied))


def test_trained_layer_block_is_causal():
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    trained = train_replacement(model, pruned, chunks(16), batch_size=4, lr=1e-2, warmup_steps=1, progress=False)
    ids = np.asarray(chunks(2)).reshape(2, 16)
    changed = ids.copy()
    changed[:, 10:] = (changed[:, 10:] + 7) % 64
    out = lambda x: np.asarray(transformer.apply(trained.config, trained.params, x, collect_hidden=True)["hidden"])
    a, b = out(ids), out(changed)
    # every hidden state, the block's output included, at positions before the change is unchanged
    np.testing.assert_array_equal(a[:, :, :10], b[:, :, :10])
    assert np.abs(a[:, :, 10:] - b[:, :, 10:]).max() > 0


@pytest.mark.parametrize("freeze", [(), ("self_attn",)])
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, freeze):
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    data = chunks(24)
    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, valid_batches=chunks(4, seed=2), eval_every=2,
                  checkpoint_every=2, progress=False, grad_accum=1, freeze=freeze)
    straight = train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "a", **kwargs)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", on_step=interrupt, **kwargs)
    with pytest.raises(TrainingError, match="resume=True"):
        train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", **kwargs)
    resumed = train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_validation_no_copy_of_the_block_is_held_or_written_and_resume_still_matches(tmp_path):
    """Without validation the best parameters are the trained ones: a copy of the float32 block beside them held one
    more block through the first step (0.75 GiB at 7B). Live float32 bytes before the first step: the trained block
    and Adam's two moments. An interrupted run still resumes to the uninterrupted one's parameters."""
    from streamline_jax.train import loop

    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    block = sum(a.size * 4 for a in jax.tree.leaves(pruned.params["segments"][trainable_blocks(pruned.config)[0].key]))
    seen = []

    def live_float32():
        return sum(a.nbytes for a in jax.live_arrays() if a.dtype == jnp.float32)

    def before_the_first_step(point):
        if point == "batch" and not seen:
            seen.append(live_float32() - models)

    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, progress=False)
    models = live_float32()  # the dense and pruned models' own
    loop.LOOP_HOOK = before_the_first_step
    try:
        straight = train_replacement(model, pruned, chunks(16), checkpoint_dir=tmp_path / "a", **kwargs)
    finally:
        loop.LOOP_HOOK = None
    assert 3 * block <= seen[0] < 4 * block, (seen, block)
    # nor does the checkpoint write the block twice (as `best` beside `trained`)
    written = [p.read_text() for p in (tmp_path / "a").glob("*/state/_METADATA")]
    assert written and all('"trained"' in m and '"best"' not in m for m in written)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_replacement(model, pruned, chunks(16), checkpoint_dir=tmp_path / "b", on_step=interrupt, **kwargs)
    resumed = train_replacement(model, pruned, chunks(16), checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_parameters_stay_as_initialised_and_the_rest_trains():
    model = dense(LLAMA)
    pruned = prune(model, 2, 3, "layer")
    trained, history = train_replacement(model, pruned, chunks(64), batch_size=4, valid_batches=chunks(8, seed=1),
                                         lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.1, progress=False,
                                         freeze=("self_attn", "input_layernorm"), return_history=True)
    assert history["best_valid"] < 0.98 * history["valid"][0][1], history["valid"]
    key = trainable_blocks(pruned.config)[0].key
    before, after = pruned.params["segments"][key], trained.params["segments"][key]
    # weight decay included: a frozen parameter does not move at all
    for part in ("self_attn", "input_layernorm"):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), before[part], after[part])), part
    for part in ("mlp", "post_attention_layernorm"):
        assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), before[part],
                                                after[part]))) > 0, part


def test_freeze_patterns_are_checked_up_front():
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    with pytest.raises(ValueError, match="freeze pattern 'mixer' matches none of the block's parameters"):
        train_replacement(model, pruned, chunks(8), batch_size=4, freeze=("mixer",))
    with pytest.raises(ValueError, match="freezes every parameter of the block"):
        train_replacement(model, pruned, chunks(8), batch_size=4, freeze=(".",))
    with pytest.raises(ValueError, match="not a regular expression"):
        train_replacement(model, pruned, chunks(8), batch_size=4, freeze=("self_attn(",))


def test_freeze_attention_names_the_attention_half_of_any_block():
    from streamline_jax.train import freeze_labels

    def frozen(model, replacement):
        width = {"mlp_width": 16} if replacement == "mlp" else {}
        block = prune(model, 1, 2, replacement, **width).params["segments"]["seg_1"]
        labels = freeze_labels(block, ("attention",))
        if labels is None:
            return None
        paths = jax.tree_util.tree_leaves_with_path(labels)
        return sorted(jax.tree_util.keystr(k[:1], simple=True) for k, v in paths if v == "frozen")

    assert set(frozen(dense(LLAMA), "layer")) == {"self_attn", "input_layernorm"}
    assert set(frozen(dense(OPT), "layer")) == {"self_attn", "self_attn_layer_norm"}
    assert frozen(dense(LLAMA), "ffn") is None and frozen(dense(LLAMA), "mlp") is None  # nothing to freeze there


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "mlp", mlp_width=16)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+ .*last good checkpoint is step \d+"):
        train_replacement(model, pruned, chunks(64), batch_size=4, lr=1e25, clip_norm=1e30, warmup_steps=1,
                          checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)


def test_checkpoints_come_every_checkpoint_minutes_as_well_as_by_steps(tmp_path, monkeypatch):
    from streamline_jax.train import loop

    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "mlp", mlp_width=16)
    saved = []
    monkeypatch.setattr(loop, "LOOP_HOOK", lambda point: saved.append(point) if point == "saved" else None)
    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=100, progress=False)
    train_replacement(model, pruned, chunks(16), checkpoint_dir=tmp_path / "a", **kwargs)
    assert len(saved) == 1  # four steps: the last only
    train_replacement(model, pruned, chunks(16), checkpoint_dir=tmp_path / "b", checkpoint_minutes=1e-9, **kwargs)
    assert len(saved) == 1 + 4  # every step is that long after the last checkpoint
    with pytest.raises(ValueError, match=r"checkpoint_minutes must be > 0"):
        train_replacement(model, pruned, chunks(16), checkpoint_minutes=0, **kwargs)


def test_losses_read_every_k_steps_still_give_every_step_to_the_history_and_on_step():
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "mlp", mlp_width=16)
    kwargs = dict(batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=1, progress=False, return_history=True)
    runs = {}
    for log_every in (1, 3):
        seen = []
        _, history = train_replacement(model, pruned, chunks(40), log_every=log_every,
                                       on_step=lambda step, loss: seen.append((step, loss)), **kwargs)
        runs[log_every] = history, seen
    (sync, sync_seen), (lazy, lazy_seen) = runs[1], runs[3]
    assert [s for s, _, _ in lazy["train"]] == [1, 2, 3, 4, 5]  # 10 batches, 2 per step; read at 3 and 5
    assert lazy["train"] == sync["train"] and lazy_seen == sync_seen == [(s, loss) for s, loss, _ in sync["train"]]
    assert all(isinstance(loss, float) and isinstance(lr, float) for _, loss, lr in lazy["train"])
    with pytest.raises(ValueError, match="log_every"):
        train_replacement(model, pruned, chunks(40), log_every=0, **kwargs)


def test_a_nan_loss_read_late_names_the_step_it_came_at(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "mlp", mlp_width=16)
    kwargs = dict(batch_size=4, lr=1e25, clip_norm=1e30, warmup_steps=1, progress=False)
    errors, seen = {}, {}
    for log_every in (1, 50):
        seen[log_every] = []
        with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+ \(batch \d+\); no checkpoint") as e:
            train_replacement(model, pruned, chunks(64), log_every=log_every,
                              on_step=lambda step, loss: seen[log_every].append(step), **kwargs)
        errors[log_every] = str(e.value)
    assert errors[50] == errors[1]
    assert seen[50] == seen[1]  # every step before the bad one, and none after it
    # the checkpoints (every 2 steps) read the losses first: none holds a step past the bad one
    with pytest.raises(TrainingError, match=r"at step (\d+) .*last good checkpoint is step (\d+)") as e:
        train_replacement(model, pruned, chunks(64), log_every=50, checkpoint_dir=tmp_path, checkpoint_every=2,
                          **kwargs)
    bad, good = map(int, re.search(r"at step (\d+) .*checkpoint is step (\d+)", str(e.value)).groups())
    assert good < bad and max(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == good


def test_bad_input_is_refused_up_front():
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    with pytest.raises(ValueError, match="learning rates must be positive"):
        train_replacement(model, pruned, chunks(8), batch_size=4, lr=0.0)
    with pytest.raises(ValueError, match=r"batch size 8 is larger than the training data \(5 chunks\)"):
        train_replacement(model, pruned, chunks(5), batch_size=8)
    with pytest.raises(ValueError, match="no replacement block"):
        train_replacement(model, prune(model, 1, 2, "none"), chunks(8), batch_size=4)
    with pytest.raises(ValueError, match="unknown training mode"):
        train_replacement(model, pruned, chunks(8), batch_size=4, mode="kl")
    with pytest.raises(ValueError, match="unknown mse_weighting 'dims'"):
        train_replacement(model, pruned, chunks(8), batch_size=4, mse_weighting="dims")
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        train_replacement(model, pruned, chunks(8), batch_size=4, lr_schedule="linear")


def test_lr_schedules():
    from streamline_jax.train import lr_schedule

    lr, low = 2e-4, 5e-5
    half = lr_schedule("cosine", lr, low, 6, 100)
    assert float(half(0)) == 0 and float(half(3)) == pytest.approx(lr / 2)
    assert float(half(6)) == pytest.approx(lr) and float(half(100)) == pytest.approx(low)
    cycle = lr_schedule("cosine-cycle", lr, low, 1, 100)  # the authors' schedule: down at half-way, up again
    assert float(cycle(0)) == 0 and float(cycle(1)) == pytest.approx(lr)
    assert float(cycle(50)) == pytest.approx(low, rel=1e-3) and float(cycle(99)) == pytest.approx(lr, rel=1e-2)
    assert float(cycle(25)) == pytest.approx((lr + low) / 2, rel=2e-2)


def test_weighted_mse_is_a_relative_error_over_real_tokens():
    from streamline_jax.train import masked_mse

    target = np.array([[[300.0, 0.0], [1.0, 1.0], [2.0, 0.0]]])  # one huge token, as at a massive activation
    out = np.array([[[270.0, 0.0], [1.0, 0.0], [9.0, 9.0]]])
    mask = np.array([[1, 1, 0]])
    plain = ((30 ** 2) / 2 + 1 / 2) / 2
    relative = ((30 ** 2 / 2) / (300 ** 2 / 2) + (1 / 2) / 1.0) / 2
    np.testing.assert_allclose(masked_mse(out, target, mask), plain, rtol=1e-6)
    np.testing.assert_allclose(masked_mse(out, target, mask, "token"), relative, rtol=1e-5)
    pooled = (30 ** 2 / 2 + 1 / 2) / (300 ** 2 / 2 + 1.0)  # summed error over summed target square
    np.testing.assert_allclose(masked_mse(out, target, mask, "balanced"), (pooled + relative) / 2, rtol=1e-5)


def test_token_weighted_mse_training_lowers_validation_loss():
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    _, history = train_replacement(model, pruned, chunks(64), batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                                   valid_batches=chunks(8, seed=1), progress=False, mse_weighting="token",
                                   return_history=True)
    assert history["best_valid"] < 0.98 * history["valid"][0][1], history["valid"]


def test_tensorstore_pair_cache_trains_like_on_the_fly_mse(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, epochs=2, valid_batches=chunks(4, seed=2), eval_every=3,
                  progress=False)
    data = chunks(16)
    live = train_replacement(model, pruned, data, **kwargs)
    cached, history = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", return_history=True,
                                        **kwargs)
    assert (tmp_path / "pairs" / "complete.json").exists()
    for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    assert len(history["train"]) == 8  # two epochs of four batches, read from disk

    # a resume of finished training neither reads nor rebuilds the pairs (a run's pair cache is gone once it ends)
    done = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs2", checkpoint_dir=tmp_path / "ck",
                             **kwargs)
    again = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs3", checkpoint_dir=tmp_path / "ck",
                              resume=True, **kwargs)
    assert not (tmp_path / "pairs3").exists()
    for a, b in zip(jax.tree.leaves(done.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pair_cache_computes_each_distinct_row_once_and_copies_rows_another_cache_holds(tmp_path, monkeypatch):
    """Rows repeated within the batches, or held by a finished cache of the span (the MSE phase's, for the
    distillation), are copied, not computed; every row's pairs equal a cache built without reuse."""
    from streamline_jax.data import batches
    from streamline_jax.train import span_cache

    model = dense(LLAMA)
    first, other = SpanPairCache(tmp_path / "first", 2, 2), SpanPairCache(tmp_path / "other", 2, 2)
    corpus, own = chunks(8), chunks(4, seed=3)
    first.build(model, list(batches(corpus, 4)), progress=False)
    computed = []
    span_pairs = span_cache.span_pairs_fn
    monkeypatch.setattr(span_cache, "span_pairs_fn", lambda *a: lambda params, ids, mask: (
        computed.append(len(ids)), span_pairs(*a)(params, ids, mask))[1])
    mixed = [own[:2] + corpus[4:6], own[2:] + corpus[:2], own[:2] + corpus[6:], own[2:] + corpus[2:4]]
    mixed = [{"input_ids": np.stack(rows), "attention_mask": np.ones((4, 16), np.int32)} for rows in mixed]
    reused = SpanPairCache(tmp_path / "reused", 2, 2)
    reused.build(model, mixed, progress=False, reuse=[first, other])  # `other` unfinished: nothing read from it
    assert computed == [4]  # the four answers, once, in one batch
    plain = SpanPairCache(tmp_path / "plain", 2, 2)
    plain.build(model, mixed, progress=False)
    assert computed == [4, 4, 4, 4]  # without reuse: the 12 distinct rows of 16, in three batches
    direct = [span_pairs(model.config, 2, 2)(model.params, b["input_ids"], b["attention_mask"]) for b in mixed]
    for cache in (reused, plain):
        for name, expected in (("x_in", [x for x, _ in direct]), ("target", [y for _, y in direct]),
                               ("input_ids", [b["input_ids"] for b in mixed])):
            np.testing.assert_allclose(cache.open(name).read().result(), np.concatenate(expected), rtol=1e-5,
                                       atol=1e-5)
    assert json.loads((tmp_path / "reused" / "complete.json").read_text())["computed_rows"] == 4
    wrong_span = SpanPairCache(tmp_path / "wrong", 1, 2)
    wrong_span.build(model, mixed[:1], progress=False, reuse=[first])  # pairs of another span are not copied
    assert computed == [4] * 5


@pytest.mark.parametrize("cached", [False, True])
def test_validation_uses_every_chunk(tmp_path, cached):
    """Six validation chunks at batch 4: the short last batch is padded with masked rows, not dropped."""
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")

    def valid_loss0(valid, batch_size, name):
        kwargs = dict(pair_cache=tmp_path / name) if cached else {}
        _, history = train_replacement(model, pruned, chunks(8), batch_size=batch_size, valid_batches=valid,
                                       num_steps=1, progress=False, return_history=True, **kwargs)
        return history["valid"][0][1]

    six = chunks(6, seed=1)
    padded = valid_loss0(six, 4, "b4")
    np.testing.assert_allclose(padded, valid_loss0(six, 2, "b2"), rtol=1e-5)
    assert abs(padded - valid_loss0(six[:4], 4, "first4")) > 1e-3 * padded


def test_shuffled_training_reads_the_same_permutation_live_and_from_the_pair_cache(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, epochs=2, progress=False, seed=5)
    data = chunks(16)
    in_order = train_replacement(model, pruned, data, **kwargs)
    live = train_replacement(model, pruned, data, shuffle=True, **kwargs)
    cached = train_replacement(model, pruned, data, shuffle=True, pair_cache=tmp_path / "pairs", **kwargs)
    for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(in_order.params))]
    assert max(moved) > 1e-4  # another order is another run
    from streamline_jax.data import epoch_order as _epoch_order

    first, second = _epoch_order(16, 5, 0), _epoch_order(16, 5, 1)
    assert sorted(first) == list(range(16)) and list(first) != list(second)


def test_shuffled_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    data = chunks(12)
    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, epochs=2, checkpoint_every=1, progress=False,
                  shuffle=True, seed=3)
    straight = train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "a", **kwargs)

    def interrupt(step, loss):
        if step == 4:  # in the second epoch, whose permutation differs from the first
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", on_step=interrupt, **kwargs)
    resumed = train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shuffle_refuses_a_stream():
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    with pytest.raises(ValueError, match="shuffle=True needs the training data as a sequence"):
        train_replacement(model, pruned, lambda: iter(chunks(8)), batch_size=4, shuffle=True, progress=False)


def test_validation_pairs_computed_once_give_the_recomputed_losses(monkeypatch):
    from streamline_jax import train

    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")

    def valid_losses():
        _, history = train_replacement(model, pruned, chunks(16), batch_size=4, valid_batches=chunks(6, seed=1),
                                       eval_every=1, progress=False, return_history=True)
        return [loss for _, loss in history["valid"]]

    kept = valid_losses()
    monkeypatch.setattr(train.loop, "VALID_PAIRS_BYTES", 0)  # too large to keep: every pass recomputes the pairs
    np.testing.assert_allclose(kept, valid_losses(), rtol=1e-6)
    assert len(kept) == 5 and kept[-1] < kept[0]


def test_bf16_compute_trains_float32_master_weights():
    """bf16 dot inputs in training: the block's weights stay float32 (the model's dtype) and still train, and the
    returned model keeps its own compute setting."""
    model = dense(LLAMA)
    pruned = prune(model, 2, 3, "layer")
    trained, history = train_replacement(model, pruned, patterned_chunks(64), batch_size=4,
                                         valid_batches=patterned_chunks(8, seed=1), lr=1e-2, min_lr=1e-3,
                                         warmup_steps=1, progress=False, return_history=True,
                                         compute_dtype="bfloat16")
    assert history["best_valid"] < 0.9 * history["valid"][0][1], history["valid"]
    block = trainable_blocks(pruned.config)[0]
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(trained.params["segments"][block.key]))
    assert trained.config == pruned.config and trained.config.compute_dtype is None


# ----------------------------------------------------------------------------------------------------------------
# Distillation (mode="kd") and trainable parameter patterns


def kd_setup(model, pruned, trainable=("block",), temperature=2.0, ce_weight=0.0, hidden_layers=(),
             hidden_weight=0.0):
    """(loss(trained), trained): the KD loss of `pruned` against `model` as a function of the trained leaves."""
    from streamline_jax.train import distillation_settings, kd_loss, split_params, trained_paths

    block = trainable_blocks(pruned.config)[0]
    paths = trained_paths(pruned.params, block, trainable)
    trained, frozen = split_params(pruned.params, set(paths).__contains__)
    kd = distillation_settings(model.config, pruned.config, block, paths, temperature, ce_weight, hidden_layers,
                               hidden_weight)
    ids = np.asarray(chunks(3, seed=7)).reshape(3, 16)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # a padded row: its last five positions count for nothing
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}

    def loss(trained):
        return kd_loss(trained, {"pruned": frozen, "dense": model.params}, batch, dense_config=model.config,
                       pruned_config=pruned.config, block=block, kd=kd)

    loss.frozen = frozen
    return loss, trained, batch, kd


@pytest.mark.parametrize("trainable", [("block",), ("block", "embed_tokens")])
def test_kd_loss_is_torch_kl_divergence_and_cross_entropy_over_real_tokens(monkeypatch, trainable):
    import torch
    import torch.nn.functional as F

    from streamline_jax import train

    model = dense(LLAMA)
    pruned = prune(model, 2, 3, "layer")
    temperature, ce_weight = 2.0, 0.3
    loss, trained, batch, kd = kd_setup(model, pruned, trainable, temperature, ce_weight)
    assert kd.shared_prefix == (trainable == ("block",))  # a trained embedding gives the student its own prefix
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = lambda m: torch.tensor(np.asarray(transformer.apply(m.config, m.params, ids, mask)["logits"]))
    teacher, student = logits(model), logits(pruned)
    real = torch.tensor(np.asarray(mask)).bool()
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="none").sum(-1)[real].mean() * temperature ** 2
    next_real = real[:, 1:] & real[:, :-1]
    ce = F.cross_entropy(student[:, :-1][next_real], torch.tensor(np.asarray(ids), dtype=torch.long)[:, 1:][next_real])
    expected = float((1 - ce_weight) * kl + ce_weight * ce)
    assert float(kl) > 0.1
    np.testing.assert_allclose(float(loss(trained)), expected, rtol=1e-5)
    monkeypatch.setattr(train.losses, "KD_CHUNK_TOKENS", 7)  # 48 tokens in 7 chunks, the last one padded
    np.testing.assert_allclose(float(loss(trained)), expected, rtol=1e-5)


def test_kd_loss_and_its_gradient_are_zero_for_a_student_equal_to_its_teacher():
    model = dense(LLAMA)
    same = prune(model, 2, 1, "layer")  # a one-layer span replaced by a copy of itself: the dense model again
    loss, trained, _, _ = kd_setup(model, same, ("block", "segments/seg_2/.*"), hidden_layers=(4, -1),
                                   hidden_weight=0.5)
    value, grads = jax.value_and_grad(loss)(trained)
    assert abs(float(value)) < 1e-6
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-5
    moved = jax.tree.map(lambda a: a * 1.05, trained)  # a different student: a real loss and gradient
    value, grads = jax.value_and_grad(loss)(moved)
    assert float(value) > 1e-3 and max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


def test_kd_hidden_every_matches_each_later_layer_the_student_still_has():
    from streamline_jax.train import distillation_settings

    model = dense(LLAMA)  # 6 layers; the span [1, 3) ends at layer 2, the block's index 1
    pruned = prune(model, 1, 2, "layer")
    block = trainable_blocks(pruned.config)[0]

    def pairs(config, every, weight=1.0, layers=()):
        return distillation_settings(model.config, config, block, ["segments/seg_1/x"], 1.0, 0.0, layers, weight,
                                     every).hidden_pairs

    assert pairs(pruned.config, 1) == ((2, 1), (3, 2), (4, 3), (5, 4))
    assert pairs(pruned.config, 2) == ((2, 1), (4, 3))
    assert pairs(pruned.config, 2, layers=(5,)) == ((2, 1), (4, 3), (5, 4))
    assert pairs(pruned.config, 4) == ((2, 1),)  # past the last layer: the span's output alone
    assert pairs(pruned.config, 2, weight=0.0) == ()  # weight 0: no hidden-state terms at all
    twice = prune(pruned, 3, 2, "layer")  # original layers 4 and 5 pruned by a second span: skipped
    assert pairs(twice.config, 1) == ((2, 1), (3, 2))
    with pytest.raises(ValueError, match="kd_hidden_every must be a whole number of layers >= 0, got -1"):
        pairs(pruned.config, -1)


def test_kd_gradient_matches_a_finite_difference():
    model = dense(LLAMA)
    pruned = prune(model, 2, 3, "layer")
    loss, trained, _, kd = kd_setup(model, pruned, ("block", "segments/seg_2/mlp/.*"), temperature=2.0,
                                    ce_weight=0.4, hidden_layers=(5,), hidden_weight=0.01)
    assert kd.hidden_pairs == ((4, 2), (5, 3))  # the span's output against the block, layer 5 against its copy
    grads = jax.grad(loss)(trained)
    leaves, treedef = jax.tree.flatten(trained)
    rng = np.random.default_rng(0)
    direction = treedef.unflatten([jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in leaves])
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shifted = lambda s: float(loss(jax.tree.map(lambda a, d: a + s * eps * d, trained, direction)))  # noqa: E731
    finite = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(along) > 1e-2
    np.testing.assert_allclose(along, finite, rtol=2e-2)


@pytest.mark.parametrize("temperature,ce_share", [(1.0, 0.0), (2.0, 0.3)])
def test_kd_loss_with_its_gradient_made_in_the_forward_equals_autodiff(monkeypatch, temperature, ce_share):
    """distillation_loss (a frozen head: each chunk's input gradient made in the forward pass, no logits recomputed)
    against distillation_loss_by_autodiff (through recomputed logits), value and gradient, over padded chunks."""
    from streamline_jax import train

    monkeypatch.setattr(train.losses, "KD_CHUNK_TOKENS", 7)  # 40 tokens in 6 chunks, the last one padded
    teacher, student = dense(LLAMA, seed=1), prune(dense(LLAMA), 1, 2, "layer")
    rng = np.random.default_rng(0)
    h_t, h_s = (jnp.asarray(rng.standard_normal((40, LLAMA.hidden_size)), jnp.float32) for _ in range(2))
    labels = jnp.asarray(rng.integers(0, LLAMA.vocab_size, 40))
    kl_w, ce_w = (jnp.asarray(rng.uniform(0, 1, 40) * (rng.uniform(size=40) > 0.2), jnp.float32) / 40
                  for _ in range(2))
    ce_w = ce_w * ce_share
    args = (teacher.config, teacher.params, student.config, student.params, h_t)

    def fused(h):
        return train.distillation_loss(*args, h, labels, kl_w, ce_w if ce_share else None, temperature)

    def autodiff(h):
        return train.distillation_loss_by_autodiff(*args, h, labels, kl_w, ce_w if ce_share else None, temperature)

    value, grad = jax.jit(jax.value_and_grad(fused))(h_s)
    expected, expected_grad = jax.jit(jax.value_and_grad(autodiff))(h_s)
    assert float(expected) > 0.1
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(jax.jit(fused)(h_s)), float(expected), rtol=1e-5)  # no gradient asked
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(expected_grad).max()))


@pytest.mark.parametrize("trainable,span", [(("block",), (2, 3)), (("block", "segments/seg_0/.*"), (2, 3)),
                                            (("block",), (3, 3))])
def test_kd_loss_from_the_pair_cache_equals_the_live_one(trainable, span):
    """The teacher from the span's cached output and the student from its cached input (its own prefix where that
    trains): the live KD loss and gradient, hidden-state terms at the span's output and after it included; a span
    that ends at the last layer leaves the cached teacher no layer to run."""
    from streamline_jax.train import cached_kd_loss, span_pairs

    model = dense(LLAMA)
    pruned = prune(model, *span, "layer")
    last = span == (3, 3)
    loss, trained, batch, kd = kd_setup(model, pruned, trainable, ce_weight=0.3, hidden_layers=() if last else (5,),
                                        hidden_weight=0.1)
    assert kd.shared_prefix == (trainable == ("block",)) and (sum(span) - 1, span[0]) in kd.hidden_pairs
    x_in, target = span_pairs(model.config, model.params, batch["input_ids"], batch["attention_mask"], *span)
    block = trainable_blocks(pruned.config)[0]
    frozen = {"pruned": loss.frozen, "dense": model.params}

    def cached(trained):
        return cached_kd_loss(trained, frozen, {**batch, "x_in": x_in, "target": target}, dense_config=model.config,
                              pruned_config=pruned.config, block=block, kd=kd)

    (value, grads), (expected, expected_grads) = jax.value_and_grad(cached)(trained), jax.value_and_grad(loss)(trained)
    assert float(expected) > 0.1
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_kd_training_from_the_pair_cache_equals_live_kd(tmp_path):
    """KD mode with a pair cache (the distillation after MSE reads the MSE phase's) reads the same shuffled batches
    as live KD and trains to the same parameters; a cache written without the token ids is rebuilt."""
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    kwargs = dict(batch_size=4, mode="kd", lr=3e-3, warmup_steps=1, epochs=2, shuffle=True, seed=3,
                  valid_batches=chunks(4, seed=2), eval_every=3, kd_ce_weight=0.2, progress=False)
    data = chunks(16)
    live, live_history = train_replacement(model, pruned, data, return_history=True, **kwargs)
    train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", mode="mse", num_steps=1, batch_size=4,
                      progress=False)
    marker = tmp_path / "pairs" / "complete.json"
    written = marker.stat().st_mtime_ns
    cached, history = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", return_history=True,
                                        **kwargs)
    assert marker.stat().st_mtime_ns == written  # the MSE phase's cache, reused
    for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose([v for _, v in history["valid"]], [v for _, v in live_history["valid"]], rtol=1e-4)

    import json

    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in meta.items() if k != "input_ids"}))  # an older run's cache
    train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", num_steps=1, **kwargs)
    assert json.loads(marker.read_text())["input_ids"] is True


def test_kd_training_lowers_validation_loss():
    model = dense(LLAMA)
    pruned = prune(model, 1, 3, "layer")
    _, history = train_replacement(model, pruned, patterned_chunks(64), batch_size=8, mode="kd",
                                   valid_batches=patterned_chunks(8, seed=3), lr=1e-2, min_lr=1e-3, warmup_steps=1,
                                   kd_temperature=2.0, kd_ce_weight=0.2, kd_hidden_layers=(-1,), kd_hidden_weight=0.01,
                                   progress=False, return_history=True)
    train_losses = [loss for _, loss, _ in history["train"]]
    assert history["best_valid"] < 0.8 * history["valid"][0][1], history["valid"]
    assert np.mean(train_losses[-3:]) < 0.85 * np.mean(train_losses[:3]), train_losses


def test_trainable_patterns_train_those_leaves_and_nothing_else(tmp_path):
    import orbax.checkpoint as ocp

    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")  # seg_0: layers 0-1, seg_1: the block, seg_2: layers 4-5
    trainable = ("block", "segments/seg_2/mlp/.*", "final_norm/.*")
    trained = train_replacement(model, pruned, patterned_chunks(32), batch_size=8, mode="kd", lr=1e-2,
                                warmup_steps=1, weight_decay=0.1, trainable=trainable, freeze=("attention",),
                                checkpoint_dir=tmp_path, progress=False)
    from streamline_jax.train import param_path

    before = {param_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(pruned.params)}
    after = {param_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(trained.params)}
    assert before.keys() == after.keys()
    moved = {p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))}
    expected = {p for p in before if p.startswith(("segments/seg_2/mlp/", "final_norm/", "segments/seg_1/mlp/",
                                                   "segments/seg_1/post_attention_layernorm/"))}
    assert moved == expected  # the block's attention half is frozen, and everything else stays bitwise
    assert all(after[p].dtype == before[p].dtype for p in before)
    # the checkpoint holds the trained leaves and AdamW's two moments of each of them, nothing more
    state = ocp.CheckpointManager(tmp_path).restore(None)["state"]
    saved = {param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(state["trained"])}
    assert saved == expected
    size = sum(np.asarray(before[p]).size for p in expected)
    moments = sum(np.asarray(a).size for a in jax.tree.leaves(state["opt_state"]) if np.ndim(a) > 0)
    assert moments == 2 * size


@pytest.mark.parametrize("start", [0, 2, 4])
def test_before_and_after_block_select_the_decoder_layers_on_each_side(start):
    """`before_block` / `after_block` name the layers on either side of the block wherever the span falls (segment
    keys move with it); a side with no layers selects nothing instead of failing, where a regex must match."""
    from streamline_jax.train import trained_paths

    pruned = prune(dense(LLAMA), start, 2, "layer")
    block = trainable_blocks(pruned.config)[0]
    layers = [f"segments/{k}/" for k, seg in zip(pruned.params["segments"], pruned.config.layout)
              if seg.kind == "layers"]
    before = [k for k in layers if transformer.segment_index(k.split("/")[1]) < transformer.segment_index(block.key)]
    after = [k for k in layers if k not in before]
    assert (len(before), len(after)) == {0: (0, 1), 2: (1, 1), 4: (1, 0)}[start]

    def segments(trainable):
        return {"/".join(p.split("/")[:2]) + "/" for p in trained_paths(pruned.params, block, trainable)}

    own = f"segments/{block.key}/"
    assert segments(("block", "after_block")) == {own, *after}
    assert segments(("block", "before_block")) == {own, *before}
    assert segments(("block", "before_block", "after_block")) == {own, *layers}
    if after:
        assert segments(("after_block",)) == set(after)
    else:
        with pytest.raises(ValueError, match="leaves nothing to train"):
            trained_paths(pruned.params, block, ("after_block",))
    with pytest.raises(ValueError, match="matches none"):
        trained_paths(pruned.params, block, ("block", "segments/seg_9/.*"))


def test_scaled_paths_get_that_fraction_of_the_adamw_update():
    from streamline_jax.train import make_optimizer

    params = {"segments": {"seg_1": {"w": jnp.ones((3,))}, "seg_2": {"w": jnp.ones((3,))}}}
    grads = {"segments": {"seg_1": {"w": jnp.array([1.0, -2.0, 3.0])}, "seg_2": {"w": jnp.array([0.5, 1.0, -4.0])}}}
    kw = dict(lr=1e-2, min_lr=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.1, clip_norm=1.0, grad_accum=1)
    plain, _ = make_optimizer(**kw)
    scaled, _ = make_optimizer(**kw, scale_of=lambda path: 0.25 if path.startswith("segments/seg_2/") else 1.0)
    plain_state, scaled_state = plain.init(params), scaled.init(params)
    for _ in range(3):
        u, plain_state = plain.update(grads, plain_state, params)
        v, scaled_state = scaled.update(grads, scaled_state, params)
        np.testing.assert_array_equal(v["segments"]["seg_1"]["w"], u["segments"]["seg_1"]["w"])
        np.testing.assert_allclose(v["segments"]["seg_2"]["w"], 0.25 * u["segments"]["seg_2"]["w"], rtol=1e-6)
    assert float(jnp.abs(u["segments"]["seg_2"]["w"]).min()) > 0  # past the warm-up's first step (lr 0)


def test_lr_beyond_block_sets_the_lr_outside_the_block_only():
    from streamline_jax.settings import TrainSection

    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    kw = dict(batch_size=8, mode="kd", lr=1e-2, warmup_steps=1, trainable=("block", "final_norm/.*"), progress=False)

    def change(a, b):
        return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    moved = {}  # lr_beyond_block: the largest change of final_norm and of the block
    for beyond in (None, 1e-2, 1e-3):
        trained = train_replacement(model, pruned, patterned_chunks(32), lr_beyond_block=beyond, **kw)
        moved[beyond] = {"final_norm": change(trained.params["final_norm"], pruned.params["final_norm"]),
                         "block": change(trained.params["segments"]["seg_1"], pruned.params["segments"]["seg_1"])}
    assert moved[None] == moved[1e-2]  # lr_beyond_block = lr changes nothing
    same, lower = moved[1e-2], moved[1e-3]
    assert 0 < lower["final_norm"] < 0.3 * same["final_norm"], moved  # ~1/10 (the gradients differ after step 1)
    assert lower["block"] > 0.3 * same["block"], moved
    with pytest.raises(ValueError, match="lr_beyond_block must be > 0"):
        train_replacement(model, pruned, patterned_chunks(8), lr_beyond_block=0.0, **kw)
    phase = TrainSection(distill_steps=4, distill_lr_beyond_block=3e-4).distillation(32, 8)
    assert (phase.lr, phase.lr_beyond_block) == (1e-3, 3e-4)
    # checkpoints: at the end and every train.checkpoint_minutes (one of every layer and its Adam state is large),
    # or train.checkpoint_every
    assert [TrainSection(distill_steps=n).distillation(32, 8).checkpoint_every for n in (4, 64, 96)] == [4, 64, 96]
    assert TrainSection(distill_steps=64, checkpoint_every=1).distillation(32, 8).checkpoint_every == 1


def test_kd_resume_with_trainable_patterns_gives_the_same_parameters(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    data = chunks(24)
    kwargs = dict(batch_size=4, lr=3e-3, warmup_steps=1, valid_batches=chunks(4, seed=2), eval_every=2,
                  checkpoint_every=2, progress=False, mode="kd", kd_ce_weight=0.5,
                  trainable=("block", "segments/seg_2/.*mlp.*"))
    straight = train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "a", **kwargs)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", on_step=interrupt, **kwargs)
    resumed = train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TrainingError, match="other trained parameters"):
        train_replacement(model, pruned, data, checkpoint_dir=tmp_path / "b", resume=True,
                          **{**kwargs, "trainable": ("block",)})


def test_trainable_and_kd_settings_are_checked_up_front():
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    kw = dict(batch_size=4, progress=False)
    with pytest.raises(ValueError, match="trainable pattern 'segments/seg_9/.*' matches none"):
        train_replacement(model, pruned, chunks(8), mode="lm", trainable=("segments/seg_9/.*",), **kw)
    with pytest.raises(ValueError, match="mode=mse trains the block only"):
        train_replacement(model, pruned, chunks(8), mode="mse", trainable=("block", "final_norm/.*"), **kw)
    with pytest.raises(ValueError, match="not a regular expression"):
        train_replacement(model, pruned, chunks(8), mode="lm", trainable=("seg_2(",), **kw)
    with pytest.raises(ValueError, match=r"kd_ce_weight .* must be in \[0, 1\], got 1.5"):
        train_replacement(model, pruned, chunks(8), mode="kd", kd_ce_weight=1.5, **kw)
    with pytest.raises(ValueError, match="kd_temperature must be positive"):
        train_replacement(model, pruned, chunks(8), mode="kd", kd_temperature=0.0, **kw)
    with pytest.raises(ValueError, match=r"layer 2 is not after the span \[2, 4\)"):
        train_replacement(model, pruned, chunks(8), mode="kd", kd_hidden_layers=(2,), kd_hidden_weight=1.0, **kw)
    with pytest.raises(ValueError, match="needs kd_hidden_weight > 0"):
        train_replacement(model, pruned, chunks(8), mode="kd", kd_hidden_layers=(5,), **kw)


@pytest.mark.parametrize("start", [1, 2])
def test_gemma_layer_block_trains_with_the_attention_type_of_its_layer(start):
    """A `layer` block replacing one layer is that layer: its MSE against the dense span is zero only when the
    training step runs it with that layer's type (Gemma 3 tiny: s s f s s f, window 4 on 16 tokens)."""
    from streamline_jax.train import mse_loss

    model = dense(GEMMA["gemma3"])
    pruned = prune(model, start, 1, "layer")
    block = trainable_blocks(pruned.config)[0]
    assert pruned.config.layer_types[block.layer] == model.config.layer_types[start]
    batch = {"input_ids": jnp.asarray(np.stack(chunks(2))), "attention_mask": jnp.ones((2, 16), jnp.int32)}
    trained = {"segments": {block.key: pruned.params["segments"][block.key]}}  # the block is what trains
    loss = lambda cfg: float(mse_loss(trained, {"dense": model.params}, batch,
                                      dense_config=model.config, pruned_config=cfg, block=block))
    assert loss(pruned.config) < 1e-10
    flipped = tuple({"sliding_attention": "full_attention", "full_attention": "sliding_attention"}[t]
                    for t in pruned.config.layer_types)
    assert loss(pruned.config.replace(layer_types=flipped)) > 1e-4


def test_a_span_from_layer_zero_has_the_embeddings_as_its_input():
    from streamline_jax.train import span_pairs

    model = dense(LLAMA)
    ids = jnp.asarray(np.stack(chunks(2)))
    mask = jnp.ones_like(ids)
    x_in, target = span_pairs(model.config, model.params, ids, mask, 0, 2)
    positions = transformer.default_positions(mask)
    np.testing.assert_array_equal(np.asarray(x_in), np.asarray(transformer.embed(model.config, model.params, ids,
                                                                                   positions)))
    assert target.shape == x_in.shape


@pytest.mark.parametrize("mode", ["mse", "lm", "kd"])
def test_remat_trains_to_the_same_parameters_and_the_step_donates_its_inputs(mode, monkeypatch):
    """Remat recomputes the layers in the backward pass (the program changes) but not the numbers; the train step
    takes over the buffers of the trained parameters and optimizer state it is given, and the model passed in stays
    whole."""
    from streamline_jax import train

    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    steps = []
    build = train.training_program

    def spy(*args, **kwargs):
        program = build(*args, **kwargs)
        steps.append(program)
        return program

    monkeypatch.setattr(train.program, "training_program", spy)
    kw = dict(mode=mode, batch_size=4, lr=1e-2, warmup_steps=1, num_steps=3, progress=False,
              **({"kd_ce_weight": 0.5} if mode == "kd" else {}))
    results = {remat: train_replacement(model, pruned, chunks(12), remat=remat, **kw).params
               for remat in ("none", "full", "dots")}
    block = trainable_blocks(pruned.config)[0].key
    for remat in ("full", "dots"):
        diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results[remat]["segments"][block],
                            results["none"]["segments"][block])
        assert max(jax.tree.leaves(diff)) < 1e-5, (remat, diff)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results["none"]["segments"][
        block], pruned.params["segments"][block]))) > 0
    texts = [p.train_step.lower(*p.arguments, train.abstract_batch(4, 16)).as_text() for p in steps]
    # (kd's chunked logits are recomputed whatever the policy: it has barriers without remat too)
    barriers = [t.count("optimization_barrier") for t in texts]
    assert all(b > barriers[0] for b in barriers[1:]), barriers
    assert all("tf.aliasing_output" in t or "jax.buffer_donor" in t for t in texts)
    assert all(not a.is_deleted() for a in jax.tree.leaves(pruned.params))


def test_training_options_check_themselves_once_for_the_api_and_the_settings():
    """One check, two spellings: train_replacement's names and the run's `train.` settings."""
    from streamline_jax.train import TrainOptions

    bad = TrainOptions(mode="mse", trainable=("block", "lm_head/.*"))
    with pytest.raises(ValueError, match=r"^mode=mse trains the block only"):
        bad.check()
    with pytest.raises(ValueError, match=r"^train\.mode=mse trains the block only .* needs train\.mode=lm or kd"):
        bad.check(prefix="train.")
    with pytest.raises(ValueError, match=r"kd_hidden_layers=\[5\] needs kd_hidden_weight > 0"):
        TrainOptions(mode="kd", kd_hidden_layers=(5,)).check()
    options = TrainOptions(num_steps=3, grad_accum=2, epochs=2)
    assert options.steps_for(3) == 3 and TrainOptions(grad_accum=2).steps_for(5) == 2
    with pytest.raises(ValueError, match=r"num_steps=3 x grad_accum=2 needs 6 batches, but the data gives 2 per "
                                         r"epoch x epochs=2: 4"):
        options.steps_for(2)
    with pytest.raises(ValueError, match="the data gives no optimizer step"):
        TrainOptions(grad_accum=4).steps_for(3)


def test_pair_cache_that_does_not_fit_the_disk_is_refused_before_any_pair(tmp_path, monkeypatch):
    import collections
    import shutil

    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(TrainingError, match=r"pair cache needs 0\.00 GiB in .*pairs.* 0\.00 GiB free") as e:
        train_replacement(model, pruned, chunks(16), batch_size=4, pair_cache=tmp_path / "pairs", progress=False)
    assert "train.pair_cache=false" in str(e.value) and not (tmp_path / "pairs").exists()


@pytest.mark.parametrize("trainable", [("block",), ("block", "embed_tokens")])
def test_lm_loss_is_torch_cross_entropy_over_real_tokens_with_autodiff_s_gradient(monkeypatch, trainable):
    """LM mode's loss, computed a chunk of tokens at a time (padded chunks), is the cross-entropy of the full logits,
    and its gradient (made in the forward pass for a frozen head) is autodiff's through those logits, a trained head
    (the tied embedding) included."""
    import torch
    import torch.nn.functional as F

    from streamline_jax import train

    model = dense(LLAMA)
    pruned = prune(model, 2, 3, "layer")
    block = trainable_blocks(pruned.config)[0]
    paths = train.trained_paths(pruned.params, block, trainable)
    trained, frozen = train.split_params(pruned.params, set(paths).__contains__)
    ids = np.asarray(chunks(3, seed=7)).reshape(3, 16)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}

    def loss(trained):
        return train.lm_loss(trained, {"pruned": frozen}, batch, dense_config=model.config,
                             pruned_config=pruned.config, block=block)

    def full_logits_loss(trained):  # the batch's [B, T, V] logits at once
        logits = transformer.apply(pruned.config, train.merge_params(trained, frozen), batch["input_ids"],
                                   batch["attention_mask"])["logits"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), batch["input_ids"][:, 1:, None], -1)[..., 0]
        real = jnp.asarray(mask[:, 1:] * mask[:, :-1], jnp.float32)
        return jnp.sum(nll * real) / jnp.sum(real)

    logits = torch.tensor(np.asarray(transformer.apply(pruned.config, pruned.params, ids, mask)["logits"]))
    real = torch.tensor(mask[:, 1:] * mask[:, :-1]).bool()
    expected = float(F.cross_entropy(logits[:, :-1][real], torch.tensor(ids, dtype=torch.long)[:, 1:][real]))
    monkeypatch.setattr(train.losses, "KD_CHUNK_TOKENS", 7)  # 48 tokens in 7 chunks, the last one padded
    value, grads = jax.jit(jax.value_and_grad(loss))(trained)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    expected_grads = jax.jit(jax.grad(full_logits_loss))(trained)
    assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4  # each trained leaf gets some
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def _compiled_step_temp_bytes(loss_name, vocab_size):
    """The temporary bytes of the compiled train step of `loss_name` (trained: the block) on a 512-token batch."""
    from streamline_jax import train
    from streamline_jax.pruning import prune_config

    config = LLAMA.replace(vocab_size=vocab_size, num_layers=3, layout=(), max_position_embeddings=256)
    pruned = prune_config(config, 1, 1, "layer")
    block = trainable_blocks(pruned)[0]
    paths = train.trained_paths(transformer.abstract_params(pruned), block)
    kd = train.distillation_settings(config, pruned, block, paths, 1.0, 0.0, (), 0.0) if loss_name == "kd" else None
    program = train.training_program(config, pruned, block, paths, loss_name, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                                     num_steps=2, weight_decay=0.0, clip_norm=1.0, grad_accum=1, kd=kd)
    compiled = program.train_step.lower(*program.arguments, train.abstract_batch(2, 256)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("loss_name", ["kd", "lm"])
def test_a_training_step_s_memory_is_flat_in_the_vocabulary(monkeypatch, loss_name):
    """The distillation's and the LM loss's logits are made a bounded number of logits at a time: a 16x larger
    vocabulary adds ~nothing to the compiled step's temporary memory (the batch's [512, 32768] float32 logits alone
    would be 64 MiB)."""
    from streamline_jax import train

    monkeypatch.setattr(train.losses, "KD_CHUNK_LOGITS", 128 * 2048)  # 128 tokens a chunk at 2,048 words, 8 at 32,768
    small, large = (_compiled_step_temp_bytes(loss_name, v) for v in (2048, 32768))
    assert large - small < 4 << 20, (small, large)
