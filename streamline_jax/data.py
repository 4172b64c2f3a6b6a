"""Text data for calibration, training and evaluation, streamed through `datasets`.

    texts = text_source("../shared/data/corpus/train.jsonl")          # or a hub name, .txt, .json, .parquet, a folder
    chunks = token_chunks(texts, tokenizer, seq_len=512)              # documents joined with EOS, cut to 512 tokens
    split = split_chunks(chunks, calib=50, train=1000)                # calibration first, training after: no overlap
    for batch in batches(split.calib, batch_size=8): ...              # {"input_ids", "attention_mask"} numpy arrays

Everything is lazy: the corpus is read, tokenized and chunked as it is consumed, never held whole in memory.

    python -m streamline_jax.data download DIR      # the data folder's local layout from the hub (data_sources)
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

# file suffix -> `datasets` packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or insufficient input data."""


class TextSource:
    """A re-iterable stream of document texts from a hub dataset or local files, checked on construction.

    `spec`: a file, a folder (every file with a known suffix in it, sorted), a list of files, or a hub dataset name
    (`"owner/name"`, optionally `"owner/name:config"`). Text files give one document per line (`sample_by="line"`;
    "paragraph" splits on blank lines instead). Empty documents are skipped.

    `shuffle_buffer` > 0 reads the documents in a shuffled order (`datasets`' buffer shuffle, seeded by
    `shuffle_seed`): a full permutation of a corpus of at most that many documents, and the same order on every
    iteration, so chunks cut from the stream stay disjoint between calibration and training. 0: the files' order.

    Every record is checked as it is read: one without text (the field absent, null, or not a string) is skipped
    and counted (the count is logged), and the reading stops with a `DataError` naming the file and line once more
    than `max_skipped` were.
    """

    def __init__(self, spec, text_field: str = "text", split: str = "train", sample_by: str = "line",
                 shuffle_buffer: int = 0, shuffle_seed: int = 0, max_skipped: int = 0):
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be non-negative, got {shuffle_buffer}")
        self.spec, self.text_field, self.split, self.sample_by = spec, text_field, split, sample_by
        self.shuffle_buffer, self.shuffle_seed, self.max_skipped = shuffle_buffer, shuffle_seed, max_skipped
        self.skipped = 0  # the most records without text one pass skipped (logged as it grows)
        self._builder, self._kwargs = _resolve(spec, split, sample_by)
        self.dataset = self._open()
        if shuffle_buffer:
            self.dataset = self.dataset.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)
        self._check_first_record()

    def _open(self):
        import logging

        import datasets

        # a file that cannot be parsed is reported by `_records`, with its line; not by datasets' own log line
        logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
        try:
            return datasets.load_dataset(self._builder, split=self.split, streaming=True, **self._kwargs)
        except (FileNotFoundError, DataError):
            raise
        except Exception as e:  # offline hub, unknown name, bad split
            raise DataError(f"cannot open dataset {self.spec!r} ({type(e).__name__}: {e})") from e

    def _check_first_record(self):
        features = getattr(self.dataset, "features", None)
        if features is not None and self.text_field not in features:
            raise DataError(f"dataset {self.spec!r} has no text field {self.text_field!r}; its fields are "
                            f"{sorted(features)}")
        first = next(self._records(), None)
        if first is None:
            raise DataError(f"dataset {self.spec!r} is empty")
        if self.text_field not in first:
            raise DataError(f"dataset {self.spec!r} has no text field {self.text_field!r}; its fields are "
                            f"{sorted(first)}")
        next(iter(self), None)  # the first record with text, or the error of the records without it before it

    def _records(self):
        """The dataset's records; a file that cannot be parsed is named with the line at fault."""
        try:
            yield from self.dataset
        except Exception as e:
            files = self._json_files()
            where = _bad_json_line(files) or _bad_text_line(files, self.text_field)
            if where:
                raise DataError(where) from None
            raise DataError(f"cannot read dataset {self.spec!r} ({type(e).__name__}: {e})") from None

    def _json_files(self) -> list:
        return self._kwargs.get("data_files", {}).get(self.split, []) if self._builder == "json" else []

    def __iter__(self) -> Iterator[str]:
        skipped = 0
        try:
            for number, record in enumerate(self._records(), 1):
                text = record.get(self.text_field)
                if isinstance(text, str):
                    if text:
                        yield text
                    continue
                skipped += 1
                if skipped > self.max_skipped:
                    self.skipped = skipped  # said by the error, not logged
                    raise DataError(self._refusal(number, text))
        finally:
            if skipped > self.skipped:
                self.skipped = skipped
                log.warning("%s: skipped %d record(s) without text in field %r (data.max_skipped_records allows "
                            "%d)", self.spec, skipped, self.text_field, self.max_skipped)

    def _refusal(self, number: int, text) -> str:
        what = (_bad_text_line(self._json_files(), self.text_field) or
                f"dataset {self.spec!r}, record {number}: field {self.text_field!r} holds "
                f"{type(text).__name__}, not text")
        return (f"{what}; more than data.max_skipped_records={self.max_skipped} records without text: fix or remove "
                f"them, or allow skipping more")

    def __repr__(self):
        shuffled = f", shuffle_buffer={self.shuffle_buffer}, shuffle_seed={self.shuffle_seed}"
        return f"TextSource({self.spec!r}, text_field={self.text_field!r}{shuffled if self.shuffle_buffer else ''})"


