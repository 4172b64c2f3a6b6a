"""The tests' one home for tiny random models: the configs they share (fewer shapes, fewer compiles), tiny random
Llama and OPT Hugging Face folders (with a tiny trained tokenizer) and tiny text, for whole runs in seconds (the command
line's tests and the README's commands), tiny GGUF files, and the batches fed to them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import transformers

from reference import params_from_torch, torch_model
from streamline_jax.models.config import ModelConfig, from_hf_config

WORDS = ("the cat dog sat on a mat and ran to house big small red blue tree river sun moon walked quickly slowly "
         "under over near far bird sang song happy sad green old new").split()

LLAMA = ModelConfig(family="llama", model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                    num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                    eos_token_id=1, bos_token_id=1)
OPT = ModelConfig(family="opt", model_type="opt", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                  num_heads=4, num_kv_heads=4, head_dim=16, word_embed_proj_dim=64, activation="relu",
                  max_position_embeddings=256, eos_token_id=1, bos_token_id=1)
# WikiText-2 is scored in windows of 1024 tokens
LLAMA_2K = dataclasses.replace(LLAMA, max_position_embeddings=2048)
# the multi-device, GGUF and planner tests' Llama: a head of its own
LLAMA_UNTIED = dataclasses.replace(LLAMA, tie_word_embeddings=False)

# Smaller still, for the training loop's many steps (tests/test_train.py, test_reliability.py, test_linear_fit.py)
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=6, num_heads=4, head_dim=8,
             max_position_embeddings=64)
SMALL_LLAMA = ModelConfig(family="llama", model_type="llama", num_kv_heads=2, **SMALL)
SMALL_OPT = ModelConfig(family="opt", model_type="opt", num_kv_heads=4, activation="relu", **SMALL)

# Every architecture variant at 3 layers, for parity with transformers (tests/test_models.py, test_families.py,
# test_load.py, test_sharding.py, test_export_gguf.py)
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, head_dim=16,
            max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
GEMMA_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=32,
                sliding_window=4, hidden_activation="gelu_pytorch_tanh")

CONFIGS = {
    "llama_gqa_tied": ModelConfig(family="llama", model_type="llama", num_kv_heads=2, **BASE),
    "llama_mha_untied": ModelConfig(family="llama", model_type="llama", num_kv_heads=4, tie_word_embeddings=False,
                                    **BASE),
    "llama3_rope_scaling": ModelConfig(family="llama", model_type="llama", num_kv_heads=2, rope_scaling=LLAMA3_ROPE,
                                       rope_theta=500000.0, tie_word_embeddings=False, **BASE),
    "llama_bias": ModelConfig(family="llama", model_type="llama", num_kv_heads=2, attention_bias=True,
                              mlp_bias=True, **BASE),
    "mistral": ModelConfig(family="llama", model_type="mistral", num_kv_heads=2, tie_word_embeddings=False, **BASE),
    "mistral_sliding_window": ModelConfig(family="llama", model_type="mistral", num_kv_heads=2, sliding_window=4,
                                          **BASE),
    "qwen2_tied": ModelConfig(family="llama", model_type="qwen2", num_kv_heads=2, qkv_bias=True,
                              rope_theta=1000000.0, **BASE),
    "qwen2_untied": ModelConfig(family="llama", model_type="qwen2", num_kv_heads=2, qkv_bias=True,
                                tie_word_embeddings=False, **BASE),
    # head_dim 24 != hidden_size / num_heads, as in Qwen3-0.6B (1024 / 16 heads, head_dim 128)
    "qwen3": ModelConfig(family="llama", model_type="qwen3", num_kv_heads=2, qk_norm=True,
                         **{**BASE, "head_dim": 24}),
    "qwen3_bias_untied": ModelConfig(family="llama", model_type="qwen3", num_kv_heads=4, qk_norm=True,
                                     attention_bias=True, tie_word_embeddings=False, **BASE),
    # Gemma: soft-caps small enough to bend tiny random scores and logits; a 4-slot window on 12-token rows;
    # query_pre_attn_scalar != head_dim; Gemma 3 with a scaled global rope and its own local rope base
    "gemma2": from_hf_config(dict(GEMMA_HF, model_type="gemma2", attn_logit_softcapping=0.05,
                                  final_logit_softcapping=1.0)),
    "gemma3": from_hf_config(dict(GEMMA_HF, model_type="gemma3_text", num_hidden_layers=4, sliding_window_pattern=3,
                                  rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1000000.0,
                                  rope_local_base_freq=100.0, tie_word_embeddings=False)),
    "opt_125m_style": ModelConfig(family="opt", model_type="opt", num_kv_heads=4, activation="relu", **BASE),
    "opt_350m_style": ModelConfig(family="opt", model_type="opt", num_kv_heads=4, activation="relu",
                                  word_embed_proj_dim=32, do_layer_norm_before=False, **BASE),
}

# One tiny model per family at 6 layers, for scoring, pruning and evaluation against transformers (test_score.py,
# test_prune.py, test_evaluate.py)
FAMILY_GEMMA_HF = dict(GEMMA_HF, num_hidden_layers=6)
FAMILIES = {
    "llama": ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                         num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5),
    "opt": ModelConfig(family="opt", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6, num_heads=4,
                       num_kv_heads=4, head_dim=16, word_embed_proj_dim=64, activation="relu", pad_token_id=1,
                       max_position_embeddings=64),
    "qwen2": ModelConfig(family="llama", model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True),
    "qwen3": ModelConfig(family="llama", model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_layers=6, num_heads=4, num_kv_heads=2, head_dim=24, qk_norm=True),
    # sliding layers 0, 2, 4 (window 4) and soft-caps that bend tiny random scores
    "gemma2": from_hf_config(dict(FAMILY_GEMMA_HF, model_type="gemma2", attn_logit_softcapping=0.05,
                                  final_logit_softcapping=1.0)),
    # layer_types s s f s s f; a local rope base of its own and a scaled global rope
    "gemma3": from_hf_config(dict(FAMILY_GEMMA_HF, model_type="gemma3_text", sliding_window_pattern=3, rope_theta=1e6,
                                  rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 8.0})),
}


def reference_pair(family):
    """A random transformers model (tests/reference.py) of FAMILIES[family] and our Model with the same weights."""
    from streamline_jax.models.model import Model

    ref = torch_model(FAMILIES[family])
    return ref, Model(FAMILIES[family], params_from_torch(FAMILIES[family], ref))


def make_batch(seed=0, batch=3, length=12, vocab=128, padding=None):
    """Random ids and their mask; `padding` "right" or "left" pads rows 1 and 2 by different amounts."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int32)
    if padding == "right":
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    elif padding == "left":
        mask[1, :5] = 0
        mask[2, :8] = 0
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def dense(config, seed=0):
    """A random model whose layers change the hidden state a lot (std 0.02 weights barely do)."""
    import jax

    from streamline_jax.models import transformer
    from streamline_jax.models.model import Model

    params = transformer.init_params(config, jax.random.PRNGKey(seed))
    scale = lambda path, a: a * 8 if path[-1].key in ("kernel", "embed_tokens") else a  # noqa: E731
    return Model(config, jax.tree_util.tree_map_with_path(scale, params))


