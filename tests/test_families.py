"""Architectures beyond Llama and OPT (see streamline_jax/models/families.py): GGUF files as llama.cpp lays them out
(checked against transformers' own GGUF loader), Llama-3.1 rope_freqs, bad GGUF input, and Hugging Face export of
Qwen models loading as their own class. Forward parity is in test_models.py, generation in test_generate.py,
training in test_train.py."""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest
import torch
import transformers

import streamline_jax as sj
from conftest import rel_err
from reference import params_from_torch, torch_forward, torch_model
from streamline_jax import export, pruning
from streamline_jax.checkpoint import CheckpointError
from streamline_jax.models.config import ModelConfig, UnsupportedArchitectureError, from_hf_config
from streamline_jax.models.layers import rope_inv_freq
from streamline_jax.models.model import Model, forward
from streamline_jax.sharding import make_mesh
from tiny import CONFIGS, make_batch

# Hugging Face module names -> llama.cpp's GGUF tensor names (convert_hf_to_gguf.py / gguf-py tensor_mapping.py)
GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}
GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def llama_cpp_permute(w, n_head):  # LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(config: ModelConfig) -> np.ndarray:
    """LlamaModel.generate_extra_tensors in llama.cpp's converter: per-frequency divisors of Llama-3 scaling."""
    s = dict(config.rope_scaling)
    dim, base = config.head_dim, config.rope_theta
    factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                              s["original_max_position_embeddings"])
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(path, config: ModelConfig, ref, arch: str, extra_tensors=()):
    """`ref`'s weights as llama.cpp's converter writes them for `arch` (float32): q/k rows permuted for `llama`
    only, `rope_freqs` for Llama-3 rope scaling, no output.weight for a tied head."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_layers)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if config.rope_scaling:
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    for name, t in ref.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m:
            layer, module, kind = m.groups()
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj") and kind == "weight":
                a = llama_cpp_permute(a, config.num_heads if module.endswith("q_proj") else config.num_kv_heads)
            w.add_tensor(f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.{kind}", a)
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            w.add_tensor(GGUF_TOP_NAMES[name], a)
    for name, a in extra_tensors:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_against_gguf_loader(path, ref):
    """transformers' GGUF loader reads `path` back as `ref` (the file holds the model), and ours loads it with its
    logits, left-padded; our loaded model."""
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32).eval()
    assert type(hf_gguf).__name__ == type(ref).__name__
    ids, mask = make_batch(padding="left")
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ref_logits, _ = torch_forward(hf_gguf, ids, mask, positions)
    orig_logits, _ = torch_forward(ref, ids, mask, positions)
    real = mask.astype(bool)
    assert rel_err(ref_logits[real], orig_logits[real]) <= 1e-5
    ours = sj.load(path)
    assert rel_err(np.asarray(sj.forward(ours, ids, mask))[real], ref_logits[real]) <= 1e-4
    return ours


GGUF_CASES = {
    "llama": (CONFIGS["llama_gqa_tied"], "llama"),
    "qwen2": (CONFIGS["qwen2_untied"], "qwen2"),
    # Qwen3's head_dim (128 in every released size) differs from hidden_size / num_heads
    "qwen3": (CONFIGS["qwen3"].replace(head_dim=128), "qwen3"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_matches_transformers_gguf_loader(tmp_path, case):
    config, arch = GGUF_CASES[case]
    ref = torch_model(config)
    path = write_gguf(tmp_path / "model.gguf", config, ref, arch)
    ours = check_against_gguf_loader(path, ref)
    assert ours.config.model_type == config.model_type and ours.config.head_dim == config.head_dim
    streamed = sj.load(path, mesh=make_mesh(1, 1, 1))  # the streaming load reads the same sources
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                            ours.params, streamed.params)))


def write_gemma_gguf(path, config: ModelConfig, ref, arch: str):
    """`ref`'s weights as llama.cpp's Gemma2Model / Gemma3Model converters write them (float32): names from gguf-py's
    tensor map, every `*norm.weight` with the +1 offset added, no output.weight for the tied head, metadata as they
    write it (no query_pre_attn_scalar, no layer types: llama.cpp derives both)."""
    import gguf

    hf = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_vocab_size(config.vocab_size)  # the converter's tokenizer gives it; this file has none
    w.add_sliding_window(hf.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hf.attn_logit_softcapping)
        w.add_final_logit_softcapping(hf.final_logit_softcapping)
    else:
        w.add_rope_freq_base(config.rope_theta)
        if config.rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(dict(config.rope_scaling)["factor"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3,
                                     config.num_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight":
            continue
        a = t.detach().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            a = a + 1
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# head_dim 256: llama.cpp (and so a GGUF) scales queries by head_dim ** -0.5, transformers' GGUF loader by its
# default query_pre_attn_scalar (256); Gemma 2's soft-caps at transformers' defaults (its GGUF loader skips them)
GEMMA_GGUF_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=256, max_position_embeddings=64,
                     query_pre_attn_scalar=256, sliding_window=4, hidden_activation="gelu_pytorch_tanh")
GEMMA_GGUF_CASES = {
    "gemma2": (dict(GEMMA_GGUF_HF, model_type="gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
               "gemma2"),
    "gemma3": (dict(GEMMA_GGUF_HF, model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=10000.0),
               "gemma3"),
}


@pytest.mark.parametrize("case", GEMMA_GGUF_CASES)
def test_gemma_gguf_matches_transformers_gguf_loader(tmp_path, case):
    hf, arch = GEMMA_GGUF_CASES[case]
    config = from_hf_config(hf)
    ref = torch_model(config)
    path = write_gemma_gguf(tmp_path / "model.gguf", config, ref, arch)
    ours = check_against_gguf_loader(path, ref)
    assert ours.config.replace(rms_norm_eps=1e-6) == config  # GGUF keeps the epsilon as float32
    streamed = sj.load(path, mesh=make_mesh(1, 1, 1))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                            ours.params, streamed.params)))


def test_gemma3_gguf_keeps_the_global_rope_scaling(tmp_path):
    """A 4b-style Gemma 3 GGUF (linear rope scaling on the global layers): transformers' GGUF loader drops the
    scaling, so this compares against the Hugging Face model the file was written from."""
    hf = dict(GEMMA_GGUF_CASES["gemma3"][0], rope_scaling={"rope_type": "linear", "factor": 8.0})
    config = from_hf_config(hf)
    ref = torch_model(config)
    ours = sj.load(write_gemma_gguf(tmp_path / "model.gguf", config, ref, "gemma3"))
    assert ours.config.replace(rms_norm_eps=1e-6) == config
    assert dict(ours.config.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    ids, mask = make_batch(padding="right", length=40)
    ref_logits, _ = torch_forward(ref, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))
    real = mask.astype(bool)
    ours_logits = np.asarray(sj.forward(ours, ids, mask))[real]
    assert rel_err(ours_logits, ref_logits[real]) <= 1e-4
    unscaled = np.asarray(sj.forward(ours.replace(config=ours.config.replace(rope_scaling=None)), ids, mask))
    assert rel_err(unscaled[real], ref_logits[real]) > 1e-3


def test_qwen_gguf_is_not_unpermuted(tmp_path):
    """llama.cpp permutes q/k rows for the llama architecture only: a Qwen2 GGUF's rows are Hugging Face's."""
    config, arch = GGUF_CASES["qwen2"]
    ref = torch_model(config)
    ours = sj.load(write_gguf(tmp_path / "model.gguf", config, ref, arch))
    q = np.asarray(ours.params["segments"]["seg_0"]["self_attn"]["q_proj"]["kernel"][0])
    np.testing.assert_array_equal(q.reshape(config.hidden_size, -1).T,
                                  ref.model.layers[0].self_attn.q_proj.weight.detach().numpy())


def test_llama31_gguf_with_rope_freqs(tmp_path):
    config = CONFIGS["llama3_rope_scaling"].replace(rope_scaling=tuple(sorted(LLAMA31_ROPE.items())),
                                                    max_position_embeddings=16384)
    ref = torch_model(config)
    ours = sj.load(write_gguf(tmp_path / "model.gguf", config, ref, "llama"))
    assert dict(ours.config.rope_scaling) == LLAMA31_ROPE
    ids, mask = make_batch(padding="right", length=40)
    ref_logits, _ = torch_forward(ref, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))
    real = mask.astype(bool)
    assert rel_err(np.asarray(sj.forward(ours, ids, mask))[real], ref_logits[real]) <= 1e-4
    # the scaling read back changes the low frequencies as Llama-3.1's does (short tiny prompts barely show it)
    scaled, plain = rope_inv_freq(ours.config), rope_inv_freq(ours.config.replace(rope_scaling=None))
    np.testing.assert_allclose(plain / scaled, llama3_rope_freqs(config), rtol=1e-5)
    assert (plain / scaled).max() == 8.0


def test_rope_freqs_of_another_scaling_are_refused(tmp_path):
    config = CONFIGS["llama3_rope_scaling"].replace(rope_scaling=tuple(sorted(LLAMA31_ROPE.items())))
    ref = torch_model(config)
    path = write_gguf(tmp_path / "model.gguf", config, ref, "llama")
    # a file whose divisors are not Llama-3's shape
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    data = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    data[:] = np.linspace(1, 3, data.size)
    del reader
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        sj.load(path)


def test_unexpected_gguf_tensor_is_named(tmp_path):
    config, arch = GGUF_CASES["qwen2"]
    path = write_gguf(tmp_path / "model.gguf", config, torch_model(config), arch,
                      extra_tensors=[("blk.0.attn_qkv.weight", np.zeros((4, 64), np.float32))])
    with pytest.raises(CheckpointError, match=r"unexpected GGUF tensor 'blk\.0\.attn_qkv\.weight'.*qwen2"):
        sj.load(path)


def test_unknown_gguf_architecture_names_the_supported_ones(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2'.*'llama'.*'qwen2'.*'qwen3'"):
        sj.load(tmp_path / "m.gguf")


class _Tokenizer:
    def save_pretrained(self, folder):
        pass


HF_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM"}


@pytest.mark.parametrize("name,replacement", [("qwen2_untied", "ffn"), ("qwen3", "layer"), ("qwen2_tied", "none"),
                                              ("gemma2", "ffn"), ("gemma2", "layer"), ("gemma3", "layer"),
                                              ("gemma3", "ffn"), ("gemma3", "none")])
def test_export_loads_as_its_own_class_with_equal_logits(tmp_path, name, replacement):
    config = CONFIGS[name]
    model = Model(config, params_from_torch(config, torch_model(config)), _Tokenizer())
    pruned = pruning.prune(model, 1, 1, replacement)
    if replacement != "none":  # a trained block is no copy of a layer
        key = next(k for k, s in zip(pruned.params["segments"], pruned.config.layout) if s.kind != "layers")
        pruned.params["segments"][key] = jax.tree.map(lambda v: v * 1.3 + 0.01, pruned.params["segments"][key])
    folder = export.export_hf(pruned, tmp_path / "hf")
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == [HF_CLASSES[config.model_type]]
    if config.layer_types:  # the pruned stack's attention types, each where its layer went
        assert written["layer_types"] == list(pruned.config.layer_types)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(hf).__name__ == HF_CLASSES[config.model_type]
    ids = np.random.RandomState(0).randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(np.asarray(forward(pruned, ids)), ref) < 1e-5
    assert rel_err(np.asarray(forward(model, ids)), ref) > 1e-3
