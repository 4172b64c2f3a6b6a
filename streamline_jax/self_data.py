"""The dense model's own text for the distillation phase (self-data distillation, Thangarasa et al. 2024): prompts
from the corpus or a prompts file, answered by the model itself in batches (`generation.generate`, through the
tokenizer's chat template where it has one), each finished batch appended to a JSON Lines cache in the run folder.

    data = self_texts(dense, prompts, run / "self_data.jsonl", tokens_needed=49152, sampling=Sampling(),
                      key=cache_key(model=..., prompts=..., sampling=...))
    chunks = token_chunks(data.texts, dense.tokenizer, 512)   # packed as the corpus is

The cache's first line is its key (the model, the prompts and the sampling settings); each line after it is one
finished batch, appended in one write. A run that stops (a kill, Ctrl-C, a full disk) leaves whole batches and at
most one torn last line, which the next run cuts off before it continues from the next batch: every batch draws
its own seed (`seed` + its number), so a resumed cache is the one an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .data import DataError
from .files import write_atomic

PROMPT_WORDS = 48  # a corpus prompt: this many words of a document (every prompt has near one length: one compile)
PROMPT_BUCKET = 64  # prompts padded to a multiple of this: fewer prompt shapes to compile

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the model answers: at most `max_new_tokens` each, `batch_size` prompts at a time, sampled at
    `temperature` (0: greedy) from the top-p nucleus, batch i with seed `seed + i`."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0


@dataclasses.dataclass
class SelfData:
    texts: list[str]  # prompt + answer each, as the chat template renders them (plain: the prompt continued)
    info: dict  # what was generated and reused, for the report


# --------------------------------------------------------------------------------------------------------------
# Prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a file: one per non-blank line of a text file, or the "prompt" (else "text") field of each
    record of a .jsonl file. A missing or empty file, or a record without a prompt, is a DataError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.self_prompts: file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"data.self_prompts: {path} is not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        prompts = [_jsonl_prompt(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"data.self_prompts: {path} holds no prompts")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"data.self_prompts: {path}, line {number}: not valid JSON ({e})") from None
    prompt = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"data.self_prompts: {path}, line {number}: no prompt (a \"prompt\" or \"text\" field of "
                        f"text)")
    return prompt.strip()


class CorpusPrompts:
    """Prompts cut from documents (a re-iterable source): the first `words` words of every document, then the
    next `words` of every document long enough, and so on (the documents are read once per round)."""

    def __init__(self, documents: Iterable[str], words: int = PROMPT_WORDS):
        self.documents, self.words = documents, words

    def __iter__(self) -> Iterator[str]:
        for passage in itertools.count():
            found = False
            for doc in self.documents:
                cut = doc.split()[passage * self.words:(passage + 1) * self.words]
                if len(cut) == self.words or (cut and passage == 0):
                    found = True
                    yield " ".join(cut)
            if not found:
                return


# --------------------------------------------------------------------------------------------------------------
# Generation, cached batch by batch


def cache_key(**parts) -> str:
    """The cache's key: a digest of what its texts depend on (JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def self_texts(model, prompts: Iterable[str], path: str | os.PathLike, tokens_needed: int, sampling: Sampling,
               key: str, *, generate: Callable | None = None) -> SelfData:
    """Texts of the model's own answers to `prompts` (read in order; started again from the first when they run
    out) until they hold `tokens_needed` tokens packed as `data.token_chunks` packs them (each text and its EOS).
    Batches already in the cache at `path` under the same `key` are reused; the rest are generated and appended."""
    if generate is None:
        from .generation import generate
    tokenizer = model.tokenizer
    chat = bool(getattr(tokenizer, "chat_template", None))
    if not chat:
        log.info("self data: the tokenizer has no chat template: the model continues each prompt as plain text")
    batches = _read_cache(Path(path), key)
    reused = len(batches)
    have = sum(r["tokens"] for b in batches for r in b["records"])
    stream = _cycled(prompts, sampling.temperature)
    for _ in range(reused * sampling.batch_size):  # the prompts the cached batches answered
        next(stream)
    while have < tokens_needed:
        index = len(batches)
        batch = [next(stream) for _ in range(sampling.batch_size)]
        start, cpu = time.perf_counter(), time.process_time()  # CPU time too: a shared machine's wall time is noise
        out = generate(model, batch, sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                       seed=sampling.seed + index, chat=chat, prompt_bucket=PROMPT_BUCKET)
        records = [_record(tokenizer, prompt, answer, reason, chat)
                   for prompt, answer, reason in zip(batch, out.texts, out.finish_reasons)]
        entry = {"batch": index, "records": records, "seconds": round(time.perf_counter() - start, 3),
                 "cpu_seconds": round(time.process_time() - cpu, 3), "new_tokens": sum(len(t) for t in out.tokens)}
        _append(Path(path), entry)
        batches.append(entry)
        have += sum(r["tokens"] for r in records)
        log.info("self data: batch %d, %d new tokens in %.1f s, %.1f CPU s (%.0f tokens/s); %d of %d tokens", index,
                 entry["new_tokens"], entry["seconds"], entry["cpu_seconds"],
                 entry["new_tokens"] / max(entry["seconds"], 1e-9), min(have, tokens_needed), tokens_needed)
    return SelfData([r["text"] for b in batches for r in b["records"]], _info(batches, reused, have, chat, path))


