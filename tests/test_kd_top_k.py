"""The distillation's top-k teacher cache (train.kd_top_k): the loss against a direct computation and the full KL,
the cache built once and read by every epoch and resume, its checks."""

from __future__ import annotations

import collections
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamline_jax import train
from streamline_jax.pruning import prune
from streamline_jax.train import TrainingError, train_replacement
from tiny import LLAMA, chunks, dense

V, D = LLAMA.vocab_size, LLAMA.hidden_size


def student_and_inputs(n=40, seed=0):
    student = prune(dense(LLAMA), 1, 2, "layer")
    rng = np.random.default_rng(seed)
    h_t, h_s = (jnp.asarray(rng.standard_normal((n, D)), jnp.float32) for _ in range(2))
    labels = jnp.asarray(rng.integers(0, V, n))
    kl_w, ce_w = (jnp.asarray(rng.uniform(0, 1, n) * (rng.uniform(size=n) > 0.2), jnp.float32) / n for _ in range(2))
    return student, h_t, h_s, labels, kl_w, ce_w


def teacher_top(teacher, h_t, k, temperature):
    """The teacher's top k of [N, D] final hidden states, as the cache keeps them (no layers run: first layer =
    depth)."""
    out = train.teacher_top_k_fn(teacher.config, teacher.config.depth, k, temperature)(
        teacher.params, h_t[None], jnp.ones((1, h_t.shape[0]), jnp.int32))
    return tuple(out[name][0] for name in train.TOP_K_ARRAYS)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature,k", [(1.0, 5), (2.0, 17)])
def test_top_k_loss_is_the_kl_over_the_top_k_and_the_tail_bucket(monkeypatch, temperature, k):
    """Value against numpy in float64 (the teacher's top k by argsort, the tail as one outcome), over padded chunks;
    the gradient against autodiff through a plain jnp formulation."""
    from streamline_jax.models import transformer

    monkeypatch.setattr(train.losses, "KD_CHUNK_TOKENS", 7)  # 40 tokens in 6 chunks, the last one padded
    teacher = dense(LLAMA, seed=1)
    student, h_t, h_s, labels, kl_w, _ = student_and_inputs()
    top = teacher_top(teacher, h_t, k, temperature)
    logits = lambda m, h: np.asarray(transformer.head(m.config, m.params, h[None])[0], np.float64)
    logp_t, logp_s = (log_softmax(logits(m, h) / temperature) for m, h in ((teacher, h_t), (student, h_s)))
    ids = np.argsort(-logp_t, axis=-1)[:, :k]
    np.testing.assert_array_equal(np.sort(np.asarray(top[1]), -1), np.sort(ids, -1))
    gather = lambda a: np.take_along_axis(a, ids, -1)
    tail = lambda logp: np.log1p(-np.exp(gather(logp)).sum(-1))
    q = np.concatenate([gather(logp_t), tail(logp_t)[:, None]], -1)
    p = np.concatenate([gather(logp_s), tail(logp_s)[:, None]], -1)
    expected = (np.sum(np.exp(q) * (q - p), -1) * np.asarray(kl_w)).sum() * temperature ** 2

    loss = lambda h: train.top_k_distillation_loss(student.config, student.params, h, top, labels, kl_w, None,
                                                   temperature)
    value, grad = jax.jit(jax.value_and_grad(loss))(h_s)
    assert expected > 0.05
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
    np.testing.assert_allclose(float(jax.jit(loss)(h_s)), expected, rtol=1e-4)  # no gradient asked

    def plain(h):  # the same KL, autodiff through the full logits
        z = transformer.head(student.config, student.params, h[None])[0] / temperature
        logp = jax.nn.log_softmax(z)
        top_s = jnp.take_along_axis(logp, top[1], -1)
        tail_s = jnp.log1p(-jnp.sum(jnp.exp(top_s), -1))
        kl = jnp.sum(jnp.exp(top[0]) * (top[0] - top_s), -1) + jnp.exp(top[2]) * (top[2] - tail_s)
        return jnp.sum(kl * kl_w) * temperature ** 2

    expected_grad = jax.grad(plain)(h_s)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-3,
                               atol=1e-3 * float(jnp.abs(expected_grad).max()))


