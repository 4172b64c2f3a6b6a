"""Span scores against a direct numpy computation from transformers' hidden states; span choice and its arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from streamline_jax import score
from streamline_jax.models import transformer
from streamline_jax.models.config import from_hf_config
from tiny import FAMILIES, reference_pair


def padded_batches():
    """Two batches: one left-padded, one right-padded with a fully padded row; plus their masks."""
    rng = np.random.RandomState(0)
    ids1 = rng.randint(3, 128, (3, 12))
    mask1 = np.ones_like(ids1)
    mask1[0, :5] = 0  # left padding
    mask1[2, :1] = 0
    ids2 = rng.randint(3, 128, (2, 9))
    mask2 = np.ones_like(ids2)
    mask2[0, 6:] = 0  # right padding
    mask2[1, :] = 0  # a row of padding only: counts for nothing
    return [(ids1, mask1), (ids2, mask2)]


def hf_hidden(ref, ids, mask):
    """transformers' hidden states [L+1, B, T, D], with the last one taken before the final norm."""
    layers = ref.model.layers if hasattr(ref.model, "layers") else ref.model.decoder.layers
    captured = {}
    hook = layers[-1].register_forward_hook(lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.tensor(mask), output_hidden_states=True)
        if isinstance(ref, transformers.LlamaForCausalLM):
            kwargs["position_ids"] = torch.tensor(positions)
        out = ref(torch.tensor(ids), **kwargs)
    hook.remove()
    hidden = [h.numpy() for h in out.hidden_states[:-1]] + [captured["h"].numpy()]
    return np.stack(hidden).astype(np.float64)


def numpy_scores(hiddens_masks):
    """Direct numpy: every pair of boundaries, cosine averaged over real tokens, angular over last real tokens."""
    size = hiddens_masks[0][0].shape[0]
    cos_sum, tokens = np.zeros((size, size)), 0
    ang_sum, seqs = np.zeros((size, size)), 0
    for h, mask in hiddens_masks:
        u = h / np.linalg.norm(h, axis=-1, keepdims=True)
        for b in range(mask.shape[0]):
            real = np.nonzero(mask[b])[0]
            if not len(real):
                continue
            for i in range(size):
                for j in range(size):
                    cos_sum[i, j] += np.sum(np.sum(u[i, b, real] * u[j, b, real], -1))
                    c = np.clip(np.dot(u[i, b, real[-1]], u[j, b, real[-1]]), -1, 1)
                    ang_sum[i, j] += np.arccos(c) / np.pi
            tokens += len(real)
            seqs += 1
    return cos_sum / tokens, ang_sum / seqs


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_scores_match_transformers_hidden_states_with_padding(family):
    ref, model = reference_pair(family)
    data = padded_batches()
    cos, ang = numpy_scores([(hf_hidden(ref, ids, mask), mask) for ids, mask in data])
    got = score.score_spans(model, [{"input_ids": i, "attention_mask": m} for i, m in data])
    size = model.config.depth
    assert got.num_tokens == sum(int(m.sum()) for _, m in data)
    assert got.num_sequences == 4
    for s in range(size):
        for n in range(1, size - s + 1):
            assert got.cosine[s, n] == pytest.approx(cos[s, s + n], abs=2e-6)
            assert got.angular[s, n] == pytest.approx(ang[s, s + n], abs=2e-5)
    np.testing.assert_allclose(got.block_influence, 1 - np.diag(cos, 1), atol=2e-6)
    assert np.isnan(got.cosine[:, 0]).all() and np.isnan(got.cosine[size - 1, 2])


def test_padding_never_counts():
    """A padded batch scores as its unpadded sequences do, one by one, whatever the padding holds."""
    _, model = reference_pair("llama")
    (ids, mask), _ = padded_batches()
    garbage = np.where(mask == 1, ids, 77)
    padded = score.score_spans(model, [(garbage, mask)])
    singles = [(ids[b:b + 1, mask[b] == 1], None) for b in range(ids.shape[0])]
    alone = score.score_spans(model, singles)
    np.testing.assert_allclose(padded.cosine, alone.cosine, atol=2e-6)
    np.testing.assert_allclose(padded.angular, alone.angular, atol=2e-5)


