"""The supported architectures, each described once: its Hugging Face `model_type` and class, its llama.cpp GGUF
name and conventions, the block family that runs it, and the `ModelConfig` flags it sets.

A block family ("llama": rotary attention, RMSNorm, gated MLP; "opt": learned positions, LayerNorm, fc1/fc2) is
one decoder implementation with one checkpoint-name table; an architecture is a family plus flags (q/k/v bias,
o bias, q/k norm, sliding window, ...). Adding an architecture is an entry here plus its tests.

This module imports nothing from the rest of the package: config.py builds on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


class UnsupportedArchitectureError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Checkpoint names (Hugging Face) -> our parameter tree, one table per block family. Target paths are dot-separated
# keys in our tree; `layers.` means the decoder stack, indexed by the first regex group. Transforms: "R" reshape;
# "T<k>" transpose a [out, in] matrix, then reshape, where k is the number of leading parameter dims that come from
# `in`; "F" a flat [H*D] bias to [H, D].

LLAMA_RULES = (
    (r"model\.embed_tokens\.weight", "embed_tokens", "R"),
    (r"model\.norm\.weight", "final_norm.scale", "R"),
    (r"lm_head\.weight", "lm_head", "T1"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", r"layers.self_attn.\2_proj.kernel", "T1"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"layers.self_attn.\2_proj.bias", "F"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.self_attn.o_proj.kernel", "T2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", r"layers.self_attn.o_proj.bias", "R"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"layers.self_attn.\2_norm.scale", "R"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.mlp.\2_proj.kernel", "T1"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", r"layers.mlp.\2_proj.bias", "R"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm)\.weight", r"layers.\2.scale", "R"),
)

OPT_RULES = (
    (r"model\.decoder\.embed_tokens\.weight", "embed_tokens", "R"),
    (r"model\.decoder\.embed_positions\.weight", "embed_positions", "R"),
    (r"model\.decoder\.project_in\.weight", "project_in.kernel", "T1"),
    (r"model\.decoder\.project_out\.weight", "project_out.kernel", "T1"),
    (r"model\.decoder\.final_layer_norm\.weight", "final_norm.scale", "R"),
    (r"model\.decoder\.final_layer_norm\.bias", "final_norm.bias", "R"),
    (r"lm_head\.weight", "lm_head", "T1"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", r"layers.self_attn.\2_proj.kernel", "T1"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"layers.self_attn.\2_proj.bias", "F"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.weight", r"layers.self_attn.out_proj.kernel", "T2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.bias", r"layers.self_attn.out_proj.bias", "R"),
    (r"model\.decoder\.layers\.(\d+)\.(fc1|fc2)\.weight", r"layers.\2.kernel", "T1"),
    (r"model\.decoder\.layers\.(\d+)\.(fc1|fc2)\.bias", r"layers.\2.bias", "R"),
    (r"model\.decoder\.layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.weight", r"layers.\2.scale", "R"),
    (r"model\.decoder\.layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.bias", r"layers.\2.bias", "R"),
)

# Buffers some checkpoints carry that are not parameters.
IGNORED_TENSORS = (r".*rotary_emb\.inv_freq", r".*\.masked_bias", r".*attn\.bias$")

# GGUF tensor names (llama.cpp) -> Hugging Face names, for the llama block family.
LLAMA_GGUF_NAMES = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
)


# Gemma 2/3 (gguf-py's tensor_mapping for GEMMA2/GEMMA3): four norms per layer, `ffn_norm` being the one before
# the MLP (Hugging Face's pre_feedforward_layernorm, not Llama's post_attention_layernorm)
GEMMA_GGUF_NAMES = tuple((p, t) for p, t in LLAMA_GGUF_NAMES if not p.startswith(r"blk\.(\d+)\.ffn_norm")) + (
    (r"blk\.(\d+)\.post_attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
)


@dataclasses.dataclass(frozen=True)
class BlockFamily:
    """One decoder implementation and its checkpoint names."""

    name: str
    rules: tuple
    gguf_names: tuple = ()
    hf_prefix_fix: tuple[str, str] | None = None  # (prefix, replacement) for checkpoints saved without `model.`


BLOCK_FAMILIES = {
    "llama": BlockFamily("llama", LLAMA_RULES, LLAMA_GGUF_NAMES),
    "opt": BlockFamily("opt", OPT_RULES, hf_prefix_fix=("decoder.", "model.decoder.")),
}
FAMILIES = tuple(BLOCK_FAMILIES)


# --------------------------------------------------------------------------------------------------------------
# Architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One Hugging Face `model_type` as we run it.

    `from_hf(hf)` gives the `ModelConfig` fields particular to it (on top of the family's), raising
    `UnsupportedArchitectureError` for a config flag we do not implement; `to_hf(config)` the config.json keys
    particular to it.
    """

    model_type: str
    hf_class: str
    family: str
    from_hf: Callable[[dict], dict]
    to_hf: Callable[[Any], dict]
    gguf_name: str | None = None
    gguf_permutes_qk: bool = False  # llama.cpp's converter permutes q/k rows for the llama architecture only
    description: str = ""
    gguf_names: tuple = ()  # GGUF -> Hugging Face names where they differ from the block family's table
    gguf_norm_shift: float = 0.0  # llama.cpp stores Gemma's `*norm.weight` with the +1 offset added
    # (metadata getter, block_count, head_dim) -> the config.json keys particular to this architecture's GGUF;
    # None: the architecture reads only the shared keys and refuses rope scaling other than Llama-3's rope_freqs
    gguf_config: Callable[..., dict] | None = None


