"""Generation: greedy parity with transformers' `generate`, cached decoding against a full forward, sampling,
stop sequences, bad input, and the generative (GSM8K-style) evaluation."""

from __future__ import annotations

import contextlib
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import rel_err
from reference import params_from_torch, torch_model
from streamline_jax.gen_tasks import (GSM8K, evaluate_generative, first_number, gsm8k_answer,
                                      load_generative_items, normalise)
from streamline_jax.generation import (_decode, _filter_logits, _next_token, _prefill, compile_count, generate,
                                       unrolled)
from streamline_jax.models import transformer
from streamline_jax.models.config import ModelConfig, from_hf_config
from streamline_jax.models.model import Model
from streamline_jax.pruning import prune
from streamline_jax.tasks import TaskFileError
from tiny import FAMILY_GEMMA_HF

GEMMA_HF = dict(FAMILY_GEMMA_HF, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
TINY = {
    "llama": ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                         num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=3, pad_token_id=0,
                         tie_word_embeddings=False),
    "opt": ModelConfig(family="opt", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6, num_heads=4,
                       num_kv_heads=4, head_dim=16, activation="relu", eos_token_id=3, pad_token_id=1,
                       tie_word_embeddings=False),
    "qwen2": ModelConfig(family="llama", model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, eos_token_id=3,
                         pad_token_id=0, tie_word_embeddings=False),
    "qwen3": ModelConfig(family="llama", model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_layers=6, num_heads=4, num_kv_heads=2, head_dim=24, qk_norm=True, eos_token_id=3,
                         pad_token_id=0, tie_word_embeddings=False),
    # sliding layers 0, 2, 4 with a 4-slot window (prompts and continuations run past it)
    "gemma2": from_hf_config(dict(GEMMA_HF, model_type="gemma2", attn_logit_softcapping=0.05,
                                  final_logit_softcapping=30.0)),
    "gemma3": from_hf_config(dict(GEMMA_HF, model_type="gemma3_text", sliding_window_pattern=3, rope_theta=1e6,
                                  rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 8.0})),
}
PROMPT_IDS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3 + 1, 30, 31, 32, 33], [100, 101, 102, 103, 104, 105, 106]]
NEW = 16  # new tokens in the tiny-model tests: one shape, so the tests share compiles


def tiny(family):
    """Our model and transformers' with the same random weights; the head is sharpened so that greedy decoding
    has clear winners (random weights give near-ties that float rounding could flip)."""
    config = TINY[family]
    ref = torch_model(config)
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(20.0)
    return Model(config, params_from_torch(config, ref)), ref


def torch_greedy(ref, prompt, n, eos):
    """transformers' greedy continuation of one prompt, cut before EOS."""
    ids = torch.tensor([prompt])
    with one_torch_thread(), torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos)] if eos in new else new


def delete_layers(ref, keep):
    """transformers' model with only the decoder layers `keep` (renumbered), the others deleted."""
    hf = {k: v for k, v in ref.config.to_dict().items() if k != "layer_types"}
    if ref.config.model_type.startswith("gemma"):  # each kept layer keeps its attention type
        hf["layer_types"] = [ref.config.layer_types[i] for i in keep]
    cfg = ref.config.__class__(**{**hf, "num_hidden_layers": len(keep)})
    cfg._attn_implementation = "eager"
    out = ref.__class__(cfg).eval()
    layers = out.model.decoder.layers if cfg.model_type == "opt" else out.model.layers
    src = ref.model.decoder.layers if cfg.model_type == "opt" else ref.model.layers
    state = ref.state_dict()
    out.load_state_dict({k: v for k, v in state.items() if ".layers." not in k}, strict=False)
    for new, old in enumerate(keep):
        layers[new].load_state_dict(src[old].state_dict())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Greedy parity with transformers


