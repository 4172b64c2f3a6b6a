"""The tokenizer as llama.cpp reads it (`tokenizer.ggml.*` and `tokenizer.chat_template`), built from a Hugging Face
tokenizer folder: byte-level BPE tokenizers (tokenizer.json), as llama.cpp's converter writes them.

`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp applies; without it llama.cpp falls back to a default one
and splits text unlike the model's own tokenizer. llama.cpp's converter recognises a pre-tokenizer by hashing the
tokens of a test text; we recognise the pre-tokenizers of the supported families by their tokenizer.json
description, and refuse any other by name rather than write a file that tokenizes differently.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# a tokenizer.json pre_tokenizer, described as `describe` does -> llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",
    (f"Split({LLAMA3_SPLIT})", "ByteLevel"): "llama-bpe",
    (f"Split({QWEN2_SPLIT})", "ByteLevel"): "qwen2",
}


class VocabError(ValueError):
    pass


def describe(pre: dict | None) -> tuple[str, ...]:
    """A tokenizer.json pre_tokenizer as a tuple of its steps."""
    if not pre:
        return ()
    if pre["type"] == "Sequence":
        return tuple(step for p in pre["pretokenizers"] for step in describe(p))
    if pre["type"] == "ByteLevel":
        return ("ByteLevel(regex)" if pre.get("use_regex", True) else "ByteLevel",)
    if pre["type"] == "Digits":
        return ("Digits(individual)" if pre.get("individual_digits") else "Digits",)
    if pre["type"] == "Split":
        return (f"Split({pre['pattern'].get('Regex', pre['pattern'].get('String'))})",)
    return (pre["type"],)


def hf_vocab_fields(folder: Path, vocab_size: int) -> list[tuple[str, object]]:
    """[(key, value)] of the tokenizer.* metadata for the tokenizer in `folder`, its vocabulary padded to the
    model's `vocab_size` as llama.cpp's converter pads it."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise VocabError(f"{folder}: no tokenizer.json; a GGUF needs a byte-level BPE tokenizer.json, or the "
                         f"tokenizer copied from a GGUF of the same vocabulary")
    spec = json.loads(path.read_text())
    model = spec["model"]
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise VocabError(f"{path}: not a byte-level BPE tokenizer (model {model.get('type')}); the GGUF export "
                         f"builds only those, copy the tokenizer from a GGUF of the same vocabulary instead")
    steps = describe(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise VocabError(f"{path}: pre-tokenizer {list(steps)} is not one llama.cpp names here (known: "
                         f"{sorted(set(PRE_TOKENIZERS.values()))}); without tokenizer.ggml.pre llama.cpp would split "
                         f"text differently: copy the tokenizer from a GGUF of the same vocabulary instead")
    tokens, types = token_list(spec, vocab_size, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = [("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", pre), ("tokenizer.ggml.tokens", tokens),
              ("tokenizer.ggml.token_type", types), ("tokenizer.ggml.merges", merges)]
    return fields + special_fields(Path(folder), tokens)


def token_list(spec: dict, vocab_size: int, path: Path) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's token types (special added: CONTROL; other added: USER_DEFINED), padded."""
    import gguf

    by_id = {i: (t, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()}
    for a in spec.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if len(by_id) > vocab_size:
        raise VocabError(f"{path}: {len(by_id)} tokens, more than the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in tokens], [int(k) for _, k in tokens]


def special_fields(folder: Path, tokens: list[str]) -> list[tuple[str, object]]:
    """BOS/EOS/UNK/PAD ids, add_bos/add_eos and the chat template, from tokenizer_config.json."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    fields = []
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            fields.append((f"tokenizer.ggml.{key}", ids[token]))
    for key in ("add_bos_token", "add_eos_token"):
        if key in config:
            fields.append((f"tokenizer.ggml.{key}", bool(config[key])))
    template = config.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        fields.append(("tokenizer.chat_template", template))
    return fields