def _unsupported(model_type: str, key: str, value, expected) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{model_type}: config {key}={value!r} is not implemented (supported: {expected})")


def rope_fields(hf: dict, model_type: str) -> dict:
    """rope_theta and (Llama-3) rope_scaling from either transformers 4's or 5's config keys."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise _unsupported(model_type, "rope_scaling.rope_type", rope_type, "'default', 'llama3'")
    scaling = tuple(sorted((k, v) for k, v in rope.items() if k != "type")) if rope_type == "llama3" else None
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _require(hf: dict, model_type: str, key: str, default, allowed: tuple) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise _unsupported(model_type, key, value, ", ".join(repr(a) for a in allowed))


def _rope_to_hf(c) -> dict:
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {**dict(c.rope_scaling), "rope_theta": c.rope_theta}
    return {"rope_theta": c.rope_theta, "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
            "rope_parameters": rope}


def _llama_block_from_hf(hf: dict, model_type: str, act_key: str = "hidden_act") -> dict:
    """Fields every llama-block architecture reads the same way."""
    _require(hf, model_type, act_key, "silu", ("silu",))
    heads = hf["num_attention_heads"]
    return dict(
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        activation="silu",
        **rope_fields(hf, model_type),
    )


def _llama_block_to_hf(c) -> dict:
    return dict(intermediate_size=c.intermediate_size, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                rms_norm_eps=c.rms_norm_eps, hidden_act="silu", **_rope_to_hf(c))


def _llama_from_hf(hf):
    return dict(_llama_block_from_hf(hf, "llama"), attention_bias=hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False))


def _llama_to_hf(c):
    return dict(_llama_block_to_hf(c), attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)


def _mistral_from_hf(hf):
    return dict(_llama_block_from_hf(hf, "mistral"), sliding_window=hf.get("sliding_window"))


def _mistral_to_hf(c):
    return dict(_llama_block_to_hf(c), sliding_window=c.sliding_window)


def _no_sliding_window(hf, model_type):
    _require(hf, model_type, "use_sliding_window", False, (False,))
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise _unsupported(model_type, "layer_types", sorted(layer_types), "'full_attention' only")


def _qwen2_from_hf(hf):
    _no_sliding_window(hf, "qwen2")
    return dict(_llama_block_from_hf(hf, "qwen2"), qkv_bias=True)


def _qwen2_to_hf(c):
    return dict(_llama_block_to_hf(c), use_sliding_window=False, sliding_window=None,
                max_window_layers=c.num_layers)


def _qwen3_from_hf(hf):
    _no_sliding_window(hf, "qwen3")
    return dict(_llama_block_from_hf(hf, "qwen3"), attention_bias=hf.get("attention_bias", False), qk_norm=True)


def _qwen3_to_hf(c):
    return dict(_llama_block_to_hf(c), attention_bias=c.attention_bias, use_sliding_window=False,
                sliding_window=None, max_window_layers=c.num_layers)


GEMMA_LAYER_TYPES = ("full_attention", "sliding_attention")


def _gemma_from_hf(hf: dict, model_type: str, sliding_every: int) -> dict:
    """Gemma 2 and 3: the llama block with the +1 norm offset, sqrt(D) embedding scale, sandwich norms, GeGLU,
    query_pre_attn_scalar and per-layer sliding/full attention (default pattern: every `sliding_every`-th layer
    full)."""
    _require(hf, model_type, "hidden_activation", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",))
    _require(hf, model_type, "use_bidirectional_attention", False, (False, None))
    fields = _llama_block_from_hf({**hf, "hidden_act": "silu", "rope_scaling": None, "rope_parameters": None},
                                  model_type)
    n = hf["num_hidden_layers"]
    types = tuple(hf.get("layer_types") or ("sliding_attention" if (i + 1) % sliding_every else "full_attention"
                                            for i in range(n)))
    if set(types) - set(GEMMA_LAYER_TYPES) or len(types) != n:
        raise _unsupported(model_type, "layer_types", list(types), f"{n} of {GEMMA_LAYER_TYPES}")
    window = hf.get("sliding_window", 4096)
    if "sliding_attention" in types and not window:
        raise _unsupported(model_type, "sliding_window", window, "a window for the sliding_attention layers")
    return dict(fields, activation="gelu_tanh", norm_offset=1.0, embed_scale=True, sandwich_norms=True,
                attention_bias=hf.get("attention_bias", False),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                final_logit_softcap=hf.get("final_logit_softcapping"), layer_types=types,
                local_window=window)


def _gemma_to_hf(c) -> dict:
    return dict(intermediate_size=c.intermediate_size, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                rms_norm_eps=c.rms_norm_eps, hidden_activation="gelu_pytorch_tanh", attention_bias=c.attention_bias,
                query_pre_attn_scalar=c.query_pre_attn_scalar, final_logit_softcapping=c.final_logit_softcap,
                layer_types=list(c.layer_types), sliding_window=c.local_window)


def _gemma2_from_hf(hf):
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _unsupported("gemma2", "rope_scaling.rope_type", rope.get("rope_type", rope.get("type")), "'default'")
    theta = rope.get("rope_theta") or hf.get("rope_theta", 10000.0)
    return dict(_gemma_from_hf(hf, "gemma2", 2), rope_theta=float(theta), rope_scaling=None,
                attn_logit_softcap=hf.get("attn_logit_softcapping"))


def _gemma2_to_hf(c):
    return dict(_gemma_to_hf(c), attn_logit_softcapping=c.attn_logit_softcap, **_rope_to_hf(c))


GEMMA3_ROPE_TYPES = ("default", "linear")


def _gemma3_rope(hf: dict) -> dict:
    """Global layers: rope_theta and (4b and up) linear scaling; sliding layers: their own unscaled base. From
    transformers 4's keys (rope_theta, rope_local_base_freq, rope_scaling) or 5's (rope_parameters per layer type)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        local_type = local.get("rope_type", "default")
        if local_type != "default":
            raise _unsupported("gemma3_text", "rope_parameters.sliding_attention.rope_type", local_type, "'default'")
    else:
        full, local = dict(hf.get("rope_scaling") or params), {"rope_theta": hf.get("rope_local_base_freq")}
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in GEMMA3_ROPE_TYPES:
        raise _unsupported("gemma3_text", "rope_scaling.rope_type", kind, ", ".join(map(repr, GEMMA3_ROPE_TYPES)))
    scaling = (("factor", float(full["factor"])), ("rope_type", "linear")) if kind == "linear" else None
    return dict(rope_theta=float(full.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0),
                rope_scaling=scaling, local_rope_theta=float(local.get("rope_theta") or 10_000.0))