def _json_lines(files) -> Iterator[tuple[str, int, dict | str]]:
    """(file, line number, the record or what is wrong with the line) for every non-blank line of these JSON Lines
    files (a whole .json file: one line 0, or the line where it stops parsing)."""
    for f in files:
        if Path(f).suffix == ".json":
            try:
                json.loads(Path(f).read_bytes())
            except ValueError as e:  # UnicodeDecodeError too
                yield f, getattr(e, "lineno", "?"), f"not valid JSON ({e})"
            continue
        with open(f, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f, number, f"not UTF-8 text (byte {raw[e.start]:#x} at column {e.start + 1})"
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    yield f, number, f"not valid JSON ({e})"
                    continue
                ok = isinstance(record, dict)
                yield f, number, record if ok else f"expected a JSON object, got {type(record).__name__}"


def _bad_json_line(files) -> str | None:
    """"file, line N: what is wrong" for the first line of these JSON Lines files that is not a JSON object (or
    the place where a whole .json file stops parsing), or None."""
    for f, number, record in _json_lines(files):
        if isinstance(record, str):
            return f"{f}, line {number}: {record}"
    return None


def _bad_text_line(files, field: str) -> str | None:
    """"file, line N: what is wrong" for the first record of these JSON Lines files without text in `field`."""
    for f, number, record in _json_lines(files):
        if isinstance(record, dict) and not isinstance(record.get(field), str):
            if field not in record:
                return f"{f}, line {number}: no text field {field!r} (its fields: {sorted(record)})"
            return f"{f}, line {number}: field {field!r} holds {type(record[field]).__name__}, not text"
    return None


def text_source(spec, text_field: str = "text", split: str = "train", sample_by: str = "line",
                shuffle_buffer: int = 0, shuffle_seed: int = 0, max_skipped: int = 0) -> TextSource:
    """Documents from a hub dataset name or local text/json/jsonl/parquet files, streamed, in order or shuffled,
    each record checked (see `TextSource`)."""
    return TextSource(spec, text_field, split, sample_by, shuffle_buffer, shuffle_seed, max_skipped)


def _resolve(spec, split, sample_by):
    if isinstance(spec, (list, tuple)):
        files = [Path(p).expanduser() for p in spec]
    else:
        path = Path(str(spec)).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS)
            if not files:
                raise DataError(f"folder {path} holds no {'/'.join(sorted(BUILDERS))} files")
        elif path.exists() or path.suffix in BUILDERS:
            files = [path]
        else:
            name, _, config = str(spec).partition(":")
            return name, ({"name": config} if config else {})
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"data file not found: {f}")
        if f.suffix not in BUILDERS:
            raise DataError(f"{f}: unknown data file type {f.suffix!r}; expected one of {sorted(BUILDERS)}")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"dataset {spec!r} is empty")
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise DataError(f"cannot mix data file types in one source: {[str(f) for f in files]}")
    builder = builders.pop()
    kwargs = {"data_files": {split: [str(f) for f in files]}}
    if builder == "text":
        if sample_by not in ("line", "paragraph", "document"):
            raise DataError(f"sample_by must be 'line', 'paragraph' or 'document', got {sample_by!r}")
        kwargs["sample_by"] = sample_by
    return builder, kwargs


