"""Stage 6, export as GGUF: the pruned model as one file that llama.cpp (and ollama) runs.

llama.cpp's own conventions: tensor names from gguf-py's `TensorNameMap`, metadata keys `<arch>.<key>`, the
attn_q / attn_k rows of the `llama` architecture permuted as its converter does, Gemma's norms stored with the +1
offset, 1-D tensors kept in float32. Written for the layouts llama.cpp runs: decoder layers only (a `layer` block
is an ordinary decoder layer there; `none` leaves nothing); `ffn`, `mlp` and `linear` blocks are refused by name.

The tokenizer (vocabulary, merges, chat template, special tokens) is copied from a GGUF: the model's own source
file, or any GGUF with the same vocabulary. Metadata copied from the model's source file that holds one value per
layer is sliced to the layers kept.

Gemma's sliding/full pattern: llama.cpp reads `<arch>.attention.sliding_window_pattern` as one flag per layer
(when it is an array) and only otherwise derives the pattern from a period (2 for Gemma 2, 6 for Gemma 3). We
always write the array, so any span is exported exactly; a llama.cpp too old to read the array would apply the
period, which the kept layers follow only when the span removed a whole number of periods (`gemma_period_spans`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .export import ExportError, as_decoder_layers
from .files import atomic_path, temporaries_of
from .gguf_file import field, llama3_rope_divisors, open_gguf, permute_rows
from .models.config import ModelConfig
from .models.families import architecture

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
GEMMA_PERIODS = {"gemma2": 2, "gemma3_text": 6}


def gguf_path(out: Path, model_source, gguf_type: str) -> Path:
    """<out>/gguf/<name>-<type>.gguf, the name being the source model's, `-pruned` added."""
    name = Path(str(model_source)).name.removesuffix(".gguf") or "model"
    return Path(out) / "gguf" / f"{name}-pruned-{gguf_type}.gguf"


def gguf_unavailable(config: ModelConfig | None, replacement: str, gguf_type: str, tokenizer_source) -> str | None:
    """Why a run of `config` pruned with `replacement` writes no GGUF; None where it does."""
    if replacement in ("ffn", "mlp", "linear"):
        return f"an `{replacement}` block has no llama.cpp layer (prune.replacement=layer or none gives a GGUF)"
    try:
        if config is not None:
            check_gguf_exportable(config, gguf_type)
    except ExportError as e:
        return str(e)
    if tokenizer_source is None:
        return ("the model source has no tokenizer llama.cpp can read (write the GGUF afterwards: scripts/convert.py "
                "<out>/model <file>.gguf --to gguf --tokenizer <a GGUF of the same vocabulary>)")
    if Path(tokenizer_source).is_dir() and config is not None:
        from .gguf_vocab import VocabError, hf_vocab_fields

        try:
            hf_vocab_fields(Path(tokenizer_source), config.vocab_size)
        except VocabError as e:
            return str(e)
    return None


def check_gguf_exportable(config: ModelConfig, gguf_type: str = "f16") -> None:
    """Raise `ExportError` naming what llama.cpp cannot run, and what to do instead, before any work."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"export.gguf_type={gguf_type!r}; expected one of {GGUF_TYPES}")
    if config.model_type not in GGUF_FAMILIES:
        raise ExportError(f"GGUF export of model_type {config.model_type!r} is not implemented (supported: "
                          f"{', '.join(GGUF_FAMILIES)}); use the Hugging Face folder or the Orbax checkpoint")
    for i, seg in enumerate(config.layout):
        if seg.kind in ("ffn", "mlp", "linear"):
            raise ExportError(f"segment {i} is an `{seg.kind}` replacement block, which llama.cpp has no layer "
                              f"for; prune with prune.replacement=layer or none to get a GGUF, or use the "
                              f"{'Hugging Face folder or ' if seg.kind == 'ffn' else ''}Orbax checkpoint")
    if config.model_type in GEMMA_PERIODS:
        if config.query_pre_attn_scalar not in (None, config.head_dim):
            raise ExportError(f"{config.model_type}: query_pre_attn_scalar={config.query_pre_attn_scalar} differs "
                              f"from head_dim={config.head_dim}; llama.cpp scales queries by head_dim for a "
                              f"pruned depth, so the GGUF would be another model")
        big = {"gemma2": 46, "gemma3_text": 62}[config.model_type]  # llama.cpp's 27B: queries by hidden / heads
        if config.depth == big and config.hidden_size // config.num_heads != config.head_dim:
            raise ExportError(f"{config.model_type} pruned to {big} layers: llama.cpp takes that depth for the 27B "
                              f"model and scales queries by hidden/heads, not head_dim; prune another span length")
        if not config.tie_word_embeddings and config.model_type == "gemma2":
            raise ExportError("gemma2 with an untied lm_head: llama.cpp's gemma2 always uses the embedding")


def follows_period(layer_types, period: int) -> bool:
    """Whether llama.cpp's period rule gives `layer_types`: layer i sliding unless (i + 1) % period == 0."""
    return all((t == "sliding_attention") == bool((i + 1) % period) for i, t in enumerate(layer_types))