def _gemma3_from_hf(hf):
    # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it
    _require(hf, "gemma3_text", "attn_logit_softcapping", None, (None,))
    return dict(_gemma_from_hf(hf, "gemma3_text", hf.get("sliding_window_pattern") or 6), qk_norm=True,
                **_gemma3_rope(hf))


def _gemma3_to_hf(c):
    full = {"rope_type": "default", "rope_theta": c.rope_theta, **dict(c.rope_scaling or ())}
    local = {"rope_type": "default", "rope_theta": c.local_rope_theta}
    return dict(_gemma_to_hf(c), rope_parameters={"full_attention": full, "sliding_attention": local})


def _gemma_query_scalar(g, block_count: int, head_dim: int, big_layers: int) -> int:
    """GGUF has no query_pre_attn_scalar: llama.cpp takes head_dim, except hidden/heads for the 27B model (the
    one with `big_layers` layers), as released."""
    if block_count == big_layers:
        return g("embedding_length") // g("attention.head_count")
    return head_dim


def _gemma2_gguf(g, block_count, head_dim) -> dict:
    return dict(hidden_activation="gelu_pytorch_tanh", sliding_window=g("attention.sliding_window"),
                attn_logit_softcapping=g("attn_logit_softcapping"), final_logit_softcapping=g("final_logit_softcapping"),
                query_pre_attn_scalar=_gemma_query_scalar(g, block_count, head_dim, 46))