def test_greedy_matches_transformers_on_smollm2_with_and_without_chat_template(smollm2, smollm2_torch):
    plain = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little"]
    chat = ["What is the tallest mountain in the world?", "Write a haiku about the sea.", "What is 12 times 7?"]
    ours = generate(smollm2, plain, 64, prompt_bucket=64)
    ours_chat = generate(smollm2, chat, 64, chat=True, prompt_bucket=64)  # the same shapes: no second compile
    assert ours_chat.prompt_tokens[1] == smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": chat[1]}], add_generation_prompt=True, tokenize=True, return_dict=False)
    prompts = ours.prompt_tokens + ours_chat.prompt_tokens
    expected = ours.tokens + ours_chat.tokens
    # one left-padded batch through transformers' generate (it derives position ids from the mask, as we do)
    pad = smollm2.config.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with one_torch_thread(), torch.no_grad():
        out = smollm2_torch.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    eos = smollm2.config.eos_token_id
    for row, want in enumerate(expected):
        new = out[row, width:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        assert want == new, f"prompt {row}: ours {want} vs transformers {new}"
    assert len(ours.tokens[1]) == 64 and ours_chat.finish_reasons[0] == "eos"
    assert "Paris" in ours.texts[0] and "Everest" in ours_chat.texts[0]


@contextlib.contextmanager
def one_torch_thread():
    """torch's thread pool spins badly when the cores are shared (8x slower here); one thread is fastest."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_greedy_matches_transformers_on_tiny_models(family):
    model, ref = tiny(family)
    ours = generate(model, PROMPT_IDS, NEW)  # one batch, left-padded
    for prompt, got in zip(PROMPT_IDS, ours.tokens):
        assert got == torch_greedy(ref, prompt, NEW, model.config.eos_token_id)
    assert any(len(t) == NEW for t in ours.tokens)
    assert generate(model, PROMPT_IDS, NEW, unroll_layers=False).tokens == ours.tokens  # scanned stacks


@pytest.mark.parametrize("family,replacement", [("llama", "none"), ("llama", "layer"), ("opt", "none"),
                                                ("qwen2", "layer"), ("qwen3", "none"), ("gemma2", "none"),
                                                ("gemma3", "layer")])
def test_pruned_model_matches_transformers_with_the_layers_deleted(family, replacement):
    model, ref = tiny(family)
    # drop layers 2..4; a `layer` block starts as a copy of layer 2, so that equals deleting 3 and 4
    pruned = prune(model, 2, 3 if replacement == "layer" else 2, replacement)
    keep = [0, 1, 2, 5] if replacement == "layer" else [0, 1, 4, 5]
    assert pruned.config.depth == 4
    ref_pruned = delete_layers(ref, keep)
    ours = generate(pruned, PROMPT_IDS, NEW)
    for prompt, got in zip(PROMPT_IDS, ours.tokens):
        assert got == torch_greedy(ref_pruned, prompt, NEW, model.config.eos_token_id)
    assert ours.tokens != generate(model, PROMPT_IDS, NEW).tokens  # pruning changed something


# ----------------------------------------------------------------------------------------------------------------
# The cache


def every_block_kind(model):
    """layers(1), layer, ffn, mlp, layers(1): original layer 0 deleted, layers 1..4 each replaced by one kind of
    block (perturbed, since a fresh `mlp` block is the identity)."""
    for start, kind in [(0, "none"), (1, "layer"), (2, "ffn"), (3, "mlp")]:
        model = prune(model, start, 1, kind)
    assert [s.kind for s in model.config.layout] == ["layers", "layer", "ffn", "mlp", "layers"]
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 100))
    segs = {k: (jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), v)
                if seg.kind != "layers" else v)
            for (k, v), seg in zip(model.params["segments"].items(), model.config.layout)}
    return model.replace(params={**model.params, "segments": segs})


@pytest.mark.parametrize("family,pruned", [("llama", False), ("llama", True), ("opt", False), ("opt", True),
                                           ("qwen3", True), ("gemma2", True), ("gemma3", True)])
def test_cached_decode_logits_equal_a_full_forward(family, pruned):
    model, _ = tiny(family)
    if pruned:
        model = every_block_kind(model)
    out = generate(model, PROMPT_IDS, NEW, output_logits=True, eos_token_id=())
    # one full forward over each prompt + its continuation (right-padded: causal, so padding changes nothing)
    seqs = [p + t[:-1] for p, t in zip(PROMPT_IDS, out.tokens)]
    width = max(map(len, seqs))
    ids = jnp.asarray([s + [0] * (width - len(s)) for s in seqs])
    full = jax.jit(transformer.apply, static_argnums=0)(model.config, model.params, ids)["logits"]
    for row, (prompt, new, logits) in enumerate(zip(PROMPT_IDS, out.tokens, out.logits)):
        assert len(new) == NEW and logits.shape == (NEW, model.config.vocab_size)
        assert rel_err(logits, full[row, len(prompt) - 1:len(prompt) - 1 + NEW]) < 2e-5
        assert np.argmax(logits, -1).tolist() == new


def test_decoding_compiles_once_per_shape():
    model, _ = tiny("llama")
    generate(model, PROMPT_IDS, NEW)
    before = compile_count()
    generate(model, [[1, 2], [3, 4, 5, 6], [7] * 20], NEW)  # other prompts, same batch and prompt bucket
    generate(model, PROMPT_IDS, NEW, eos_token_id=())
    assert compile_count() == before
    generate(model, PROMPT_IDS, NEW, temperature=0.7, seed=1)
    sampled = compile_count()
    generate(model, PROMPT_IDS, NEW, temperature=1.3, top_k=5, top_p=0.5, seed=2)  # settings are traced
    assert compile_count() == sampled


def test_a_decode_step_does_not_copy_the_kv_cache():
    """The cache's layout is the attention products' own ([B, K, S, D]): in [B, S, K, D], XLA copied every layer's
    whole cache into that order at each decode step (60 copies of the cache a step at SmolLM2's 30 layers)."""
    model, _ = tiny("llama")
    config, params = unrolled(model.config, model.params)
    b, prompt, new = 3, 8, 8
    ids = jnp.ones((b, prompt), jnp.int32)
    sampling = dict(temperature=jnp.float32(1.0), top_k=jnp.int32(0), top_p=jnp.float32(1.0))
    eos = jnp.asarray([3], jnp.int32)
    state = _prefill(config, params, ids, jnp.ones_like(ids), eos, sampling, jax.random.PRNGKey(0),
                     max_new_tokens=new, cache_len=prompt + new - 1, greedy=True, output_logits=False)
    hlo = _decode.jitted(config).lower(config, params, state, jnp.int32(new), eos, jnp.int32(0), sampling,
                                       greedy=True).compile().as_text()
    cache_elements = b * config.num_kv_heads * (prompt + new - 1) * config.head_dim
    copied = [line for line in hlo.splitlines() if re.search(r"= \w+\[([\d,]+)\]\S* (copy|transpose)\(", line)
              and math.prod(int(n) for n in re.search(r"\[([\d,]+)\]", line).group(1).split(",")) == cache_elements]
    assert not copied, copied[:2]


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("vocab, scale", [(200, 3.0), (4000, 3.0), (4000, 0.3)])
def test_temperature_top_k_top_p_filter_like_transformers(vocab, scale):
    """A vocabulary under NUCLEUS_CANDIDATES, and over it with a peaked (the nucleus inside the top 256) and a flat
    distribution (the nucleus beyond it: the whole sort); top-k under and over 256."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = np.random.default_rng(0).normal(size=(4, vocab)).astype(np.float32) * scale
    for temperature, k, p in [(1.0, 0, 0.9), (0.7, 10, 1.0), (1.5, 50, 0.6), (1.0, 0, 0.05), (0.5, 3, 0.99),
                              (1.0, 1000, 0.9), (1.0, 300, 1.0)]:
        ref = torch.tensor(logits)
        ref = TemperatureLogitsWarper(temperature)(None, ref)
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = np.asarray(jax.jit(_filter_logits)(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(k),
                                         jnp.float32(p)))
        kept = np.isfinite(ref.numpy())
        assert (np.isfinite(ours) == kept).all(), (temperature, k, p)
        np.testing.assert_allclose(ours[kept], ref.numpy()[kept], rtol=1e-6)


@pytest.mark.parametrize("scale, top_k, tie", [(3.0, 0, False), (0.3, 0, False), (3.0, 40, False), (3.0, 300, False),
                                            (0.3, 256, True)])
def test_draws_follow_the_filtered_distribution(scale, top_k, tie):
    """Sampled tokens over many rows of the same logits against the filtered softmax, the threshold from the top 256
    (peaked, top-k under 256) or from the whole vocabulary (flat, top-k over 256, or top-k 256 with the 257th logit
    tied with the 256th): the mass of each twentieth of the distribution (tokens by probability)."""
    vocab, rows, parts = 1000, 10000, 20
    row = np.random.default_rng(1).normal(size=vocab).astype(np.float32) * scale
    if tie:  # the 257th largest logit equals the 256th: top-k 256 keeps both
        order = np.argsort(-row)
        row[order[256]] = row[order[255]]
    logits = jnp.asarray(np.tile(row, (rows, 1)))
    sampling = dict(temperature=jnp.float32(0.8), top_k=jnp.int32(256 if tie else top_k),
                    top_p=jnp.float32(1.0 if tie else 0.9))
    filtered = np.asarray(_filter_logits(logits[:1], sampling["temperature"], sampling["top_k"],
                                         sampling["top_p"]))[0]
    want = np.exp(filtered - filtered.max())
    want /= want.sum()
    drawn = np.asarray(jax.jit(_next_token, static_argnums=4)(logits, jax.random.PRNGKey(0), 0, sampling, False))
    assert np.isfinite(filtered[drawn]).all()
    if tie:  # kept, and drawn ~39 times in expectation
        assert np.isfinite(filtered[order[256]]) and (drawn == order[256]).any()
    by_rank = np.argsort(-want)
    part = np.empty(vocab, int)
    part[by_rank] = np.minimum((np.cumsum(want[by_rank]) - want[by_rank]) * parts, parts - 1).astype(int)
    seen = np.bincount(part[drawn], minlength=parts) / rows
    expected = np.bincount(part, weights=want, minlength=parts)
    assert 0.5 * np.abs(seen - expected).sum() < 0.05, (scale, top_k, tie)  # total variation; noise ~0.02


def test_sampling_with_a_seed_is_reproducible():
    model, _ = tiny("llama")
    model = model.replace(params={**model.params, "embed_tokens": model.params["embed_tokens"] * 0.05})  # flatter
    kwargs = dict(temperature=0.9, top_k=40, top_p=0.95, eos_token_id=())
    a = generate(model, PROMPT_IDS, NEW, seed=3, **kwargs).tokens
    assert a == generate(model, PROMPT_IDS, NEW, seed=3, **kwargs).tokens
    assert a != generate(model, PROMPT_IDS, NEW, seed=4, **kwargs).tokens
    greedy = generate(model, PROMPT_IDS, NEW, eos_token_id=()).tokens
    assert a != greedy
    assert generate(model, PROMPT_IDS, NEW, temperature=1.0, top_k=1, seed=5, eos_token_id=()).tokens == greedy
    assert generate(model, PROMPT_IDS, NEW, temperature=1.0, top_p=1e-6, seed=6, eos_token_id=()).tokens == greedy


# ----------------------------------------------------------------------------------------------------------------
# EOS, stop sequences, bad input


def test_eos_ends_each_row_on_its_own():
    model, _ = tiny("llama")
    free = generate(model, PROMPT_IDS, NEW, eos_token_id=())
    eos = free.tokens[0][4]  # a token row 0 produces: make it the EOS
    out = generate(model, PROMPT_IDS, NEW, eos_token_id=eos)
    for row, toks in enumerate(free.tokens):
        cut = toks.index(eos) if eos in toks else len(toks)
        assert out.tokens[row] == toks[:cut]
        assert out.finish_reasons[row] == ("eos" if eos in toks else "length")


def test_stop_sequences_cut_the_text_and_end_decoding_early(smollm2):
    prompts = ["def fibonacci(n):", "List three colours:\n1."]
    free = generate(smollm2, prompts, 48)
    out = generate(smollm2, prompts, 48, stop=["\n"], stop_check_every=8)
    for row, text in enumerate(free.texts):
        assert "\n" in text
        assert out.texts[row] == text[:text.index("\n")]
        assert out.finish_reasons[row] == "stop"
        toks = out.tokens[row]
        assert toks == free.tokens[row][:len(toks)] and len(toks) < 48
        assert "\n" in smollm2.tokenizer.decode(toks) and "\n" not in smollm2.tokenizer.decode(toks[:-1])


def test_bad_input_is_refused_up_front(smollm2):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(smollm2, ["Hello", ""], 4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], 4)
    with pytest.raises(ValueError, match="max_position_embeddings=2048"):
        generate(model, PROMPT_IDS, 2040)
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            generate(model, PROMPT_IDS, 4, temperature=1.0, top_p=top_p)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPT_IDS, 0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["text"], 4)
    with pytest.raises(ValueError, match="no chat template"):
        generate(smollm2.replace(tokenizer=_without_chat_template(smollm2.tokenizer)), ["hi"], 4, chat=True)


def _without_chat_template(tok):
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = None
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Generative evaluation (GSM8K format)

GSM8K_ITEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 1,200 pens. 200 are sold. How many are left?",
     "answer": "1,200 - 200 = <<1200-200=1000>>1,000 pens are left.\n#### 1,000"},
    {"question": "Sara reads 5 pages a day for 6 days. How many pages does she read?",
     "answer": "She reads 5 * 6 = <<5*6=30>>30 pages.\n#### 30"},
]


def _jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return str(path)


def test_normalise_and_answer_extractors():
    assert normalise("  Paris.\n") == "paris"
    assert normalise("Yes!?") == "yes"
    assert first_number("It costs $1,234.50 in total.") == "1234.5"
    assert first_number("about -3 degrees, then 5") == "-3"
    assert first_number("72.00") == "72" and first_number("none") == ""
    assert gsm8k_answer(GSM8K_ITEMS[1]["answer"]) == "1000"
    assert gsm8k_answer("so 3 + 4 = 7 apples.\n#### 7.\n\nQuestion") == "7"
    assert gsm8k_answer("First 3 + 4 = 7, so the answer is 7.") == "7"  # no marker: the last number


def test_gsm8k_items_from_a_local_file(tmp_path):
    task = GSM8K.replace(source=_jsonl(tmp_path / "test.jsonl", GSM8K_ITEMS),
                         fewshot_source=_jsonl(tmp_path / "train.jsonl", GSM8K_ITEMS[::-1]), num_fewshot=2)
    items = load_generative_items(task)
    assert [it.reference for it in items] == ["7", "1000", "30"]
    first = items[0].prompt
    assert first.startswith("Question: " + GSM8K_ITEMS[2]["question"] + "\nAnswer: " + GSM8K_ITEMS[2]["answer"]
                            + "\n\nQuestion: " + GSM8K_ITEMS[1]["question"])
    assert first.endswith("\n\nQuestion: " + GSM8K_ITEMS[0]["question"] + "\nAnswer:")
    bad = _jsonl(tmp_path / "bad.jsonl", [GSM8K_ITEMS[0], {"question": "no answer here"}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: missing field 'answer'"):
        load_generative_items(task.replace(source=bad, num_fewshot=0))
    no_number = _jsonl(tmp_path / "nonum.jsonl", [{"question": "q", "answer": "#### none"}])
    with pytest.raises(TaskFileError, match=r"nonum.jsonl:1: the reference gives no answer"):
        load_generative_items(task.replace(source=no_number, num_fewshot=0))


def test_generative_evaluation_scores_greedy_continuations(smollm2, tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", GSM8K_ITEMS)
    task = GSM8K.replace(source=path, fewshot_source=path, num_fewshot=1)
    result = evaluate_generative(smollm2, task, max_new_tokens=24, batch_size=3)
    assert result["n"] == 3
    items = load_generative_items(task)
    direct = generate(smollm2, [it.prompt for it in items], 24, stop=task.stop, prompt_bucket=64).texts
    for sample, text, item in zip(result["samples"], direct, items):
        assert sample["continuation"] == text and "Question:" not in text
        assert sample["answer"] == normalise(gsm8k_answer(text))
        assert sample["correct"] == (sample["answer"] == item.reference)
    assert result["exact_match"] == np.mean([s["correct"] for s in result["samples"]])
    # the first item's few-shot example is itself, so the model can copy its answer
    assert result["samples"][0]["correct"]