def _cycled(prompts: Iterable[str], temperature: float) -> Iterator[str]:
    """The prompts in order, again and again (a one-shot iterator once only)."""
    for round_ in itertools.count():
        if round_ == 1:
            log.warning("self data: the prompts ran out; they are answered again%s",
                        " (greedy: the same answers; raise data.self_temperature or give more prompts)"
                        if temperature == 0 else " with other seeds")
        empty = True
        for prompt in prompts:
            empty = False
            yield prompt
        if empty:
            raise DataError("self data: no (more) prompts to answer: the prompts are a one-shot iterator, or none")


def _record(tokenizer, prompt: str, answer: str, reason: str, chat: bool) -> dict:
    if chat and reason == "eos":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
    elif chat:  # cut at max_new_tokens: no end of turn the model did not write
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False) + answer
    else:
        text = prompt + answer
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # and the EOS that joins documents
    return {"prompt": prompt, "text": text, "tokens": tokens, "finish": reason}


def _info(batches: list[dict], reused: int, tokens: int, chat: bool, path) -> dict:
    generated = batches[reused:]
    seconds = sum(b["seconds"] for b in generated)
    new = sum(b["new_tokens"] for b in generated)
    return {"cache": Path(path).name, "texts": sum(len(b["records"]) for b in batches), "tokens": tokens,
            "batches": len(batches), "batches_reused": reused, "chat_template": chat,
            "generated_tokens": new, "generation_s": round(seconds, 2),
            "generation_cpu_s": round(sum(b.get("cpu_seconds", 0) for b in generated), 2),
            "tokens_per_s": round(new / seconds, 1) if seconds else None,
            "finished_by_eos": sum(r["finish"] == "eos" for b in batches for r in b["records"])}


# --------------------------------------------------------------------------------------------------------------
# The cache file: a key line, then one whole line per finished batch


def _read_cache(path: Path, key: str) -> list[dict]:
    """The whole batches cached under `key`, in order; the file cut after the last of them (a torn last line
    goes). A cache under another key, or none, is started afresh."""
    lines = path.read_bytes().split(b"\n") if path.is_file() else []
    header = _parse(lines[0]) if len(lines) > 1 else None
    if header is None or header.get("key") != key:
        if header is not None:
            log.info("self data: %s was generated with other settings or another model: generated afresh", path)
        write_atomic(path, json.dumps({"key": key}) + "\n")
        return []
    batches, end = [], len(lines[0]) + 1
    for line in lines[1:-1]:  # the last piece follows the last newline: empty, or a torn append
        entry = _parse(line)
        if entry is None or entry.get("batch") != len(batches):
            break
        batches.append(entry)
        end += len(line) + 1
    if end < path.stat().st_size:
        log.warning("self data: %s ends in an unfinished batch (the run stopped while writing it): cut off", path)
        os.truncate(path, end)
    if batches:
        log.info("self data: %d batches reused from %s", len(batches), path)
    return batches


def _parse(line: bytes) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _append(path: Path, entry: dict) -> None:
    """One batch's line, in one write, synced: a stop leaves it whole or torn at the end (cut by the next run)."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