def token_chunks(texts: Iterable[str], tokenizer, seq_len: int, *, eos_token_id: int | None = None,
                 docs_per_call: int = 64) -> Iterator[np.ndarray]:
    """Tokenize documents in order, append EOS to each, and yield consecutive full `seq_len` chunks (int32).

    The tail that does not fill a chunk is dropped. Documents are tokenized `docs_per_call` at a time (one fast
    tokenizer call), so memory holds a few documents and one chunk, never the corpus.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to join documents with; pass eos_token_id")
    return _chunks(texts, tokenizer, seq_len, eos, docs_per_call)


def _chunks(texts, tokenizer, seq_len, eos, docs_per_call):
    buffer: list[int] = []
    docs = iter(texts)
    while True:
        group = list(itertools.islice(docs, docs_per_call))
        if not group:
            return
        for ids in tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        full = len(buffer) // seq_len
        for i in range(full):
            yield np.asarray(buffer[i * seq_len:(i + 1) * seq_len], np.int32)
        del buffer[:full * seq_len]


class ChunkSplit(NamedTuple):
    calib: list  # the first `calib` chunks (after `skip`), materialised
    train: Iterator[np.ndarray]  # the chunks after them, lazily


def split_chunks(chunks: Iterable[np.ndarray], calib: int, train: int | None = None, skip: int = 0, *,
                 what: str = "calibration") -> ChunkSplit:
    """Chunks [skip, skip+calib) for calibration (or `what` the first chunks are for, which a short dataset's error
    names) and the next `train` (None: all the rest) for training.

    The calibration set is read at once, so a short dataset is an error here, before any model work. The training
    iterator raises `DataError` if the data runs out before `train` chunks.
    """
    if calib < 0 or skip < 0 or (train is not None and train < 0):
        raise DataError(f"chunk counts must be non-negative (calib={calib}, train={train}, skip={skip})")
    it = iter(chunks)
    skipped = sum(1 for _ in itertools.islice(it, skip))
    calib_chunks = list(itertools.islice(it, calib))
    if skipped < skip or len(calib_chunks) < calib:
        raise DataError(f"dataset too short: it gives {skipped + len(calib_chunks)} chunks, but {skip} skipped + "
                        f"{calib} {what} chunks are needed")
    return ChunkSplit(calib_chunks, _take_exactly(it, train, first=skip + calib))


def _take_exactly(it, n, first):
    if n is None:
        yield from it
        return
    count = 0
    for chunk in itertools.islice(it, n):
        count += 1
        yield chunk
    if count < n:
        raise DataError(f"dataset too short: only {count} training chunks after the first {first}, {n} requested")


def batches(chunks: Iterable[np.ndarray], batch_size: int, *, drop_last: bool = False,
            pad_last: bool = False) -> Iterator[dict]:
    """Stack chunks into {"input_ids": [B, T] int32, "attention_mask": [B, T] int32} batches (mask all ones).
    A short last batch is dropped (`drop_last`), padded to `batch_size` with all-masked rows (`pad_last`, so every
    batch has one shape), or kept short."""
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    it = iter(chunks)
    while True:
        group: Sequence[np.ndarray] = list(itertools.islice(it, batch_size))
        if not group or (drop_last and len(group) < batch_size):
            return
        ids = np.stack(group).astype(np.int32)
        mask = np.ones_like(ids)
        if pad_last:
            ids, mask = pad_rows(ids, mask, batch_size)
        yield {"input_ids": ids, "attention_mask": mask}


def pad_rows(ids: np.ndarray, mask: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] ids and mask padded to `rows` rows with all-masked rows (which every loss and score ignores)."""
    pad = ((0, max(rows - len(ids), 0)), (0, 0))
    return np.pad(ids, pad), np.pad(mask, pad)


# Re-iterable batch collections for training: an epoch re-reads the data, in order or in a seeded permutation


def epoch_order(n, shuffle_seed, epoch):
    """Indices 0..n-1 in order, or in epoch `epoch`'s permutation under `shuffle_seed` (the same on a resume)."""
    if shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


class _Batched:
    """Re-iterable batches over re-iterable chunks (a sequence, or a callable returning a fresh iterator). Training
    drops a short last batch; validation pads it (`pad_last`) so that no chunk is left out."""

    def __init__(self, chunks, batch_size, pad_last=False):
        self.chunks, self.batch_size, self.pad_last = chunks, batch_size, pad_last
        if _indexable(chunks):
            self.epoch = self._epoch

    def _epoch(self, e, shuffle_seed=None):
        return self._stack(self.chunks[i] for i in epoch_order(len(self.chunks), shuffle_seed, e))

    def __iter__(self):
        return self._stack(self.chunks() if callable(self.chunks) else self.chunks)

    def _stack(self, chunks):
        return batches(chunks, self.batch_size, drop_last=not self.pad_last, pad_last=self.pad_last)


class _BatchList:
    """A list of ready batches, read in order or (`epoch`) in a permutation of the batches."""

    def __init__(self, batch_list):
        self.batch_list = batch_list

    def epoch(self, e, shuffle_seed=None):
        return (self.batch_list[i] for i in epoch_order(len(self.batch_list), shuffle_seed, e))

    def __iter__(self):
        return iter(self.batch_list)


def reiterable(data, batch_size, what, pad_last=False):
    if batch_size is None:
        if callable(data):
            return _Fresh(data)
        if iter(data) is data:
            raise ValueError(f"the {what} batches must be re-iterable (a list, or a callable returning an iterator), "
                             f"not a one-shot iterator")
        return _BatchList(data) if _indexable(data) else data
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not callable(data) and iter(data) is data:
        raise ValueError(f"the {what} chunks must be re-iterable (a list, or a callable returning an iterator)")
    count = sum(1 for _ in itertools.islice(data() if callable(data) else data, batch_size))
    if count < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {what} data ({count} chunks)")
    return _Batched(data, batch_size, pad_last)


def _indexable(data):
    return not callable(data) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


class _Fresh:
    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return iter(self.factory())


def progress_bar(enabled, total, initial, desc="train block", unit="step"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit)


def main(argv=None) -> int:
    """`python -m streamline_jax.data download DIR`: see streamline_jax.data_sources."""
    from .data_sources import main as data_main

    return data_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
