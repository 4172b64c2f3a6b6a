"""GGUF files (llama.cpp): the one reader of their metadata, tensors and tokenizer.

Per architecture (see `models/families.py`) the metadata keys are `<arch>.<key>`, and llama.cpp's converter permutes
the attn_q / attn_k rows of the `llama` architecture only (Qwen2/Qwen3 GGUFs keep Hugging Face's order). A
Llama-3.1 GGUF carries its rope scaling as per-frequency divisors (`rope_freqs.weight`), which are matched back to
the Llama-3 scaling parameters they come from.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, TensorSource
from .models.families import BLOCK_FAMILIES, Architecture, UnsupportedArchitectureError, gguf_architecture

ROPE_FREQS = "rope_freqs.weight"
# Llama-3.x scaling parameters llama.cpp's converter turns into rope_freqs: (low_freq_factor, high_freq_factor,
# original_max_position_embeddings); the factor is the largest divisor.
LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192),)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of attn_q / attn_k rows (per head: interleaved -> rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(TensorSource):
    """A GGUF tensor: only the rows a read needs are dequantized; llama.cpp's q/k row permutation (llama
    architecture) is undone by reading the permuted rows."""

    def __init__(self, name, tensor, row_perm=None, shift=0.0):
        super().__init__(name, tuple(reversed([int(d) for d in tensor.shape])), None)
        self.tensor, self.row_perm, self.shift = tensor, row_perm, shift  # shift: llama.cpp's added norm offset

    def load(self) -> np.ndarray:
        return self.read(slice(None))

    def read(self, *index):
        import gguf

        rows = index[0]
        if self.row_perm is not None:
            rows = self.row_perm[rows]
        part = self.tensor.data[rows]
        if self.tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            part = gguf.quants.dequantize(part, self.tensor.tensor_type)
        part = np.asarray(part, np.float32)
        if self.shift:
            part = part - np.float32(self.shift)
        if len(self.shape) == 1:
            part = part.reshape(-1)
        return part[:, index[1]] if len(index) == 2 else part


def field(reader, key, default=None):
    value = reader.fields.get(key)
    return default if value is None else value.contents()


def open_gguf(path: Path):
    """The file's reader; a file cut short (or not a GGUF) is a CheckpointError naming it, before any tensor read."""
    import gguf

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # the tensor table is read: check the size it lists
            _check_size(path, start_offs, fields)
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(str(path))
    except (IndexError, ValueError, OverflowError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a GGUF file, or truncated: its metadata cannot be read "
                              f"({type(e).__name__}: {e}); the file has {Path(path).stat().st_size:,} bytes") from None


def _check_size(path: Path, data_start: int, table) -> None:
    """Refuse a file shorter than the end of the last tensor its table lists."""
    import gguf

    end = data_start
    for tensor in table:  # parts: name length, name, dimension count, dimensions, type, offset
        dims, raw_type, offset = tensor.parts[3], tensor.parts[4], tensor.parts[5]
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
        end = max(end, data_start + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block)
    size = Path(path).stat().st_size
    if end > size:
        raise CheckpointError(f"{path}: truncated: its tensor table lists {end:,} bytes, the file has {size:,}")


def gguf_architecture_of(reader) -> Architecture:
    return gguf_architecture(field(reader, "general.architecture"))