def test_metric_views_and_printing():
    _, model = reference_pair("llama")
    batches = [(ids, mask) for ids, mask in padded_batches()]
    cos = score.score_spans(model, batches, metric="cosine")
    ang = score.score_spans(model, batches, metric="angular")
    bi = score.score_spans(model, batches, metric="block_influence")
    assert cos.to_numpy().shape == (6, 7) and bi.to_numpy().shape == (6,)
    np.testing.assert_array_equal(ang.to_numpy(), cos.angular)
    assert cos[2, 3] == cos.cosine[2, 3]
    # the best span: highest cosine, lowest angular distance
    assert cos.best_start(2) == int(np.nanargmax(cos.cosine[:, 2]))
    assert ang.best_start(2) == int(np.nanargmin(ang.angular[:, 2]))
    text = str(cos)
    assert "cosine" in text and f"{cos.cosine[0, 1]:7.4f}" in text
    assert "lowest first: " + " ".join(map(str, np.argsort(bi.block_influence, kind="stable"))) in str(bi)


def test_bad_scoring_input():
    _, model = reference_pair("llama")
    with pytest.raises(ValueError, match="unknown metric"):
        score.score_spans(model, [], metric="euclid")
    with pytest.raises(ValueError, match="no calibration batches"):
        score.score_spans(model, [])
    with pytest.raises(ValueError, match="no real"):
        score.score_spans(model, [(np.ones((1, 4), int), np.zeros((1, 4), int))])


# ----------------------------------------------------------------------------------------------------------------
# Span choice and parameter arithmetic on full-size configs (shapes only, no weights)

LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}
OPT_6_7B = {"model_type": "opt", "vocab_size": 50272, "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
            "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 4096,
            "do_layer_norm_before": True, "activation_function": "relu", "tie_word_embeddings": True}


def hand_counts(hf):
    """(total, per decoder layer, ffn block, mlp block of width w) counted by hand from the published shapes."""
    d, v = hf["hidden_size"], hf["vocab_size"]
    if hf["model_type"] == "llama":
        i = hf["intermediate_size"]
        ffn = 3 * d * i + d  # gate, up, down + post-attention RMSNorm
        layer = 4 * d * d + ffn + d  # q, k, v, o + input RMSNorm
        total = hf["num_hidden_layers"] * layer + 2 * v * d + d  # embeddings, untied head, final norm
    else:
        i = hf["ffn_dim"]
        ffn = 2 * d * i + i + d + 2 * d  # fc1, fc2 with biases + final_layer_norm
        layer = 4 * (d * d + d) + ffn + 2 * d  # q, k, v, out with biases + self_attn_layer_norm
        total = hf["num_hidden_layers"] * layer + v * d + (hf["max_position_embeddings"] + 2) * d + 2 * d
    return total, layer, ffn, (lambda w: d * w + w + w * d + d)


def test_hand_counts_are_the_published_sizes():
    assert hand_counts(LLAMA2_7B)[0] == 6_738_415_616
    assert hand_counts(LLAMA2_13B)[0] == 13_015_864_320
    assert hand_counts(OPT_6_7B)[0] == 6_658_473_984


def fake_scores(config, seed=0):
    """Scores with a known best span: random cosines, unique maximum per length."""
    size = config.depth
    rng = np.random.RandomState(seed)
    pair = rng.uniform(0.1, 0.9, (size + 1, size + 1))
    return score.SpanScores.from_sums("cosine", pair, 1.0, 1 - pair, 1.0, config)


@pytest.mark.parametrize("hf", [LLAMA2_7B, LLAMA2_13B, OPT_6_7B], ids=["llama2-7b", "llama2-13b", "opt-6.7b"])
@pytest.mark.parametrize("replacement", ["layer", "ffn", "mlp", "none"])
def test_sparsity_arithmetic_full_size(hf, replacement):
    config = from_hf_config(hf)
    total, layer, ffn, mlp = hand_counts(hf)
    assert transformer.count_params(transformer.abstract_params(config)) == total
    block = {"layer": layer, "ffn": ffn, "mlp": mlp(1024), "none": 0}[replacement]
    scores = fake_scores(config)
    for r in (0.1, 0.25, 0.4):
        n = next(n for n in range(1, 41) if n * layer - block >= r * total)  # smallest length by hand
        choice = score.choose_span(scores, sparsity=r, replacement=replacement,
                                   mlp_width=1024 if replacement == "mlp" else None)
        assert choice.length == n
        assert choice.params_total == total
        assert choice.params_removed == n * layer - block
        assert choice.sparsity == (n * layer - block) / total >= r
        assert (n - 1) * layer - block < r * total
        assert choice.start == int(np.nanargmax(scores.cosine[:, n]))


