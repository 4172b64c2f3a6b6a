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
from test_models import CONFIGS, make_batch


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
    """First 16 windows of 1024 tokens of WikiText-2 test: within 0.1% of transformers."""
    text = "\n".join(shared_data("wikitext-2-raw", "wiki.test.raw").read_text().splitlines())
    ids = np.asarray(smollm2.tokenizer(text[:200_000]).input_ids)
    assert ids.size >= 16 * 1024
    ours = _windows_nll(lambda x: np.asarray(sj.forward(smollm2, x)), ids, 1024, 16)
    with torch.no_grad():
        ref = _windows_nll(lambda x: smollm2_torch(torch.tensor(x)).logits.numpy(), ids, 1024, 16)
    assert abs(ours / ref - 1) <= 1e-3, (ours, ref)
    assert 10 < ours < 60