def gguf_hf_config(reader) -> dict:
    """The Hugging Face config.json the GGUF's metadata describes."""
    arch = gguf_architecture_of(reader)
    g = lambda k, d=None: field(reader, f"{arch.gguf_name}.{k}", d)
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count")
    head_dim = g("attention.key_length") or g("embedding_length") // heads
    theta = float(g("rope.freq_base", 10000.0))
    hf = {
        "model_type": arch.model_type,
        "vocab_size": g("vocab_size") or len(field(reader, "tokenizer.ggml.tokens") or ()),
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "max_position_embeddings": g("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        # llama / qwen3 with biases (qwen2's q/k/v biases are its architecture's own)
        "attention_bias": "blk.0.attn_output.bias" in names, "mlp_bias": "blk.0.ffn_down.bias" in names,
    }
    if arch.gguf_config:
        hf.update(arch.gguf_config(g, hf["num_hidden_layers"], head_dim))
        return hf
    scaling_type = g("rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise UnsupportedArchitectureError(f"GGUF {arch.gguf_name}.rope.scaling.type={scaling_type!r} is not "
                                           f"implemented (supported: none, or Llama-3 rope_freqs)")
    if ROPE_FREQS in names:
        tensor = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        hf["rope_scaling"] = llama3_scaling_from_rope_freqs(np.asarray(tensor.data, np.float64).reshape(-1),
                                                            head_dim, theta)
    return hf


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert-time permutation of attn_q / attn_k rows (per head: rotate-half -> interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         old_len: int) -> np.ndarray:
    """The per-frequency divisors (`rope_freqs`) of a Llama-3 rope scaling, as llama.cpp's converter writes them."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    return np.where(wavelen < old_len / high, 1.0,
                    np.where(wavelen > old_len / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))


def llama3_scaling_from_rope_freqs(divisors: np.ndarray, head_dim: int, theta: float) -> dict:
    """The Llama-3 rope scaling whose per-frequency divisors llama.cpp's converter wrote as `rope_freqs`."""
    factor = float(np.max(divisors))
    for low, high, old_len in LLAMA3_ROPE_CANDIDATES:
        expected = llama3_rope_divisors(head_dim, theta, factor, low, high, old_len)
        if divisors.shape == expected.shape and np.allclose(divisors, expected, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old_len}
    raise UnsupportedArchitectureError(
        f"GGUF tensor {ROPE_FREQS!r} ({divisors.size} values, largest {factor}) matches no Llama-3 rope scaling "
        f"(tried low/high/original length {LLAMA3_ROPE_CANDIDATES}); this rope scaling is not implemented")


def gguf_sources(reader, hf: dict, origin: str) -> list[GGUFSource]:
    """The GGUF's tensors under their Hugging Face names, q/k rows un-permuted where llama.cpp permuted them."""
    arch = gguf_architecture_of(reader)
    table = arch.gguf_names or BLOCK_FAMILIES[arch.family].gguf_names
    heads = {".q_proj.weight": hf["num_attention_heads"], ".k_proj.weight": hf["num_key_value_heads"],
             ".q_proj.bias": hf["num_attention_heads"], ".k_proj.bias": hf["num_key_value_heads"]}
    sources = []
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # read into the config's rope scaling
            continue
        for pattern, target in table:
            m = re.fullmatch(pattern, t.name)
            if m:
                name = m.expand(target)
                break
        else:
            raise CheckpointError(f"{origin}: unexpected GGUF tensor {t.name!r} for architecture "
                                  f"{arch.gguf_name!r}")
        perm = None
        if arch.gguf_permutes_qk:
            for suffix, n in heads.items():
                if name.endswith(suffix):
                    perm = unpermute_rows(np.arange(int(t.shape[-1])), n)
        shift = arch.gguf_norm_shift if name.endswith("norm.weight") else 0.0
        sources.append(GGUFSource(name, t, perm, shift))
    return sources


# tokenizer.* metadata keys -> the names transformers' GGUF tokenizer converter reads
GGUF_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
GGUF_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                              "ggml.add_eos_token": "add_eos_token"}
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


def gguf_tokenizer(path: Path, reader=None):
    """The GGUF's tokenizer, built from its own metadata with the `tokenizers` library: no torch.

    transformers' `AutoTokenizer.from_pretrained(gguf_file=...)` gives the same ids (tests/test_load.py checks it on
    WikiText-2, PIQA and chat prompts), but it reads the file through its PyTorch GGUF reader, so it needs torch.
    Only its torch-free converter (metadata -> `tokenizers.Tokenizer`) is used here.
    """
    from transformers import PreTrainedTokenizerFast

    reader = reader or open_gguf(path)
    arch = field(reader, "general.architecture")
    meta = lambda key: field(reader, f"tokenizer.{key}")
    tokens = meta("ggml.tokens")
    if not tokens:  # like a Hugging Face folder without tokenizer files: the caller decides whether it needs one
        return None
    spec = {name: meta(key) for key, name in GGUF_TOKENIZER_KEYS.items() if meta(key) is not None}
    config = {name: meta(key) for key, name in GGUF_TOKENIZER_CONFIG_KEYS.items() if meta(key) is not None}
    if spec.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
        config.setdefault("add_bos_token", True)
    for name, key in GGUF_SPECIAL_TOKENS.items():
        token_id = meta(f"ggml.{key}")
        config[name] = tokens[token_id] if token_id is not None else None
    backend = _tokenizer_converter()(arch, spec)[0]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def _tokenizer_converter():
    try:  # transformers 5.x
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        try:  # transformers 4.x
            from transformers.integrations.ggml import convert_gguf_tokenizer
        except ImportError:
            import transformers

            raise CheckpointError(f"transformers {transformers.__version__} has no GGUF tokenizer converter; "
                                  f"install transformers>=4.50") from None
    return convert_gguf_tokenizer