def test_choose_span_by_length_and_protection():
    config = from_hf_config(LLAMA2_7B)
    scores = fake_scores(config, seed=1)
    choice = score.choose_span(scores, length=8)
    assert (choice.length, choice.start) == (8, int(np.nanargmax(scores.cosine[:, 8])))
    assert choice.score == scores[choice.start, 8]
    protected = score.choose_span(scores, length=8, protect_first=4, protect_last=3)
    allowed = scores.cosine[4:32 - 3 - 8 + 1, 8]
    assert protected.start == 4 + int(np.argmax(allowed))
    assert 4 <= protected.start and protected.end <= 29
    ang = scores.with_metric("angular")
    assert score.choose_span(ang, length=5).start == int(np.nanargmin(scores.angular[:, 5]))


def test_shortgpt_baseline_picks_lowest_block_influence():
    config = from_hf_config(LLAMA2_7B)
    total, layer, _, _ = hand_counts(LLAMA2_7B)
    pair = np.full((33, 33), 0.5)
    bi = np.linspace(0.5, 0.1, 32)
    bi[[3, 17, 30]] = [0.01, 0.02, 0.03]  # non-contiguous lowest
    pair[np.arange(32), np.arange(1, 33)] = 1 - bi
    scores = score.SpanScores.from_sums("block_influence", pair, 1.0, pair, 1.0, config)
    choice = score.choose_layers(scores, count=3)
    assert choice.layers == (3, 17, 30) and choice.params_removed == 3 * layer
    assert score.choose_layers(scores, count=4).layers == (3, 17, 30, 31)
    by_sparsity = score.choose_layers(scores, sparsity=0.1)
    n = next(n for n in range(1, 32) if n * layer >= 0.1 * total)
    assert len(by_sparsity.layers) == n and by_sparsity.sparsity >= 0.1
    assert score.choose_layers(scores, count=2, protect_first=4).layers == (17, 30)