@pytest.mark.parametrize("temperature,ce_share", [(1.0, 0.0), (2.0, 0.3)])
def test_top_k_loss_at_k_equal_to_the_vocabulary_is_the_full_kl(temperature, ce_share):
    teacher = dense(LLAMA, seed=1)
    student, h_t, h_s, labels, kl_w, ce_w = student_and_inputs()
    ce_w = ce_w * ce_share if ce_share else None
    top = teacher_top(teacher, h_t, V, temperature)
    assert np.all(np.isneginf(np.asarray(top[2])))  # no tail

    def top_k(h):
        return train.top_k_distillation_loss(student.config, student.params, h, top, labels, kl_w, ce_w, temperature)

    def full(h):
        return train.distillation_loss(teacher.config, teacher.params, student.config, student.params, h_t, h,
                                       labels, kl_w, ce_w, temperature)

    (value, grad), (expected, expected_grad) = (jax.jit(jax.value_and_grad(f))(h_s) for f in (top_k, full))
    assert float(expected) > 0.1
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(expected_grad).max()))


KD = dict(batch_size=4, mode="kd", lr=3e-3, warmup_steps=1, kd_temperature=2.0, kd_ce_weight=0.2, progress=False)


def count_builds(monkeypatch):
    builds = []
    build = train.TeacherTopKCache.build

    def counted(self, *args, **kwargs):
        builds.append(self.path)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(train.TeacherTopKCache, "build", counted)
    return builds


def test_top_k_cache_at_k_equal_to_the_vocabulary_trains_like_the_full_kl_and_is_built_once(tmp_path, monkeypatch):
    """Training from the cache at k = vocab ends where the full KL from the pair cache does; the teacher's top k are
    computed once for the training rows and once for validation's, whatever the epochs, and a later run (another
    epoch count, the same k and temperature) reuses them; another k builds its own."""
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    data, kwargs = chunks(16), dict(KD, epochs=3, valid_batches=chunks(4, seed=2), eval_every=4, shuffle=True)
    full = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", **kwargs)
    builds = count_builds(monkeypatch)
    cached, history = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=V,
                                        return_history=True, **kwargs)
    assert len(builds) == 2 and builds[1].parent.name == "valid"  # training's and validation's, once each
    assert history["teacher"] == {"top_k": V, "temperature": 2.0, "cache": str(builds[0])}
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=V, **dict(kwargs, epochs=1))
    assert len(builds) == 2
    train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=8, num_steps=1, **kwargs)
    assert len(builds) == 4 and builds[2].name == "teacher_top8_t2"


def test_top_k_cache_is_reused_on_resume_and_the_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    model = dense(LLAMA)
    pruned = prune(model, 1, 2, "layer")
    data = chunks(16)
    kwargs = dict(KD, epochs=2, kd_top_k=8, checkpoint_every=2)
    straight = train_replacement(model, pruned, data, pair_cache=tmp_path / "a", checkpoint_dir=tmp_path / "ca",
                                 **kwargs)
    builds = count_builds(monkeypatch)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_replacement(model, pruned, data, pair_cache=tmp_path / "b", checkpoint_dir=tmp_path / "cb",
                          on_step=interrupt, log_every=1, **kwargs)
    resumed = train_replacement(model, pruned, data, pair_cache=tmp_path / "b", checkpoint_dir=tmp_path / "cb",
                                resume=True, **kwargs)
    assert len(builds) == 1
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_top_k_settings_are_checked_up_front(tmp_path):
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    data = chunks(8)
    for k, message in ((V + 1, f"kd_top_k={V + 1} must be at most the vocabulary's size \\({V}\\)"),
                       (-1, "kd_top_k must be a whole number >= 0"), (2.5, "kd_top_k must be a whole number")):
        with pytest.raises(ValueError, match=message):
            train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=k, **KD)
    with pytest.raises(ValueError, match=r"kd_top_k=8 needs a pair_cache \(train.pair_cache=true\)"):
        train_replacement(model, pruned, data, kd_top_k=8, **KD)
    with pytest.raises(ValueError, match=r"kd_top_k=8 needs a frozen head .*embed_tokens"):
        train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=8,
                          trainable=("block", "embed_tokens"), **KD)
    assert not (tmp_path / "pairs").exists()  # refused before any pair was computed


