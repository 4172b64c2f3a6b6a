"""On-disk (input, target) pairs of the dense span, for several epochs or several blocks over the same span."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from ..data import epoch_order, pad_rows, progress_bar
from ..files import write_atomic
from ..models.model import Model
from .checkpoints import TrainingError
from .losses import TOP_K_ARRAYS, span_pairs_fn, teacher_top_k_fn

PAIR_ARRAYS = ("x_in", "target", "attention_mask", "input_ids")


class _ArrayFolder:
    """A folder of zarr3 tensorstore arrays, one per name."""

    path: Path

    def _spec(self, name):
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}

    def open(self, name):
        """One of the folder's arrays as an open TensorStore."""
        import tensorstore as ts

        return ts.open(self._spec(name)).result()

    def _create(self, name, shape, dtype, chunk):
        import tensorstore as ts

        return ts.open(self._spec(name), create=True, dtype=dtype, shape=shape,
                       chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()

    def _meta(self):
        """The finished-marker's contents, or None where there is none."""
        marker = self.path / "complete.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def _check_free(self, need: int, what: str, detail: str, remedy: str = "train.pair_cache=false") -> None:
        """A clear error (and the folder removed) before anything is computed when its disk lacks `need` bytes;
        `remedy`: the setting that does without this folder."""
        free = shutil.disk_usage(self.path).free
        if need > free:
            shutil.rmtree(self.path, ignore_errors=True)
            raise TrainingError(f"the {what} needs {need / 1024 ** 3:.2f} GiB in {self.path} ({detail}), and its "
                                f"disk has {free / 1024 ** 3:.2f} GiB free: free some space, or set {remedy}")


class SpanPairCache(_ArrayFolder):
    """The dense model's hidden states entering and leaving a span, for every training batch, in tensorstore arrays
    on disk ([N, T, D] each, plus the [N, T] mask and token ids: PAIR_ARRAYS), for MSE's epochs and the distillation
    that follows them. Written one batch at a time, so host memory stays at one batch; a `complete.json` written
    last marks a finished cache, which later runs reuse."""

    def __init__(self, path, start, length):
        self.path, self.start, self.length = Path(path), start, length

    def complete(self, rows: int | None = None) -> bool:
        """Whether a finished cache for this span (and, if given, this many rows) is there."""
        meta = self._meta()
        if meta is None:
            return False
        return ((meta["start"], meta["length"]) == (self.start, self.length) and rows in (None, meta["rows"])
                and meta.get("input_ids", False))  # caches written before the token ids were kept: rebuilt

    def build(self, dense_model: Model, batches: Iterable[dict], progress=True,
              reuse: Sequence["SpanPairCache"] = ()):
        """Compute the pairs of every row of `batches` (iterated once). A row whose tokens and mask another row
        already has (in these batches, or in one of the finished caches `reuse` of this span and length) is copied
        from it, not computed: the distillation's batches repeat the model's answers and read training chunks whose
        pairs the MSE phase's cache holds. The new rows are computed in batches of the first batch's size."""
        import tensorstore as ts

        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        batch_list = iter(batches)
        first = next(batch_list)
        b, t = np.asarray(first["input_ids"]).shape
        n, d = (1 + sum(1 for _ in batch_list)) * b, dense_model.config.hidden_size
        self._check_disk(n, t, d)
        arrays = {name: self._create(name, shape, dtype, [b, t, d][:len(shape)])
                  for name, shape, dtype in (("x_in", (n, t, d), ts.float32), ("target", (n, t, d), ts.float32),
                                             ("attention_mask", (n, t), ts.int32), ("input_ids", (n, t), ts.int32))}
        digests = []  # each row's, in order
        for i, batch in enumerate(batches):
            ids = np.asarray(batch["input_ids"], np.int32)
            mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
            ids, mask = pad_rows(ids, mask, b)  # a short last batch
            rows = slice(i * b, (i + 1) * b)
            for w in (arrays["attention_mask"][rows].write(mask), arrays["input_ids"][rows].write(ids)):
                w.result()
            digests += _row_digests(ids, mask)
        first, wanted = first_equal_rows(digests, range(n)), set(digests)
        known = {digest: (cache, row) for cache in reversed(reuse) for digest, row in cache._rows_by_digest(t, d)
                 if digest in wanted}
        todo = np.array([row for row in range(n) if first[row] == row and digests[row] not in known], np.int64)
        self._compute(dense_model, arrays, todo, b, progress)
        copies = {}  # (source cache or None for this one) -> [(source row, row)]
        for row, digest in enumerate(digests):
            cache, source = known.get(digest, (None, first[row]))
            if cache is not None or source != row:
                copies.setdefault(cache, []).append((source, row))
        for cache, pairs in copies.items():
            sources = arrays if cache is None else {name: cache.open(name) for name in ("x_in", "target")}
            for at in range(0, len(pairs), b):
                source_rows, rows = (np.array(part) for part in zip(*pairs[at:at + b]))
                for name in ("x_in", "target"):
                    arrays[name][rows].write(sources[name][source_rows].read().result()).result()
        write_atomic(self.path / "complete.json", json.dumps(
            {"start": self.start, "length": self.length, "rows": n, "batch": b, "seq": t, "input_ids": True,
             "computed_rows": len(todo)}))

    def _compute(self, dense_model: Model, arrays: dict, rows: np.ndarray, b: int, progress) -> None:
        """The span's pairs of `rows` (their token ids and mask already written), `b` rows at a time."""
        span_io = span_pairs_fn(dense_model.config, self.start, self.length)
        count = -(-len(rows) // b)
        bar = progress_bar(progress, count, 0, "cache span pairs", "batch")
        for i in range(count):
            part = rows[i * b:(i + 1) * b]
            part = np.concatenate([part, np.repeat(part[-1:], b - len(part))])  # a short last batch: one shape
            ids, mask = (arrays[name][part].read().result() for name in ("input_ids", "attention_mask"))
            x_in, target = span_io(dense_model.params, jnp.asarray(ids), jnp.asarray(mask))
            for w in (arrays["x_in"][part].write(np.asarray(x_in)), arrays["target"][part].write(np.asarray(target))):
                w.result()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def _rows_by_digest(self, seq: int, hidden: int):
        """(digest, row) of each row of this cache where it is finished for this span with `seq`-token rows of
        `hidden`-wide states (nothing otherwise)."""
        meta = self._meta()
        if not self.complete() or meta["seq"] != seq or self.open("x_in").shape[-1] != hidden:
            return
        ids, mask = self.open("input_ids"), self.open("attention_mask")
        for at in range(0, meta["rows"], meta["batch"]):
            part = slice(at, at + meta["batch"])
            yield from zip(_row_digests(ids[part].read().result(), mask[part].read().result()), itertools.count(at))

    def _check_disk(self, n: int, t: int, d: int) -> None:
        """A clear error before any pair is computed when the disk cannot hold them all."""
        need = 4 * n * t * (2 * d + 2)  # x_in and target in float32, the mask and token ids in int32
        self._check_free(need, "span pair cache", f"{n} sequences x {t} tokens x 2 x {d} float32")

    def rows_read(self, batches: int, shuffle_seed=None) -> np.ndarray:
        """The sorted rows that the first `batches` batches of `batches()` read, over epochs (all where that is one
        epoch or more)."""
        meta = self._meta()
        n, b = meta["rows"], meta["batch"]
        per_epoch = n // b
        parts = [epoch_order(n, shuffle_seed, e)[:min(per_epoch, batches - e * per_epoch) * b]
                 for e in range(-(-batches // per_epoch))]
        return np.unique(np.concatenate(parts))

    def batches(self, batch_size=None, teacher: "TeacherTopKCache | None" = None):
        """Re-iterable batches {PAIR_ARRAYS} read from disk (with `teacher`, its TOP_K_ARRAYS too): rows in order, or
        in epoch e's permutation under a seed (`.epoch(e, shuffle_seed)`)."""
        cache = self

        class _Reader:
            def epoch(self, e, shuffle_seed=None):
                meta = cache._meta()
                b = batch_size or meta["batch"]
                arrays = {k: cache.open(k) for k in PAIR_ARRAYS}
                if teacher is not None:
                    arrays |= {k: teacher.open(k) for k in TOP_K_ARRAYS}
                order = epoch_order(meta["rows"], shuffle_seed, e)
                for i in range(meta["rows"] // b):
                    rows = order[i * b:(i + 1) * b]
                    yield {k: a[rows].read().result() for k, a in arrays.items()}

            def __iter__(self):
                return self.epoch(0)

        return _Reader()


def first_equal_rows(digests: Sequence[bytes], rows: Iterable[int]) -> list[int]:
    """For each of `rows` (with its digest), the first of them with the same digest: itself where none came before."""
    first = {}
    return [first.setdefault(digest, row) for digest, row in zip(digests, rows)]


def _row_digests(ids: np.ndarray, mask: np.ndarray) -> list[bytes]:
    """One digest per row of [B, T] token ids and mask: rows with equal digests have equal pairs."""
    return [hashlib.sha1(i.tobytes() + m.tobytes()).digest() for i, m in zip(ids.astype(np.int32),
                                                                          mask.astype(np.int32))]


class TeacherTopKCache(_ArrayFolder):
    """The dense teacher's next-token distribution for every row of a finished `SpanPairCache`, kept as its top k
    log-probabilities at `temperature` and their ids ([N, T, k]) and the tail's log-mass ([N, T]), in a folder
    inside the pair cache's (so a rebuilt pair cache drops it). Computed once, from the cached span outputs (the
    teacher's layers after the span and its head run once per training row, not at every step and epoch); its
    `complete.json` (span, rows, k, temperature, which rows) marks a finished cache, which later epochs, phases and
    resumes reuse. `rows`: only these rows of the pair cache (those a short distillation reads; None: all), the others
    left unwritten: the cache costs a teacher pass a row, so it pays only for rows read more than about once."""

    def __init__(self, pairs: SpanPairCache, k: int, temperature: float, rows: np.ndarray | None = None):
        self.pairs, self.k, self.temperature, self.rows = pairs, int(k), float(temperature), rows
        self.path = pairs.path / f"teacher_top{self.k}_t{self.temperature:g}"

    def _key(self, rows):
        which = "all" if self.rows is None else hashlib.sha1(np.asarray(self.rows, np.int64).tobytes()).hexdigest()
        return {"start": self.pairs.start, "length": self.pairs.length, "rows": rows, "k": self.k,
                "temperature": self.temperature, "computed_rows": which}

    def complete(self) -> bool:
        """Whether a finished cache of this k and temperature over the pair cache's rows is there."""
        pairs = self.pairs._meta()
        return pairs is not None and self._meta() == self._key(pairs["rows"])

    def build(self, dense_model: Model, progress=True):
        """Run the teacher from each cached span output and keep its top k (the pair cache must be finished)."""
        import tensorstore as ts

        meta = self.pairs._meta()
        n, b, t, k = meta["rows"], meta["batch"], meta["seq"], self.k
        todo = np.arange(n) if self.rows is None else np.asarray(self.rows)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self._check_free(len(todo) * t * (8 * k + 4), "teacher's top-k cache",
                         f"{len(todo)} sequences x {t} tokens x {k} float32 log-probabilities and int32 ids",
                         "train.kd_top_k=0 (the full KL from the span pairs; kd_top_k needs the pair cache)")
        arrays = {"top_logp": self._create("top_logp", (n, t, k), ts.float32, [b, t, k]),
                  "top_ids": self._create("top_ids", (n, t, k), ts.int32, [b, t, k]),
                  "tail_logp": self._create("tail_logp", (n, t), ts.float32, [b, t])}
        top_k = teacher_top_k_fn(dense_model.config, self.pairs.start + self.pairs.length, k, self.temperature)
        target, mask = self.pairs.open("target"), self.pairs.open("attention_mask")
        source = self._first_equal_rows(todo, b)  # a repeated row (an answer read again) is copied, not recomputed
        distinct = todo[source == todo]
        count = -(-len(distinct) // b)
        bar = progress_bar(progress, count, 0, f"cache teacher top {k}", "batch")
        for i in range(count):
            rows = distinct[i * b:(i + 1) * b]
            rows = np.concatenate([rows, np.repeat(rows[-1:], b - len(rows))])  # a short last batch: one shape
            out = top_k(dense_model.params, jnp.asarray(target[rows].read().result()),
                        jnp.asarray(mask[rows].read().result()))
            for w in [arrays[name][rows].write(np.asarray(out[name])) for name in TOP_K_ARRAYS]:
                w.result()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        copied = source != todo
        for at in range(0, int(copied.sum()), b):
            rows, sources = todo[copied][at:at + b], source[copied][at:at + b]
            for name in TOP_K_ARRAYS:
                arrays[name][rows].write(arrays[name][sources].read().result()).result()
        write_atomic(self.path / "complete.json", json.dumps(self._key(n)))

    def _first_equal_rows(self, rows: np.ndarray, b: int) -> np.ndarray:
        """For each of `rows`, the first of them with the same tokens and mask in the pair cache (itself if none)."""
        ids, mask, digests = self.pairs.open("input_ids"), self.pairs.open("attention_mask"), []
        for at in range(0, len(rows), b):
            part = rows[at:at + b]
            digests += _row_digests(ids[part].read().result(), mask[part].read().result())
        return np.asarray(first_equal_rows(digests, rows), dtype=rows.dtype)