def _gemma3_gguf(g, block_count, head_dim) -> dict:
    """llama.cpp's Gemma 3: every 6th layer global, sliding layers on an unscaled rope of base 10000, the global
    layers' linear scaling (4b and up) in rope.scaling.*."""
    kind = g("rope.scaling.type")
    if kind not in (None, "none", "linear"):
        raise _unsupported("gemma3", "GGUF rope.scaling.type", kind, "none, 'linear'")
    scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))} if kind == "linear" else None
    return dict(hidden_activation="gelu_pytorch_tanh", sliding_window=g("attention.sliding_window"),
                sliding_window_pattern=6, rope_local_base_freq=10000.0, rope_scaling=scaling,
                final_logit_softcapping=g("final_logit_softcapping"),
                query_pre_attn_scalar=_gemma_query_scalar(g, block_count, head_dim, 62))


def _opt_from_hf(hf):
    _require(hf, "opt", "activation_function", "relu", ("relu",))
    _require(hf, "opt", "layer_norm_elementwise_affine", True, (True,))
    _require(hf, "opt", "_remove_final_layer_norm", False, (False,))
    heads = hf["num_attention_heads"]
    return dict(
        intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hf["hidden_size"] // heads,
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
        do_layer_norm_before=hf.get("do_layer_norm_before", True),
        enable_bias=hf.get("enable_bias", True),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        activation="relu",
    )


def _opt_to_hf(c):
    return dict(ffn_dim=c.intermediate_size, word_embed_proj_dim=c.embed_dim,
                do_layer_norm_before=c.do_layer_norm_before, enable_bias=c.enable_bias,
                activation_function="relu", layer_norm_elementwise_affine=True)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", "llama", _llama_from_hf, _llama_to_hf, gguf_name="llama",
                 gguf_permutes_qk=True, description="Llama-2/3/3.1, SmolLM2"),
    Architecture("mistral", "MistralForCausalLM", "llama", _mistral_from_hf, _mistral_to_hf,
                 description="Mistral-7B (GGUFs of it say `llama`)"),
    Architecture("qwen2", "Qwen2ForCausalLM", "llama", _qwen2_from_hf, _qwen2_to_hf, gguf_name="qwen2",
                 description="Qwen2, Qwen2.5"),
    Architecture("qwen3", "Qwen3ForCausalLM", "llama", _qwen3_from_hf, _qwen3_to_hf, gguf_name="qwen3",
                 description="Qwen3 (dense)"),
    Architecture("gemma2", "Gemma2ForCausalLM", "llama", _gemma2_from_hf, _gemma2_to_hf, gguf_name="gemma2",
                 description="Gemma 2", gguf_names=GEMMA_GGUF_NAMES, gguf_norm_shift=1.0, gguf_config=_gemma2_gguf),
    Architecture("gemma3_text", "Gemma3ForCausalLM", "llama", _gemma3_from_hf, _gemma3_to_hf, gguf_name="gemma3",
                 description="Gemma 3 text models (Gemma3ForCausalLM)", gguf_names=GEMMA_GGUF_NAMES,
                 gguf_norm_shift=1.0, gguf_config=_gemma3_gguf),
    Architecture("opt", "OPTForCausalLM", "opt", _opt_from_hf, _opt_to_hf, description="OPT-125m to 66b"),
)}
GGUF_ARCHITECTURES = {a.gguf_name: a for a in ARCHITECTURES.values() if a.gguf_name}


def supported_list() -> str:
    return ", ".join(f"{a.model_type} ({a.description})" for a in ARCHITECTURES.values())


def architecture(model_type: str | None) -> Architecture:
    """The architecture of a Hugging Face `model_type`; an error naming the supported ones for any other."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r}; supported: {supported_list()}") from None


def gguf_architecture(name: str | None) -> Architecture:
    try:
        return GGUF_ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {name!r}; supported: {', '.join(map(repr, GGUF_ARCHITECTURES))}"
        ) from None
