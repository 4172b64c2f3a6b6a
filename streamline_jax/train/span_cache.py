"""On-disk (input, target) pairs of the dense span, for several epochs or several blocks over the same span."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from ..data import epoch_order, pad_rows, progress_bar
from ..files import write_atomic
from ..models.model import Model
from .checkpoints import TrainingError
from .losses import span_pairs_fn


class SpanPairCache:
    """The dense model's hidden states entering and leaving a span, for every training batch, in tensorstore arrays
    on disk ([N, T, D] each, plus the [N, T] mask and token ids), for MSE's epochs and the distillation that follows
    them. Written one batch at a time, so host memory stays at one batch; a `complete.json` written last marks a
    finished cache, which later runs reuse."""

    def __init__(self, path, start, length):
        self.path, self.start, self.length = Path(path), start, length

    def _spec(self, name):
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}

    def open(self, name):
        """One of the cache's arrays ("x_in", "target", "attention_mask", "input_ids") as an open TensorStore."""
        import tensorstore as ts

        return ts.open(self._spec(name)).result()

    def complete(self, rows: int | None = None) -> bool:
        """Whether a finished cache for this span (and, if given, this many rows) is there."""
        marker = self.path / "complete.json"
        if not marker.exists():
            return False
        meta = json.loads(marker.read_text())
        return ((meta["start"], meta["length"]) == (self.start, self.length) and rows in (None, meta["rows"])
                and meta.get("input_ids", False))  # caches written before the token ids were kept: rebuilt

    def build(self, dense_model: Model, batches: Iterable[dict], progress=True):
        import tensorstore as ts

        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        config, params = dense_model.config, dense_model.params
        span_io = span_pairs_fn(config, self.start, self.length)
        batch_list = iter(batches)
        first = next(batch_list)
        b, t = np.asarray(first["input_ids"]).shape
        count = 1 + sum(1 for _ in batch_list)
        n, d = count * b, config.hidden_size
        self._check_disk(n, t, d)
        arrays = {}
        for name, shape, dtype in (("x_in", (n, t, d), ts.float32), ("target", (n, t, d), ts.float32),
                                   ("attention_mask", (n, t), ts.int32), ("input_ids", (n, t), ts.int32)):
            chunk = [b, t, d][:len(shape)]
            arrays[name] = ts.open(self._spec(name), create=True, dtype=dtype, shape=shape,
                                   chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()
        bar = progress_bar(progress, count, 0, "cache span pairs", "batch")
        for i, batch in enumerate(batches):
            ids = np.asarray(batch["input_ids"], np.int32)
            mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
            ids, mask = pad_rows(ids, mask, b)  # a short last batch
            x_in, target = span_io(params, jnp.asarray(ids), jnp.asarray(mask))
            rows = slice(i * b, (i + 1) * b)
            writes = [arrays["x_in"][rows].write(np.asarray(x_in)), arrays["target"][rows].write(np.asarray(target)),
                      arrays["attention_mask"][rows].write(mask), arrays["input_ids"][rows].write(ids)]
            for w in writes:
                w.result()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        write_atomic(self.path / "complete.json", json.dumps(
            {"start": self.start, "length": self.length, "rows": n, "batch": b, "seq": t, "input_ids": True}))

    def _check_disk(self, n: int, t: int, d: int) -> None:
        """A clear error before any pair is computed when the disk cannot hold them all."""
        need = 4 * n * t * (2 * d + 2)  # x_in and target in float32, the mask and token ids in int32
        free = shutil.disk_usage(self.path).free
        if need > free:
            shutil.rmtree(self.path, ignore_errors=True)
            raise TrainingError(f"the span pair cache needs {need / 1024 ** 3:.2f} GiB in {self.path} ({n} sequences "
                                f"x {t} tokens x 2 x {d} float32), and its disk has {free / 1024 ** 3:.2f} GiB free: "
                                f"free some space, or set train.pair_cache=false")

    def batches(self, batch_size=None):
        """Re-iterable batches {"x_in", "target", "attention_mask", "input_ids"} read from disk: rows in order, or in
        epoch e's permutation under a seed (`.epoch(e, shuffle_seed)`)."""
        cache = self

        class _Reader:
            def epoch(self, e, shuffle_seed=None):
                meta = json.loads((cache.path / "complete.json").read_text())
                b = batch_size or meta["batch"]
                arrays = {k: cache.open(k) for k in ("x_in", "target", "attention_mask", "input_ids")}
                order = epoch_order(meta["rows"], shuffle_seed, e)
                for i in range(meta["rows"] // b):
                    rows = order[i * b:(i + 1) * b]
                    yield {k: a[rows].read().result() for k, a in arrays.items()}

            def __iter__(self):
                return self.epoch(0)

        return _Reader()
