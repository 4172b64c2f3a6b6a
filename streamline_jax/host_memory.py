"""Host memory handed back between the run's stages, the allocator fitted to a model that fills the host, and the
Orbax write limit that keeps a save's copies small.

glibc keeps the memory a process frees for its next allocations instead of returning it (XLA:CPU's buffers and
Orbax's host copies come from malloc): a stage that freed gigabytes still holds them, and the next stage's own
allocations land beside them. On a CPU (where the devices' arrays are host memory) a 7B-shaped training phase kept
~2-3 GiB that no array used. `malloc_trim(0)` at the stage ends gives it back (~0.1 s).

Within a stage, glibc's mmap threshold grows to the largest block freed (up to 32 MiB), so the per-device pieces of
a large model's layers (~11 MiB at 7B on 8 devices) are carved from heaps that fragment: 4 llama2-7b-shaped layers
evaluated dense and pruned together held 1.2 GiB more than with a fixed 4 MiB threshold. That threshold costs every
new buffer fresh pages: a SmolLM2 training step ran 18% slower with it. So it is set only where memory is what
limits the run: a CPU whose host the model's weights fill by a quarter or more (`fit_allocator_to`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os

log = logging.getLogger(__name__)

# Orbax copies each array it saves to host memory before it is written; this many bytes may be in flight at once
# (Orbax's default, 96 GB, is every array of a model at once: a second copy of what is saved), or one shard where a
# shard is larger (Orbax refuses a shard over its limit): `save_concurrent_gb`.
SAVE_CONCURRENT_GB = 0.25


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
LARGE_MODEL_MMAP_THRESHOLD = 4 << 20
LARGE_MODEL_SHARE = 0.25  # of the host's physical memory


@functools.cache
def _libc():
    """glibc, where it has `malloc_trim`; None elsewhere (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_host_memory() -> bool:
    """Collect Python's garbage (arrays held only by reference cycles) and return the heap's free memory to the
    system. False where the C library cannot (then only the garbage is collected)."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def weights_fill_host(weight_bytes: int, platform: str, host_bytes: int | None = None) -> bool:
    """Whether memory is what limits the run: a CPU (whose devices' arrays are host memory) that the model's
    weights fill by LARGE_MODEL_SHARE or more."""
    host_bytes = host_memory_bytes() if host_bytes is None else host_bytes
    return platform == "cpu" and bool(host_bytes) and weight_bytes >= LARGE_MODEL_SHARE * host_bytes


def fit_allocator_to(weight_bytes: int, platform: str, host_bytes: int | None = None) -> bool:
    """Where the weights fill the host (`weights_fill_host`), fix glibc's mmap threshold at 4 MiB, so that every
    larger buffer goes back to the system when freed (see the module's docstring). Left as it is elsewhere, and
    where MALLOC_MMAP_THRESHOLD_ is set (the user's choice). True when it was set."""
    host_bytes = host_memory_bytes() if host_bytes is None else host_bytes
    libc = _libc()
    if (not weights_fill_host(weight_bytes, platform, host_bytes) or libc is None
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or not hasattr(libc, "mallopt")):
        return False
    if not libc.mallopt(M_MMAP_THRESHOLD, LARGE_MODEL_MMAP_THRESHOLD):
        return False
    log.info("the weights (%.1f GiB) fill %.0f%% of this host's memory: buffers over %d MiB are returned to the "
             "system as soon as they are freed (memory over speed)", weight_bytes / 2**30,
             100 * weight_bytes / host_bytes, LARGE_MODEL_MMAP_THRESHOLD >> 20)
    return True


def save_concurrent_gb(tree) -> float:
    """Orbax's `save_concurrent_gb` for saving `tree` (arrays, or ShapeDtypeStructs with their shardings):
    SAVE_CONCURRENT_GB, or its largest device shard's size where that is larger."""
    from jax import tree_util

    from .sharding import shard_bytes

    largest = max((shard_bytes(leaf) for leaf in tree_util.tree_leaves(tree)), default=0)
    return max(SAVE_CONCURRENT_GB, 1.01 * largest / 1e9)
