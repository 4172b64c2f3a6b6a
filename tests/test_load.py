"""Checkpoint import: Hugging Face folders (safetensors single/sharded, .bin), GGUF, the embedded model, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import streamline_jax as sj
from conftest import rel_err, shared_data
from reference import torch_forward, torch_model
from streamline_jax.loading import CheckpointError, unpermute_rows
from streamline_jax.models.config import ModelConfig, UnsupportedArchitectureError
from tiny import CONFIGS, LLAMA_UNTIED, make_batch, tiny_gguf


def save_reference(config: ModelConfig, folder, **kwargs):
    model = torch_model(config)
    model.save_pretrained(folder, **kwargs)
    return model


def assert_same_logits(model, ref_model):
    ids, mask = make_batch(padding="right")
    ref_logits, _ = torch_forward(ref_model, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))
    ours = np.asarray(sj.forward(model, ids, mask))
    real = mask.astype(bool)
    assert rel_err(ours[real], ref_logits[real]) <= 1e-4


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama_bias", "opt_350m_style"])
def test_safetensors_folder(tmp_path, name):
    ref = save_reference(CONFIGS[name], tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = sj.load(tmp_path)
    assert model.config.num_layers == CONFIGS[name].num_layers
    assert_same_logits(model, ref)


def test_sharded_safetensors_with_index(tmp_path):
    ref = save_reference(CONFIGS["llama_mha_untied"], tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(sj.load(tmp_path), ref)


def test_pytorch_bin_checkpoint(tmp_path):
    config = CONFIGS["opt_125m_style"]
    ref = torch_model(config)
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_logits(sj.load(tmp_path), ref)


def test_bfloat16_checkpoint_loads(tmp_path):
    ref = torch_model(CONFIGS["llama_gqa_tied"]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    model = sj.load(tmp_path, dtype="bfloat16")
    q = model.params["segments"]["seg_0"]["self_attn"]["q_proj"]["kernel"]
    assert str(q.dtype) == "bfloat16"
    w = ref.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(q[1], np.float32).reshape(64, 64), w.T)


def _rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_reference(CONFIGS["llama_bias"], tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.2.mlp.up_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.2\.mlp\.up_proj\.bias"):
        sj.load(tmp_path)


def test_extra_tensor_is_named(tmp_path):
    save_reference(CONFIGS["llama_gqa_tied"], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra_proj\.weight'"):
        sj.load(tmp_path)


def test_tensor_for_a_layer_past_the_config_is_named(tmp_path):
    save_reference(CONFIGS["llama_gqa_tied"], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.7.input_layernorm.weight": np.ones(64, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.input_layernorm\.weight.*layer 7"):
        sj.load(tmp_path)


def test_misshapen_tensor_is_named(tmp_path):
    save_reference(CONFIGS["opt_125m_style"], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.decoder.layers.1.fc1.weight": np.zeros((95, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.1\.fc1\.weight.*\(95, 64\).*\(96, 64\)"):
        sj.load(tmp_path)


def test_missing_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sj.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        sj.load(tmp_path / "nope.gguf")


def test_unknown_architecture_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 8, "hidden_size": 4}))
    with pytest.raises(UnsupportedArchitectureError, match=r"bert.*supported"):
        sj.load(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not fetch hub model 'nobody/no-such-model'"):
        sj.load("nobody/no-such-model")


def test_unpermute_inverts_llama_cpp_permutation():
    def llama_cpp_permute(w, n_head):  # as in llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 8), 8), w)


# ---- the real model: SmolLM2-135M-Instruct from the embedded GGUF ----------------------------------------------


def test_smollm2_config_from_gguf(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and "lm_head" not in smollm2.params
    assert smollm2.num_params == 134_515_008
    assert smollm2.tokenizer is not None and smollm2.tokenizer.eos_token_id == c.eos_token_id == 2


def test_smollm2_matches_transformers_on_a_padded_batch(smollm2, smollm2_torch):
    tok = smollm2.tokenizer
    texts = ["The capital of France is Paris, and the capital of Germany is", "Hello", "One two three four"]
    batch = tok(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_logits, ref_hidden = torch_forward(smollm2_torch, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))
    real = mask.astype(bool)
    assert rel_err(np.asarray(sj.forward(smollm2, ids, mask))[real], ref_logits[real]) <= 1e-4
    hidden = np.asarray(sj.hidden_states(smollm2, ids, mask))
    assert hidden.shape == (31,) + ids.shape + (576,)
    for i in (0, 1, 10, 29):
        assert rel_err(hidden[i][real], ref_hidden[i][real]) <= 1e-4


def _windows_nll(logits_fn, ids, window, count, batch=4):
    total, n = 0.0, 0
    wins = ids[: window * count].reshape(count, window)
    for i in range(0, count, batch):
        chunk = wins[i:i + batch]
        logits = logits_fn(chunk).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        tgt = chunk[:, 1:]
        total -= np.take_along_axis(logp[:, :-1], tgt[..., None], -1).sum()
        n += tgt.size
    return math.exp(total / n)


def test_smollm2_wikitext_perplexity_matches_transformers(smollm2, smollm2_torch):
    """First 4 windows of 1024 tokens of WikiText-2 test: within 0.1% of transformers (test_evaluate checks the
    evaluation's own windows)."""
    text = "\n".join(shared_data("wikitext-2-raw", "wiki.test.raw").read_text().splitlines())
    ids = np.asarray(smollm2.tokenizer(text[:50_000]).input_ids)
    assert ids.size >= 4 * 1024
    ours = _windows_nll(lambda x: np.asarray(sj.forward(smollm2, x)), ids, 1024, 4)
    with torch.no_grad():
        ref = _windows_nll(lambda x: smollm2_torch(torch.tensor(x)).logits.numpy(), ids, 1024, 4)
    assert abs(ours / ref - 1) <= 1e-3, (ours, ref)
    assert 10 < ours < 60


# ---- the GGUF tokenizer, built from the file's metadata without torch ------------------------------------------


@pytest.fixture(scope="module")
def gguf_tokenizers():
    """(ours, transformers' own GGUF tokenizer) for the embedded SmolLM2 GGUF."""
    from transformers import AutoTokenizer

    from streamline_jax.loading import embedded_gguf, gguf_tokenizer

    path = embedded_gguf("smollm2-135m")
    return gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_gguf_tokenizer_matches_transformers_on_wikitext(gguf_tokenizers):
    ours, ref = gguf_tokenizers
    text = "\n".join(shared_data("wikitext-2-raw", "wiki.test.raw").read_text().splitlines())
    ids = ours(text).input_ids
    assert len(ids) > 250_000 and ids == ref(text).input_ids
    assert ours.decode(ids[:2000]) == ref.decode(ids[:2000])


def test_gguf_tokenizer_matches_transformers_on_piqa(gguf_tokenizers):
    from streamline_jax.tasks import get_task, load_items

    shared_data("piqa", "valid.jsonl")
    ours, ref = gguf_tokenizers
    items = load_items(get_task("piqa"))
    strings = [s for it in items for s in (*it.contexts, *it.continuations)]
    strings += [ctx + cont for it in items for ctx, cont in zip(it.contexts, it.continuations)]
    assert len(strings) == 6 * 1838  # per item: two contexts, two continuations, and each whole request
    assert ours(strings).input_ids == ref(strings).input_ids


def test_gguf_tokenizer_matches_transformers_on_chat_and_special_tokens(gguf_tokenizers):
    ours, ref = gguf_tokenizers
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref) == 49152
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello  there,\n friend"},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Ça va ? 😀 <|im_end|>"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            kwargs = {"add_generation_prompt": generation_prompt}
            assert ours.apply_chat_template(messages, tokenize=False, **kwargs) == \
                ref.apply_chat_template(messages, tokenize=False, **kwargs)
            assert list(ours.apply_chat_template(messages, **kwargs)["input_ids"]) == \
                list(ref.apply_chat_template(messages, **kwargs)["input_ids"])
    text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
    assert ours(text).input_ids == ref(text).input_ids
    assert ours.decode(ours(text).input_ids, skip_special_tokens=True) == \
        ref.decode(ref(text).input_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_gguf_loads_without_importing_torch():
    """The embedded model's GGUF (weights and tokenizer) loads in a process that never imports torch."""
    import subprocess
    import sys

    code = ("import sys, streamline_jax as sj\n"
            "from streamline_jax.loading import embedded_gguf\n"
            "model = sj.load(str(embedded_gguf('smollm2-135m')))\n"
            "print(model.tokenizer('Hello world').input_ids, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[19556, 905] False"


def test_gguf_without_tokenizer_metadata_loads_with_no_tokenizer(tmp_path):
    model = sj.load(tiny_gguf(tmp_path / "tiny.gguf", LLAMA_UNTIED))
    assert model.tokenizer is None and model.config.num_layers == LLAMA_UNTIED.num_layers


@pytest.mark.slow
def test_embedded_conversion_keeps_a_whole_folder_another_process_wrote_meanwhile(tmp_path, monkeypatch):
    """Parallel test workers (or two runs) converting the embedded GGUF into one cache at once: the writer that
    finds the folder written when it comes to move its own in keeps that one, fails nothing and leaves no temp."""
    import os
    import shutil
    from pathlib import Path

    from streamline_jax import loading

    theirs = loading.embedded_hf_folder("smollm2-135m", cache=tmp_path / "theirs")
    (theirs / "written-by").write_text("the other process")
    target = tmp_path / "cache" / "smollm2-135m"
    real_replace = os.replace

    def other_writer_finishes_first(src, dst):
        if Path(dst) == target:  # the other writer's folder lands just before ours: our rename then fails
            shutil.copytree(theirs, dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", other_writer_finishes_first)
    assert loading.embedded_hf_folder("smollm2-135m", cache=tmp_path / "cache") == target
    assert (target / "written-by").read_text() == "the other process"
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]