def gemma_period_spans(config: ModelConfig, length: int, block: bool) -> list[int]:
    """Starts of the spans of `length` layers whose pruning (with one replacement block, or `none`) leaves layers
    that follow llama.cpp's period rule for `config`'s Gemma architecture."""
    period = GEMMA_PERIODS[config.model_type]
    return [s for s in range(config.depth - length + 1)
            if follows_period(config.pruned_layer_types(s, s + length, block), period)]


def metadata(config: ModelConfig) -> dict:
    """The `<arch>.*` keys llama.cpp reads for `config`'s current depth."""
    c, arch = config, architecture(config.model_type).gguf_name
    keys = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": c.depth, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_heads, "attention.head_count_kv": c.num_kv_heads,
            "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "rope.freq_base": float(c.rope_theta),
            "rope.dimension_count": c.head_dim, "vocab_size": c.vocab_size}
    if c.model_type in GEMMA_PERIODS:
        keys["attention.sliding_window"] = c.local_window or 4096
        keys["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
        if c.final_logit_softcap:
            keys["final_logit_softcapping"] = float(c.final_logit_softcap)
        if c.model_type == "gemma2" and c.attn_logit_softcap:
            keys["attn_logit_softcapping"] = float(c.attn_logit_softcap)
        if c.model_type == "gemma3_text":
            keys["rope.freq_base_swa"] = float(c.local_rope_theta or c.rope_theta)
            if c.rope_scaling:
                keys["rope.scaling.type"] = "linear"
                keys["rope.scaling.factor"] = float(dict(c.rope_scaling)["factor"])
    return {f"{arch}.{k}": v for k, v in keys.items()}


def _tensor_names(config: ModelConfig):
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[architecture(config.model_type).gguf_name]
    return gguf.get_tensor_name_map(arch, config.depth)


def gguf_tensors(config: ModelConfig, params):
    """(GGUF name, float32 array in llama.cpp's layout) of every tensor, for a model of decoder layers."""
    from .checkpoint import hf_tensors_from_params
    from .distributed import host_readable

    names, arch = _tensor_names(config), architecture(config.model_type)
    layer_config, params = as_decoder_layers(config, host_readable(params))
    for hf_name, w in hf_tensors_from_params(layer_config, params):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{config.model_type}: no GGUF tensor name for {hf_name!r}")
        w = np.asarray(w, np.float32)
        if arch.gguf_permutes_qk and hf_name.endswith((".q_proj.weight", ".k_proj.weight", ".q_proj.bias",
                                                        ".k_proj.bias")):  # biases too, as the converter does
            w = permute_rows(w, config.num_heads if ".q_proj" in hf_name else config.num_kv_heads)
        if arch.gguf_norm_shift and hf_name.endswith("norm.weight"):
            w = w + np.float32(arch.gguf_norm_shift)
        yield name, w
    if config.model_type == "llama" and config.rope_scaling:
        r = dict(config.rope_scaling)
        yield "rope_freqs.weight", llama3_rope_divisors(
            config.head_dim, config.rope_theta, r["factor"], r["low_freq_factor"], r["high_freq_factor"],
            r["original_max_position_embeddings"]).astype(np.float32)


def encode(w: np.ndarray, gguf_type: str):
    """(data, GGML type) of one tensor: 1-D tensors stay float32, q8_0 rows not a multiple of 32 become f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if w.ndim == 1 or gguf_type == "f32":
        return w, Q.F32
    if gguf_type == "f16" or (gguf_type == "q8_0" and w.shape[-1] % 32):
        return w.astype(np.float16), Q.F16
    qtype = Q.BF16 if gguf_type == "bf16" else Q.Q8_0
    return gguf.quants.quantize(w, qtype), qtype


def source_metadata(tokenizer_source: Path, config: ModelConfig, kept_layers: list[int]):
    """The fields to copy from the source GGUF: tokenizer.* whole, and `<arch>.*` keys not generated here, any
    that holds one value per source layer sliced to `kept_layers`; [(key, value, types)]. A Hugging Face folder:
    its tokenizer in llama.cpp's form (`gguf_vocab.py`)."""
    if tokenizer_source.is_dir():
        from .gguf_vocab import VocabError, hf_vocab_fields

        try:
            return [(key, value, None) for key, value in hf_vocab_fields(tokenizer_source, config.vocab_size)]
        except VocabError as e:
            raise ExportError(str(e)) from None
    reader = open_gguf(tokenizer_source)
    arch = architecture(config.model_type).gguf_name
    source_depth = field(reader, f"{arch}.block_count")
    fields = []
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            fields.append((key, f.contents(), f.types))
        elif key.startswith(f"{arch}.") and source_depth:
            value = f.contents()
            if isinstance(value, list) and len(value) == source_depth:
                fields.append((key, [value[i] for i in kept_layers], f.types))
            elif key not in metadata(config):
                fields.append((key, value, f.types))
    tokens = field(reader, "tokenizer.ggml.tokens") or ()
    if tokens and len(tokens) != config.vocab_size:
        raise ExportError(f"{tokenizer_source}: its tokenizer has {len(tokens)} tokens, the model {config.vocab_size}")
    if not tokens:
        raise ExportError(f"{tokenizer_source}: no tokenizer.ggml.tokens; llama.cpp needs the tokenizer in the GGUF")
    return fields


def gguf_license(path) -> str | None:
    """general.license of a GGUF (None: no file, a folder, or none said)."""
    return field(open_gguf(Path(path)), "general.license") if path and Path(path).is_file() else None


def kept_source_layers(config: ModelConfig) -> list[int]:
    """The original layer each current layer was made from (a `layer` block: the first layer of its span)."""
    from .pruning import original_ranges

    return [lo for lo, _ in original_ranges(config)]


def general_metadata(config: ModelConfig, gguf_type: str, facts: dict) -> dict:
    """general.*: the name, type, file type and the pruning facts (base model, spans, parameters)."""
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    base = facts.get("base_model") or config.model_type
    keys = {"general.type": "model", "general.name": f"{Path(str(base)).name} (pruned, {config.depth} layers)",
            "general.file_type": int(file_types[gguf_type]), "general.quantization_version": gguf.GGML_QUANT_VERSION,
            "general.tags": ["pruned", "llm-streamline"], "general.base_model.count": 1,
            "general.base_model.0.name": str(base), "general.description": pruning_summary(config, facts)}
    if facts.get("license"):
        keys["general.license"] = str(facts["license"])
    return keys


def pruning_summary(config: ModelConfig, facts: dict) -> str:
    spans = "; ".join(f"layers {s}-{s + n - 1} ({n}) replaced by {'nothing' if k == 'none' else f'one `{k}` block'}"
                      for s, n, k in config.pruned_spans) or "no layers pruned"
    params = ""
    if facts.get("params_before") and facts.get("params_after"):
        params = f"; {facts['params_before']:,} -> {facts['params_after']:,} parameters"
    return f"LLM-Streamline pruning of {facts.get('base_model') or config.model_type}: {spans}; " \
           f"{config.depth} layers{params}"


def export_gguf(model, path: str | os.PathLike, gguf_type: str = "f16",
                tokenizer_source: str | os.PathLike | None = None, facts: dict | None = None,
                overwrite: bool = True) -> Path:
    """Write `model` as one GGUF file llama.cpp loads, atomically (a temporary file renamed into place).

    `tokenizer_source`: the GGUF whose tokenizer (and per-layer metadata) to copy, or a Hugging Face folder whose
    tokenizer to convert; needed, since llama.cpp reads the tokenizer from the file. `facts`: base_model, license,
    params_before, params_after, for general.*."""
    import gguf

    config = model.config
    check_gguf_exportable(config, gguf_type)
    if tokenizer_source is None:
        raise ExportError("a GGUF needs the tokenizer in llama.cpp's form: pass a GGUF with the model's vocabulary, "
                          "or a Hugging Face folder with a byte-level or SentencePiece-style BPE tokenizer.json "
                          "(the model's own source .gguf; scripts/convert.py --tokenizer FILE.gguf)")
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite)")
    copied = source_metadata(Path(tokenizer_source), config, kept_source_layers(config))
    facts = {"params_after": model.num_params, "license": gguf_license(tokenizer_source),
             **{k: v for k, v in (facts or {}).items() if v is not None}}
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in temporaries_of(path):  # of a writer killed before its rename
        leftover.unlink()
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture(config.model_type).gguf_name)
        copied_keys = {key for key, _, _ in copied}
        for key, value in {**general_metadata(config, gguf_type, facts), **metadata(config)}.items():
            if key not in copied_keys:  # a per-layer array of the source, sliced, wins over our scalar
                _add(writer, key, value)
        for key, value, types in copied:
            if types is None:
                _add(writer, key, value)
            else:
                writer.add_key_value(key, value, types[0], sub_type=types[-1] if len(types) > 1 else None)
        for name, w in gguf_tensors(config, model.params):
            data, qtype = encode(w, gguf_type)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add(writer, key: str, value) -> None:
    import gguf

    V = gguf.GGUFValueType
    kind = lambda v: V.BOOL if isinstance(v, bool) else V.UINT32 if isinstance(v, int) else \
        V.FLOAT32 if isinstance(v, float) else V.STRING
    if key == "tokenizer.ggml.token_type":  # llama.cpp reads int32
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.INT32)
    elif isinstance(value, list):
        writer.add_key_value(key, value, V.ARRAY, sub_type=kind(value[0]) if value else V.STRING)
    else:
        writer.add_key_value(key, value, kind(value))