def test_top_k_cache_that_does_not_fit_the_disk_is_refused_before_any_teacher_run(tmp_path, monkeypatch):
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    data = chunks(16)
    train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", mode="mse", num_steps=1, batch_size=4,
                      progress=False)
    calls = []
    monkeypatch.setattr(train.span_cache, "teacher_top_k_fn", lambda *a: calls.append(a))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(TrainingError, match=r"teacher's top-k cache needs 0\.00 GiB in .*teacher_top8_t2 "
                                            r"\(16 sequences x 16 tokens x 8 .*0\.00 GiB free") as e:
        train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=8, **KD)
    assert "set train.kd_top_k=0" in str(e.value) and "pair_cache=false" not in str(e.value) and not calls
    assert not (tmp_path / "pairs" / "teacher_top8_t2").exists()
    assert json.loads((tmp_path / "pairs" / "complete.json").read_text())["rows"] == 16  # the pairs stay


@pytest.mark.parametrize("overrides, message", [
    (["train.kd_top_k=-1"], "train.kd_top_k must be >= 0"),
    (["train.kd_top_k=2.5"], "train.kd_top_k must be an integer"),
    (["train.kd_top_k=64", "train.pair_cache=false"], "train.kd_top_k=64 needs train.pair_cache=true"),
    (["train.kd_top_k=50000"], "train.kd_top_k=50000 must be at most the model's vocabulary size (49152)"),
])
def test_top_k_settings_are_clear_errors_before_the_run(overrides, message, capsys):
    from streamline_jax import run

    assert run.main(["--out", "/nonexistent/x", *overrides]) == 2
    assert message in capsys.readouterr().err


def teacher_batches(monkeypatch) -> list:
    """The rows of each batch the top-k cache runs the teacher on, appended as it runs."""
    rows = []
    top_k_fn = train.span_cache.teacher_top_k_fn

    def counted(*args):
        fn = top_k_fn(*args)
        return lambda params, x, mask: rows.append(len(x)) or fn(params, x, mask)

    monkeypatch.setattr(train.span_cache, "teacher_top_k_fn", counted)
    return rows


def test_a_short_distillation_caches_only_the_rows_it_reads_and_trains_as_the_full_kl(tmp_path, monkeypatch):
    """2 steps of 4 shuffled batches: the teacher runs for those 8 rows only, and training at k = vocab ends where
    the full KL does; a longer run then caches every row."""
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    data, kwargs = chunks(16), dict(KD, num_steps=2, shuffle=True, seed=5)
    full = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", **kwargs)
    rows = teacher_batches(monkeypatch)
    cached = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=V, **kwargs)
    assert rows == [4, 4]  # 2 batches of 4 rows, of 16
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=V, **dict(kwargs, num_steps=4))
    assert rows == [4, 4] + [4] * 4


def test_repeated_rows_get_the_teachers_top_k_once_and_train_as_the_full_kl(tmp_path, monkeypatch):
    """Eight chunks read twice in one epoch (as the model's answers are, cycled beside training chunks): the span's
    pairs and the teacher's top k are computed for the 8 distinct rows and copied to the other 8."""
    model = dense(LLAMA)
    pruned = prune(model, 2, 2, "layer")
    data, kwargs = chunks(8) * 2, dict(KD, num_steps=4)
    full = train_replacement(model, pruned, data, pair_cache=tmp_path / "full", **kwargs)
    rows = teacher_batches(monkeypatch)
    cached = train_replacement(model, pruned, data, pair_cache=tmp_path / "pairs", kd_top_k=V, **kwargs)
    assert rows == [4, 4]  # the 8 distinct rows of 16
    assert json.loads((tmp_path / "pairs" / "complete.json").read_text())["computed_rows"] == 8
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
