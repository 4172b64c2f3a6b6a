"""The tokenizer as llama.cpp reads it (`tokenizer.ggml.*` and `tokenizer.chat_template`), built from a Hugging Face
tokenizer folder: byte-level BPE tokenizers (tokenizer.json) as llama.cpp's `gpt2` tokenizer, and SentencePiece-style
ones (BPE with byte fallback: Llama-2, Mistral, Gemma) as its `llama` tokenizer.

`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp applies; without it llama.cpp falls back to a default one
and splits text unlike the model's own tokenizer. llama.cpp's converter recognises a pre-tokenizer by hashing the
tokens of a test text; we recognise the pre-tokenizers of the supported families by their tokenizer.json
description, and refuse any other by name rather than write a file that tokenizes differently.

llama.cpp's `llama` tokenizer merges adjacent pieces by the score of the token they make. llama.cpp's converter,
given only a tokenizer.json, writes every score -1000 (and so merges leftmost first); we score a token by the rank of
its merges, which is BPE where the merges are SentencePiece's (`merge_scores`), and refuse other merges by name.
Unigram tokenizers are refused: merging needs every intermediate piece in the vocabulary, which Unigram's lacks
(llama.cpp would split whole words into letters).
"""

from __future__ import annotations

import json
import re
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


# a SentencePiece-style tokenizer.json's normalizer and pre_tokenizer, described as `describe` does -> whether a
# space is prepended to the text (llama.cpp's tokenizer.ggml.add_space_prefix). Not the Metaspace pre-tokenizer
# that newer transformers write for Llama-2: it prepends none to a text that starts with a space, llama.cpp does.
SPM_SHAPES = {
    ("Prepend(\u2581)", "Replace( ->\u2581)"): True,  # Llama-2, Mistral
    ("Replace( ->\u2581)", "Split( )"): False,  # Gemma (the split finds no space left: a no-op)
    ("Replace( ->\u2581)",): False,  # Gemma, as newer transformers write it
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


class VocabError(ValueError):
    pass


def describe(pre: dict | None) -> tuple[str, ...]:
    """A tokenizer.json pre_tokenizer (or normalizer) as a tuple of its steps."""
    if not pre:
        return ()
    if pre["type"] == "Sequence":
        return tuple(step for p in pre.get("pretokenizers", pre.get("normalizers")) for step in describe(p))
    if pre["type"] == "ByteLevel":
        return ("ByteLevel(regex)" if pre.get("use_regex", True) else "ByteLevel",)
    if pre["type"] == "Digits":
        return ("Digits(individual)" if pre.get("individual_digits") else "Digits",)
    if pre["type"] == "Prepend":
        return (f"Prepend({pre['prepend']})",)
    if pre["type"] == "Replace":
        return (f"Replace({pre['pattern'].get('String', pre['pattern'].get('Regex'))}->{pre['content']})",)
    if pre["type"] == "Metaspace":
        return (f"Metaspace({pre['replacement']},{pre.get('prepend_scheme')},split={pre.get('split', True)})",)
    if pre["type"] == "Split":
        return (f"Split({pre['pattern'].get('Regex', pre['pattern'].get('String'))})",)
    return (pre["type"],)


def hf_vocab_fields(folder: Path, vocab_size: int) -> list[tuple[str, object]]:
    """[(key, value)] of the tokenizer.* metadata for the tokenizer in `folder`, its vocabulary padded to the
    model's `vocab_size` as llama.cpp's converter pads it."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise VocabError(f"{folder}: no tokenizer.json; a GGUF needs a byte-level BPE or SentencePiece-style BPE "
                         f"tokenizer.json, or the tokenizer copied from a GGUF of the same vocabulary")
    spec = json.loads(path.read_text())
    model = spec["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        fields = spm_fields(spec, vocab_size, path)
    elif model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        fields = byte_level_fields(spec, vocab_size, path)
    else:
        raise VocabError(f"{path}: not a byte-level BPE tokenizer nor a SentencePiece-style BPE one (byte_fallback) "
                         f"(model {model.get('type')}); llama.cpp would tokenize it differently: copy the "
                         f"tokenizer from a GGUF of the same vocabulary instead")
    return fields + special_fields(Path(folder), dict(fields)["tokenizer.ggml.tokens"])


def byte_level_fields(spec: dict, vocab_size: int, path: Path) -> list[tuple[str, object]]:
    """llama.cpp's `gpt2` tokenizer: tokens and merges, with the pre-tokenizer named."""
    steps = describe(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise VocabError(f"{path}: pre-tokenizer {list(steps)} is not one llama.cpp names here (known: "
                         f"{sorted(set(PRE_TOKENIZERS.values()))}); without tokenizer.ggml.pre llama.cpp would split "
                         f"text differently: copy the tokenizer from a GGUF of the same vocabulary instead")
    tokens, types = token_list(spec, vocab_size, path)
    merges = [" ".join(pair) for pair in merge_pairs(spec["model"])]
    return [("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", pre), ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.token_type", types), ("tokenizer.ggml.merges", merges)]


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    """The merges of a tokenizer.json BPE model (written "a b" or ["a", "b"]) as pairs, by rank."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def spm_fields(spec: dict, vocab_size: int, path: Path) -> list[tuple[str, object]]:
    """llama.cpp's `llama` (SentencePiece) tokenizer: tokens, scores and types; spaces as \u2581, bytes outside the
    vocabulary as <0xNN> tokens."""
    import gguf

    steps = describe(spec.get("normalizer")) + describe(spec.get("pre_tokenizer"))
    if steps not in SPM_SHAPES or spec["model"].get("ignore_merges"):
        raise VocabError(f"{path}: SentencePiece-style BPE with normalizer and pre-tokenizer {list(steps)} (known: "
                         f"{[list(k) for k in SPM_SHAPES]}); llama.cpp would split text differently: copy the "
                         f"tokenizer from a GGUF of the same vocabulary instead")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in spec["model"]["vocab"]]
    if missing:
        raise VocabError(f"{path}: byte fallback without the byte tokens {missing[:3]} ({len(missing)} missing); "
                         f"llama.cpp stops on a byte it has no token for")
    tokens, types = token_list(spec, vocab_size, path)
    T, unk = gguf.TokenType, spec["model"].get("unk_token")
    types = [int(T.BYTE) if BYTE_TOKEN.fullmatch(t) else int(T.UNKNOWN) if t == unk else k
             for t, k in zip(tokens, types)]
    made = merge_scores(spec["model"], {a["content"] for a in spec.get("added_tokens", [])}, path)
    scores = [made.get(t, 0.0) if k in (T.NORMAL, T.BYTE) else -1000.0 for t, k in zip(tokens, types)]
    return [("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "default"), ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types),
            ("tokenizer.ggml.add_space_prefix", SPM_SHAPES[steps])]


def merge_scores(model: dict, added: set[str], path: Path) -> dict[str, float]:
    """{token: minus the rank of its first merge}. llama.cpp merges the adjacent pair whose concatenation is the
    token of the highest score, whether or not the pair is a merge; that is BPE only where every split of a token
    into two tokens is a merge and a token's merges are ranked together, as in the vocabularies converted from
    SentencePiece (Llama-2, Mistral, Gemma). Added tokens (`added`) llama.cpp matches in the text before merging."""
    vocab = model["vocab"]
    pairs = merge_pairs(model)
    first: dict[str, int] = {}
    latest = 0
    for rank, (a, b) in enumerate(pairs):
        latest, earlier = first.setdefault(a + b, rank), latest
        if latest < earlier:
            raise VocabError(f"{path}: the merges making {a + b!r} are not ranked together; llama.cpp ranks merges "
                             f"by the token they make, so it would tokenize differently")
    merges = set(pairs)
    for token in vocab.keys() - added:
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in vocab and b in vocab and (a, b) not in merges:
                raise VocabError(f"{path}: token {token!r} splits into {a!r} + {b!r}, which is not a merge; "
                                 f"llama.cpp would merge them, so it would tokenize differently (SentencePiece's "
                                 f"own vocabularies list every such merge)")
    return {token: -float(rank) for token, rank in first.items()}


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
