"""The dense model's own layers written to disk and freed while the training steps run from cached span pairs.

With a pair cache the steps read none of the dense span: MSE reads its cached input and target, the cached
distillation runs the teacher from the span's output (`losses.dense_params_read`). Those layers are the dense
model's own (the pruned model shares its other arrays): a quarter of the weights at the default sparsity, 3 GiB at
llama2-7b, which the optimizer state and the steps' buffers can use meanwhile. They are saved with Orbax (sharded as
they are: every process writes its own shards), deleted, and read back onto the same shardings when the steps end.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import jax

from ..host_memory import release_host_memory
from ..models import transformer
from ..models.model import Model

log = logging.getLogger(__name__)

# headroom beside the arrays' bytes for Orbax's metadata and the file system's blocks
DISK_MARGIN = 1.05


def own_segments_before(dense: Model, pruned: Model, end: int) -> list[str]:
    """Keys of the dense model's stack segments that end at or before layer `end` and share no array with `pruned`
    (after `pruning.split_stack`: the cut span's)."""
    shared = {id(leaf) for leaf in jax.tree.leaves(pruned.params)}
    keys = []
    for key, seg, first in transformer.segment_starts(dense.config):
        leaves = jax.tree.leaves(dense.params["segments"][key])
        if first + seg.num_layers <= end and leaves and not any(id(leaf) in shared for leaf in leaves):
            keys.append(key)
    return keys


@contextlib.contextmanager
def offloaded(dense: Model, pruned: Model, end: int, folder: str | Path | None):
    """Within the block, the dense model's own segments ending at or before layer `end` (`own_segments_before`)
    are on disk in `folder`, and their arrays deleted; on leaving (whatever the exit), read back into
    `dense.params["segments"]` in place, so every holder of `dense` has them again, and `folder` removed. Yields
    what was offloaded ({"bytes", "gib", "segments", "write_s"}; "read_s" once back), or None where nothing was
    (no folder, no own segment, or too little disk: then a warning)."""
    from ..distributed import main_only, restore_params, save_params

    keys = own_segments_before(dense, pruned, end) if folder is not None else []
    if not keys:
        yield None
        return
    folder = Path(folder).absolute()
    segments = dense.params["segments"]
    moved = {k: segments[k] for k in keys}
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(moved))
    main_only(shutil.rmtree)(folder, ignore_errors=True)  # a stopped run's leftovers
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if nbytes * DISK_MARGIN > free:
        log.warning("the dense span stays in memory while training: offloading it needs %.2f GiB in %s, and its "
                    "disk has %.2f GiB free", nbytes / 2**30, folder.parent, free / 2**30)
        yield None
        return
    start = time.perf_counter()
    save_params(folder, moved)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), moved)
    for leaf in jax.tree.leaves(moved):
        leaf.delete()
    del moved
    release_host_memory()
    info = {"bytes": nbytes, "gib": round(nbytes / 2**30, 3), "segments": keys,
            "write_s": round(time.perf_counter() - start, 2)}
    log.info("the dense span's %.2f GiB (segments %s) offloaded to %s while the steps run from cached pairs "
             "(%.1f s)", nbytes / 2**30, ", ".join(keys), folder, info["write_s"])
    try:
        yield info
    finally:
        release_host_memory()  # the steps' optimizer state and buffers first: the span takes their place
        start = time.perf_counter()
        segments.update(restore_params(folder, abstract))
        main_only(shutil.rmtree)(folder, ignore_errors=True)
        info["read_s"] = round(time.perf_counter() - start, 2)
