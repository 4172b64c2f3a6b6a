"""Full-size model shapes as frozen `ModelConfig`s, for memory plans and ahead-of-time compiles without weights.

The numbers are the published Hugging Face config.json values; `tests/test_plan.py` checks the parameter counts
against the published totals.
"""

from __future__ import annotations

import difflib

from .config import ModelConfig


def _llama(vocab, hidden, inter, layers, heads, kv, *, max_pos=4096, theta=10000.0, eps=1e-5, tied=False,
           scaling=None, model_type="llama", dtype="bfloat16"):
    return ModelConfig(family="llama", model_type=model_type, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       head_dim=hidden // heads, max_position_embeddings=max_pos, rope_theta=theta, rms_norm_eps=eps,
                       rope_scaling=scaling, tie_word_embeddings=tied, activation="silu", dtype=dtype)


def _qwen(model_type, vocab, hidden, inter, layers, heads, kv, *, head_dim=None, tied, max_pos):
    flags = {"qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}[model_type]
    return ModelConfig(family="llama", model_type=model_type, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       head_dim=head_dim or hidden // heads, max_position_embeddings=max_pos, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied, activation="silu", dtype="bfloat16", **flags)


def _gemma(model_type, vocab, hidden, inter, layers, heads, kv, *, window, max_pos, pattern, theta, **flags):
    """Gemma 2 (pattern 2: sliding, full, ...) and Gemma 3 (pattern 6: five sliding layers, then one full)."""
    types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    return ModelConfig(family="llama", model_type=model_type, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=256,
                       max_position_embeddings=max_pos, rope_theta=theta, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       activation="gelu_tanh", norm_offset=1.0, embed_scale=True, sandwich_norms=True,
                       query_pre_attn_scalar=256, layer_types=types, local_window=window, dtype="bfloat16",
                       bos_token_id=2, eos_token_id=1, pad_token_id=0, **flags)


LLAMA31_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def _opt(hidden, ffn, layers, heads):
    return ModelConfig(family="opt", model_type="opt", vocab_size=50272, hidden_size=hidden, intermediate_size=ffn,
                       num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                       max_position_embeddings=2048, word_embed_proj_dim=hidden, tie_word_embeddings=True,
                       activation="relu", dtype="float16", bos_token_id=2, eos_token_id=2, pad_token_id=1)


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, max_pos=8192, theta=100000.0, tied=True, dtype="float32"),
    "llama2-7b": _llama(32000, 4096, 11008, 32, 32, 32),
    "llama2-13b": _llama(32000, 5120, 13824, 40, 40, 40),
    "llama2-70b": _llama(32000, 8192, 28672, 80, 64, 8),
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, max_pos=8192, theta=500000.0),
    "llama3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, max_pos=131072, theta=500000.0, scaling=LLAMA31_ROPE),
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, 8, max_pos=32768, model_type="mistral").replace(
        sliding_window=4096),  # Mistral-7B-v0.1
    "qwen2.5-0.5b": _qwen("qwen2", 151936, 896, 4864, 24, 14, 2, tied=True, max_pos=32768),
    "qwen2.5-1.5b": _qwen("qwen2", 151936, 1536, 8960, 28, 12, 2, tied=True, max_pos=131072),
    "qwen2.5-7b": _qwen("qwen2", 152064, 3584, 18944, 28, 28, 4, tied=False, max_pos=131072),
    "qwen3-0.6b": _qwen("qwen3", 151936, 1024, 3072, 28, 16, 8, head_dim=128, tied=True, max_pos=40960),
    "qwen3-8b": _qwen("qwen3", 151936, 4096, 12288, 36, 32, 8, head_dim=128, tied=False, max_pos=40960),
    "gemma-2-2b": _gemma("gemma2", 256000, 2304, 9216, 26, 8, 4, window=4096, max_pos=8192, pattern=2,
                         theta=10000.0, attn_logit_softcap=50.0, final_logit_softcap=30.0),
    "gemma-3-1b": _gemma("gemma3_text", 262144, 1152, 6912, 26, 4, 1, window=512, max_pos=32768, pattern=6,
                         theta=1000000.0, qk_norm=True, local_rope_theta=10000.0),
    # the language model of gemma-3-4b (its vision tower is not loaded)
    "gemma-3-4b": _gemma("gemma3_text", 262208, 2560, 10240, 34, 8, 4, window=1024, max_pos=131072, pattern=6,
                         theta=1000000.0, qk_norm=True, local_rope_theta=10000.0,
                         rope_scaling=(("factor", 8.0), ("rope_type", "linear"))),
    "opt-1.3b": _opt(2048, 8192, 24, 32),
    "opt-2.7b": _opt(2560, 10240, 32, 32),
    "opt-6.7b": _opt(4096, 16384, 32, 32),
    "opt-13b": _opt(5120, 20480, 40, 40),
}

# Published totals (model cards / papers), for the parameter-count test.
PUBLISHED_PARAMS = {
    "smollm2-135m": 134.5e6, "llama2-7b": 6.74e9, "llama2-13b": 13.0e9, "llama2-70b": 69.0e9, "llama3-8b": 8.03e9,
    # Hugging Face's safetensors totals (Qwen3-0.6B's includes its tied head a second time: 751,632,384)
    "llama3.1-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512, "qwen3-0.6b": 751_632_384 - 151936 * 1024,
    "qwen3-8b": 8_190_735_360,
    # Gemma: Hugging Face's safetensors totals for 2-2b and 3-1b; for 3-4b's language model the Gemma 3 technical
    # report's Table 1 (675M embedding + 3,209M non-embedding parameters; the 417M vision encoder left out)
    "gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952, "gemma-3-4b": 675e6 + 3_209e6,
    "opt-1.3b": 1.32e9, "opt-2.7b": 2.65e9, "opt-6.7b": 6.66e9, "opt-13b": 12.9e9,
}


def preset(name: str) -> ModelConfig:
    """The preset called `name`; a clear error (with the nearest name) for an unknown one."""
    try:
        return PRESETS[name]
    except KeyError:
        near = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"unknown model preset {name!r}{hint} (known: {', '.join(PRESETS)})") from None
