"""Tiny random Llama and OPT Hugging Face folders (with a tiny trained tokenizer) and tiny text, for whole runs in
seconds: the command line's tests and the README's commands."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import transformers

from reference import torch_model
from streamline_jax.models.config import ModelConfig

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