def chunks(n, seq=16, seed=0, vocab=64):
    """`n` random token chunks of `seq` ids below `vocab` (SMALL's)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=seq).astype(np.int32) for _ in range(n)]


def sentences(n, seed):
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, rng.randint(6, 14))) + "." for _ in range(n)]


def train_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(sentences(300, 0), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                                bos_token="<eos>")


def hf_folder(path: Path, config: ModelConfig, tokenizer=True) -> Path:
    torch_model(config).save_pretrained(str(path))
    if tokenizer:
        train_tokenizer().save_pretrained(str(path))
    return path


def write_jsonl(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def fake_shared_data(root: Path) -> Path:
    """A tiny folder laid out like ../shared/data (corpus, WikiText-2 test, PIQA validation), for
    $STREAMLINE_JAX_DATA: commands that read the shared data run as written on it."""
    write_jsonl(root / "corpus" / "train.jsonl", sentences(3000, 4))
    write_jsonl(root / "corpus" / "valid.jsonl", sentences(200, 5))
    (root / "wikitext-2-raw").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(sentences(100, 6)))
    (root / "piqa").mkdir()
    goals, sols = sentences(8, 7), sentences(16, 8)
    with open(root / "piqa" / "valid.jsonl", "w") as f:
        for i, goal in enumerate(goals):
            f.write(json.dumps({"goal": goal, "sol1": sols[2 * i], "sol2": sols[2 * i + 1]}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(len(goals))))
    return root


def run_files(root: Path) -> dict[str, Path]:
    """root/llama, root/llama_2k and root/opt (model folders), root/data (train.jsonl, valid.jsonl, eval.txt) and root/shared
    (see `fake_shared_data`)."""
    data = root / "data"
    write_jsonl(data / "train.jsonl", sentences(400, 1))
    write_jsonl(data / "valid.jsonl", sentences(60, 2))
    (data / "eval.txt").write_text("\n".join(sentences(40, 3)))
    return {"root": root, "data": data, "llama": hf_folder(root / "llama", LLAMA), "opt": hf_folder(root / "opt", OPT),
            "llama_2k": hf_folder(root / "llama_2k", LLAMA_2K), "shared": fake_shared_data(root / "shared")}


def vocab_gguf(path: Path, vocab_size: int, arch: str = "llama") -> Path:
    """A GGUF holding only a tiny sentencepiece-style vocabulary of `vocab_size` tokens (<unk>, <s>, </s>, the
    newline byte, then words): the tokenizer llama.cpp needs in a file, for tiny random models fed token ids."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", "<0x0A>"] + [f"\u2581w{i}" for i in range(vocab_size - 4)]
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE] + [T.NORMAL] * (vocab_size - 4)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(vocab_size)])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf(path: Path, config: ModelConfig, seed=0):
    """A tiny llama GGUF with Q8_0 matrices (quantised rows) and float32 norms, like llama.cpp writes."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_vocab_size(config.vocab_size)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_layers)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)

    def q8(name, shape):
        a = rng.standard_normal(shape).astype(np.float32) * 0.1
        w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q8("token_embd.weight", (config.vocab_size, d))
    q8("output.weight", (config.vocab_size, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(config.num_layers):
        q8(f"blk.{i}.attn_q.weight", (config.num_heads * hd, d))
        q8(f"blk.{i}.attn_k.weight", (config.num_kv_heads * hd, d))
        q8(f"blk.{i}.attn_v.weight", (config.num_kv_heads * hd, d))
        q8(f"blk.{i}.attn_output.weight", (d, config.num_heads * hd))
        q8(f"blk.{i}.ffn_gate.weight", (f, d))
        q8(f"blk.{i}.ffn_up.weight", (f, d))
        q8(f"blk.{i}.ffn_down.weight", (d, f))
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(d).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.standard_normal(d).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
