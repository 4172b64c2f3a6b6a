"""The LM head a slice of the vocabulary at a time (models/vocab_slices.py), where bfloat16 weights meet float32
products: the slices cover the vocabulary once, the logits, log-probabilities, greedy flags and distillation loss
equal the whole head's, and no compiled step holds a float32 copy of the head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamline_jax import evaluation
from streamline_jax.backend import jit_for
from streamline_jax.models import transformer, vocab_slices
from streamline_jax.train import losses
from tiny import LLAMA, OPT

V = 1000  # 8 groups of 125 rows: slices of 3 rows leave an overlapping last slice


def configs(base=LLAMA, **changes):
    """(bf16 weights with float32 products: sliced; the same weights in float32: the whole head), and their
    parameters."""
    sliced = dataclasses.replace(base, vocab_size=V, dtype="bfloat16", compute_dtype="float32", **changes)
    whole = dataclasses.replace(sliced, dtype="float32")
    params = transformer.init_params(sliced, jax.random.PRNGKey(0))
    return sliced, params, whole, jax.tree.map(lambda x: x.astype(jnp.float32), params)


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(vocab_slices, "SLICE_BYTES", 4 * 3 * 8 * 64)  # 3 rows a group for 64-wide features


@pytest.mark.parametrize("vocab,tokens,width", [(1000, 40, 64), (151936, 331, 3584), (32000, 8, 4096),
                                                (49152, 4096, 576), (50272, 1, 2048)])
def test_the_slices_cover_every_id_once(vocab, tokens, width):
    s = vocab_slices.plan(vocab, tokens, width)
    seen = np.zeros(vocab, int)
    for i in range(s.count):
        ids, fresh = (np.asarray(a) for a in s.ids_and_fresh(i))
        assert ids.min() >= 0 and ids.max() < vocab
        np.add.at(seen, ids[fresh], 1)
    np.testing.assert_array_equal(seen, 1)
    assert 4 * s.groups * s.rows * max(tokens, width) <= max(vocab_slices.SLICE_BYTES, 4 * s.groups * width)


@pytest.mark.parametrize("case", ["tied", "untied", "softcap", "opt"])
def test_sliced_head_equals_the_whole_head(small_slices, case):
    """`transformer.head`'s logits and their gradient in the hidden states (the slices recomputed in the backward
    pass) against the float32 head of the same weights."""
    base = OPT if case == "opt" else LLAMA
    changes = {"untied": {"tie_word_embeddings": False}, "softcap": {"final_logit_softcap": 3.0}}.get(case, {})
    sliced, params, whole, params32 = configs(base, **changes)
    assert transformer.converts_head(sliced) and not transformer.converts_head(whole)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 20, LLAMA.hidden_size)) * 2
    probe = jax.random.normal(jax.random.PRNGKey(2), (2, 20, V))

    def value_and_grad(config, p):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(transformer.head(config, p, x) * probe)))(x)

    (a, ga), (b, gb) = value_and_grad(sliced, params), value_and_grad(whole, params32)
    np.testing.assert_allclose(transformer.head(sliced, params, x), transformer.head(whole, params32, x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5)


def test_sliced_log_probabilities_and_greedy_flags(small_slices):
    """`evaluation.head_logprobs` a slice at a time for all tokens (online log-sum-exp, running argmax) equals the
    whole head's; targets include each token's argmax, and a tie between two ids reads the lower id as greedy, as
    jnp.argmax does."""
    sliced, params, whole, params32 = configs()
    table = params["embed_tokens"].at[999].set(params["embed_tokens"][5])  # ids 5 and 999: the same logits
    params, params32 = {**params, "embed_tokens": table}, {**params32, "embed_tokens": table.astype(jnp.float32)}
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, LLAMA.hidden_size)) * 2
    x = x.at[0, 0].set(params32["embed_tokens"][5] * 40)  # a hidden state that picks ids 5 and 999 alike
    argmax = jnp.argmax(transformer.head(whole, params32, x), axis=-1)
    targets = jnp.where(jnp.arange(16) % 2 == 0, argmax, jax.random.randint(jax.random.PRNGKey(3), (3, 16), 0, V))
    targets = targets.at[0, 1].set(999)
    a, greedy_a = evaluation.head_logprobs(sliced, params, x, targets, with_greedy=True)
    b, greedy_b = evaluation.head_logprobs(whole, params32, x, targets, with_greedy=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(greedy_a, greedy_b)
    assert int(argmax[0, 0]) == 5 and bool(greedy_a[0, 0]) and int(greedy_a.sum()) >= 24


@pytest.mark.parametrize("temperature,ce", [(1.0, 0.3), (2.0, None)])
def test_sliced_distillation_loss(small_slices, temperature, ce):
    """The distillation loss and its gradient in the student's hidden states, its heads sliced, against the whole
    float32 heads."""
    sliced, params, whole, params32 = configs(tie_word_embeddings=False)
    student = transformer.init_params(sliced, jax.random.PRNGKey(7))
    student32 = jax.tree.map(lambda x: x.astype(jnp.float32), student)
    rng = np.random.default_rng(0)
    h_t, h_s = (jnp.asarray(rng.standard_normal((40, LLAMA.hidden_size)) * 2, jnp.float32) for _ in range(2))
    labels = jnp.asarray(rng.integers(0, V, 40))
    kl_w = jnp.asarray(rng.uniform(size=40) / 40, jnp.float32)
    ce_w = None if ce is None else kl_w * ce

    def value_and_grad(config, teacher, student):
        loss = lambda h: losses.distillation_loss(config, teacher, config, student, h_t, h, labels, kl_w, ce_w,
                                                  temperature)
        return jax.jit(jax.value_and_grad(loss))(h_s)

    (a, ga), (b, gb) = value_and_grad(sliced, params, student), value_and_grad(whole, params32, student32)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-7)


def test_no_step_holds_a_float32_head(monkeypatch):
    """Compiled as the run compiles them (`jit_for`), neither the evaluation's scoring nor a distillation step's
    loss and gradient holds a float32 copy of a bf16 head (64 MiB here), which each did with the head converted
    whole (XLA hoists the conversion out of the loop over tokens): shown by the same steps without the slices."""
    monkeypatch.setattr(vocab_slices, "SLICE_BYTES", 4 << 20)
    config = dataclasses.replace(LLAMA, vocab_size=32768, hidden_size=512, tie_word_embeddings=False,
                                 dtype="bfloat16", compute_dtype="float32")
    abstract = transformer.abstract_params(config)
    heads = {k: abstract[k] for k in transformer.HEAD_KEYS if k in abstract}
    float32_head = 4 * config.vocab_size * config.hidden_size
    hidden, tokens = jax.ShapeDtypeStruct((2, 8, 512), jnp.float32), jax.ShapeDtypeStruct((2, 8), jnp.int32)
    flat, weights = jax.ShapeDtypeStruct((16, 512), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.float32)

    def temps():
        scoring = jit_for("float32", lambda p, h, t: evaluation.head_logprobs(config, p, h, t, with_greedy=True))
        step = jit_for("float32", jax.value_and_grad(lambda h_s, h_t, p, l, w: losses.distillation_loss(
            config, p, config, p, h_t, h_s, l, w, w, 1.0)))
        return (scoring.lower(heads, hidden, tokens).compile().memory_analysis().temp_size_in_bytes,
                step.lower(flat, flat, heads, tokens.update(shape=(16,)), weights).compile().memory_analysis()
                .temp_size_in_bytes)

    sliced = temps()
    assert max(sliced) < float32_head / 4, sliced
    monkeypatch.setattr(vocab_slices, "converts", lambda *dtypes: False)
    assert min(temps()) >= float32_head, "without the slices the steps should have held the float32 head"