def test_bad_choice_input():
    config = from_hf_config(LLAMA2_7B)
    scores = fake_scores(config)
    for r in (0, 1, -0.2, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            score.choose_span(scores, sparsity=r)
    with pytest.raises(ValueError, match="cannot be reached"):
        score.choose_span(scores, sparsity=0.97)  # at most 31 layers net: 93.1%
    with pytest.raises(ValueError, match="cannot be reached"):
        score.spans_for_sparsity(config, 0.5, protect_first=10, protect_last=10)
    with pytest.raises(ValueError, match="does not fit"):
        score.choose_span(scores, length=33)
    with pytest.raises(ValueError, match="does not fit"):
        score.choose_span(scores, length=30, protect_first=2, protect_last=1)
    with pytest.raises(ValueError, match="exactly one"):
        score.choose_span(scores, length=3, sparsity=0.2)
    with pytest.raises(ValueError, match="unknown replacement"):
        score.choose_span(scores, length=3, replacement="attention")


def test_sparsity_on_an_already_pruned_model_counts_each_layer():
    """Layers differ in size once a block is in: the search must agree with counting every pruned config."""
    from streamline_jax.pruning import prune_config

    config = prune_config(FAMILIES["llama"], 1, 2, "mlp", mlp_width=8)  # layers: full, tiny mlp, full, full, full
    scores = fake_scores(config, seed=2)
    total = transformer.count_params(transformer.abstract_params(config))
    for r in (0.05, 0.2, 0.35):
        choice = score.choose_span(scores, sparsity=r, replacement="ffn")
        net = {(s, n): total - transformer.count_params(transformer.abstract_params(prune_config(config, s, n, "ffn")))
               for n in range(1, 6) for s in range(6 - n)}
        shortest = min(n for (s, n), removed in net.items() if removed >= r * total)
        assert choice.length == shortest and choice.params_removed == net[choice.start, choice.length] >= r * total


def test_several_spans_best_first_apart_and_exact_sparsity():
    config = from_hf_config(LLAMA2_7B)
    scores = fake_scores(config, seed=2)
    assert score.choose_spans(scores, 1, length=8) == [score.choose_span(scores, length=8)]
    spans = score.choose_spans(scores, 2, length=9)
    assert sorted(s.length for s in spans) == [4, 5]
    five = next(s for s in spans if s.length == 5)
    four = next(s for s in spans if s.length == 4)
    assert five.start == int(np.nanargmax(scores.cosine[:, 5]))  # the longer span is placed first, at its best
    free = [s for s in range(0, 32 - 4 + 1) if s + 4 < five.start or five.end < s]  # apart: not even touching
    assert four.start == max(free, key=lambda s: scores.cosine[s, 4])
    assert spans == sorted(spans, key=lambda s: s.start)
    # by sparsity: the smallest total length whose two spans reach it, counted on the pruned config
    total = transformer.count_params(transformer.abstract_params(config))
    chosen = score.choose_spans(scores, 2, sparsity=0.25)
    pruned = config
    for s in sorted(chosen, key=lambda s: -s.start):
        pruned = score.prune_config(pruned, s.start, s.length, "layer")
    removed = total - transformer.count_params(transformer.abstract_params(pruned))
    assert removed == sum(s.params_removed for s in chosen) >= 0.25 * total
    shorter = score.choose_spans(scores, 2, length=sum(s.length for s in chosen) - 1)
    assert sum(s.params_removed for s in shorter) < 0.25 * total
    with pytest.raises(ValueError, match="do not fit apart"):
        score.choose_spans(scores, 16, length=32)
    with pytest.raises(ValueError, match="positive integer"):
        score.choose_spans(scores, 0, length=4)


# ----------------------------------------------------------------------------------------------------------------
# Span choice by calibration loss, and the last layers


def plain_loss(model, batches):
    """Mean next-token NLL over real token pairs, from the plain forward, in float64."""
    from streamline_jax.models.model import forward

    total = count = 0.0
    for ids, mask in batches:
        logits = np.asarray(forward(model, ids, mask), np.float64)[:, :-1]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
        nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        real = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
        total += nll[real].sum()
        count += real.sum()
    return total / count


def brute_force_loss(model, batches, start, length):
    """The loss of the model pruned with `none`."""
    from streamline_jax.pruning import prune

    return plain_loss(prune(model, start, length, "none"), batches)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_perplexity_choice_equals_a_brute_force_loop_over_spans(family):
    _, model = reference_pair(family)
    batches = padded_batches()
    length = 2
    choice, costs = score.choose_span_by_loss(model, batches, length=length, protect_first=1)
    expected = {s: brute_force_loss(model, batches, s, length) for s in range(1, model.config.depth - length + 1)}
    assert sorted(costs.losses) == sorted(expected)
    for s, loss in expected.items():
        assert costs.losses[s] == pytest.approx(loss, rel=1e-5)
    assert choice.start == min(expected, key=expected.get) and choice.length == length
    assert choice.score == pytest.approx(expected[choice.start], rel=1e-5)
    assert costs.num_tokens == sum(int(((m[:, 1:] > 0) & (m[:, :-1] > 0)).sum()) for _, m in batches)
    assert costs.dense_loss == pytest.approx(plain_loss(model, batches), rel=1e-5)
    text = str(costs)
    assert f"{choice.start:>7d}" in text and "*" in text
    # by sparsity: the same candidates spans_for_sparsity allows
    length2, starts = score.spans_for_sparsity(model.config, 0.2, "layer")
    choice2, costs2 = score.choose_span_by_loss(model, batches, sparsity=0.2)
    assert sorted(costs2.losses) == starts and choice2.length == length2


def test_last_metric_drops_the_last_layers():
    config = FAMILIES["llama"]
    assert (score.choose_last_span(config, length=2).start, score.choose_last_span(config, length=2).end) == (4, 6)
    assert score.choose_last_span(config, length=2, protect_last=1).start == 3
    n, _ = score.spans_for_sparsity(config, 0.3, "none")
    choice = score.choose_last_span(config, sparsity=0.3, replacement="none")
    assert choice.end == config.depth and choice.length == n and choice.sparsity >= 0.3
    with pytest.raises(ValueError, match="does not fit"):
        score.choose_last_span(config, length=7)
