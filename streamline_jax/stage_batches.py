"""The run's token batches for each stage that reads chunks: training, validation, and the distillation's (the
training chunks, or the dense model's own answers with data.distill_text=self), and the model's stamp for the keys
of what is cached from them."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np

from .run_folder import SELF_DATA
from .run_inputs import Inputs, data_path
from .settings import RunConfig


class ChunkBatches:
    """Batches of `count` chunks of `seq_len` tokens after the first `skip`, re-read on every iteration (train.py
    iterates once to count and once per epoch). Incomplete batches are dropped, so every step has one shape."""

    def __init__(self, source, tokenizer, seq_len: int, skip: int, count: int, batch_size: int):
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.skip, self.count, self.batch_size = seq_len, skip, count, batch_size

    def __iter__(self):
        from . import data

        chunks = data.token_chunks(self.source, self.tokenizer, self.seq_len)
        train = data.split_chunks(chunks, 0, self.count, self.skip).train
        return data.batches(train, self.batch_size, drop_last=True)


def training_batches(c: RunConfig, tokenizer, inputs: Inputs, count: int | None = None,
                     batch_size: int | None = None) -> ChunkBatches:
    """The first `count` training chunks (null: data.train_chunks) in batches of `batch_size` (null:
    data.batch_size), after the calibration chunks where both come from one source."""
    skip = c.data.calib_chunks if inputs.train_source is inputs.calib_source else 0
    return ChunkBatches(inputs.train_source, tokenizer, c.data.seq_len, skip, count or c.data.train_chunks,
                        batch_size or c.data.batch_size)


def validation_batches(c: RunConfig, tokenizer, valid_source) -> list | None:
    """The validation chunks in batches (token ids only: small), or None without data.valid or valid_chunks."""
    from . import data

    if valid_source is None or not c.data.valid_chunks:
        return None
    chunks = data.split_chunks(data.token_chunks(valid_source, tokenizer, c.data.seq_len), c.data.valid_chunks,
                               what=f"validation (data.valid {c.data.valid})").calib
    return list(data.batches(chunks, c.data.batch_size))


SELF_PAIR_CACHE = "self_data"  # in pair_cache/: the span's pairs of the self-data chunks


def distillation_batches(c: RunConfig, dense, inputs: Inputs, out: Path, train_batches):
    """(batches, chunk count, what was generated or None) of the distillation phase: the training chunks, or with
    data.distill_text=self, chunks of the dense model's own answers (self_data; cached in `out`, resumable), with
    data.self_mix < 1 beside training chunks in every batch (the answers cycled where there are fewer)."""
    from . import self_data

    d, t = c.data, c.train
    if d.distill_text != "self":
        return train_batches, d.train_chunks, None
    steps, self_rows = t.distill_steps * t.grad_accum, d.self_rows
    chunks = d.self_chunks or steps * self_rows
    if d.self_prompts:
        prompts, prompt_source = self_data.read_prompts(data_path(d.self_prompts)), data_path(d.self_prompts)
    else:
        prompts = self_data.CorpusPrompts(inputs.train_source)
        prompt_source = [data_path(d.train or d.calibration), d.text_field, d.shuffle_buffer, d.shuffle_seed,
                         self_data.PROMPT_WORDS]
    sampling = self_data.Sampling(d.self_max_new_tokens, d.self_temperature, d.self_top_p, d.self_batch_size,
                                  t.seed)
    key = self_data.cache_key(model=model_stamp(c), dtype=dense.config.dtype,
                              compute_dtype=dense.config.compute_dtype, prompts=_stamp(prompt_source),
                              sampling=dataclasses.asdict(sampling))
    made = self_data.self_texts(dense, prompts, out / SELF_DATA, chunks * d.seq_len, sampling, key)
    batches = ChunkBatches(made.texts, dense.tokenizer, d.seq_len, 0, chunks, self_rows)
    info = {**made.info, "chunks": chunks}
    if self_rows == d.batch_size:
        return (list(batches) if t.shuffle else batches), chunks, info
    corpus_rows = d.batch_size - self_rows
    corpus_chunks = min(steps * corpus_rows, d.train_chunks)
    corpus = training_batches(c, dense.tokenizer, inputs, corpus_chunks, corpus_rows)
    pairs = zip(itertools.cycle(batches), itertools.cycle(corpus))  # both cycled where they have fewer batches
    mixed = [_rows_together(own, read) for own, read in itertools.islice(pairs, steps)]
    return mixed, len(mixed) * d.batch_size, {**info, "self_rows": self_rows, "corpus_chunks": corpus_chunks}


def _rows_together(first: dict, second: dict) -> dict:
    """One batch of both batches' rows (the same keys, each [rows, T])."""
    return {k: np.concatenate([first[k], second[k]]) for k in first}


def _stamp(source):
    """A prompts file's or corpus's path stamp (cache.path_stamp), with the settings beside it as they are."""
    from .cache import path_stamp

    return path_stamp(source) if isinstance(source, str) else [path_stamp(source[0]), *source[1:]]


def model_stamp(c: RunConfig):
    """What the model's files are (cache.path_stamp of what model.source resolves to), for the caches' keys."""
    from .cache import path_stamp
    from .loading import resolve_source

    return path_stamp(resolve_source(c.model.source)[1])
