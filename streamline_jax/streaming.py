"""Streaming load straight onto a mesh: every parameter is built shard by shard on the devices that hold it,
each shard read from the checkpoint by byte range (safetensors and torch .bin through a memory map, GGUF by
dequantizing only the rows a shard needs). The whole model is never on one host; a host reads only the slices its
own devices hold, and the staging memory is one shard at a time.

`jax.make_array_from_callback` would read every local shard before placing any; placing them one by one and joining
them with `jax.make_array_from_single_device_arrays` keeps the staging to a single shard.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import CheckpointError, TensorSource, claim_tensors
from .models import transformer
from .models.config import ModelConfig
from .sharding import LOGICAL_AXIS_RULES, ShardingError, param_shardings


# --------------------------------------------------------------------------------------------------------------
# Our parameter index -> checkpoint index


def _as_slice(idx: np.ndarray):
    if idx.size and idx[-1] - idx[0] + 1 == idx.size and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _flat(shape, index) -> np.ndarray:
    """Flat positions of `index` (a tuple of slices) in an array of `shape`, C order; tiny shapes only."""
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)[index].ravel()


def read_param_part(src: TensorSource, kind: str, shape: tuple, index: tuple, dtype) -> np.ndarray:
    """The part `index` of our parameter of `shape` (transform `kind`, see checkpoint.py) read from `src`."""
    part_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
    if kind == "R" and tuple(src.shape) == tuple(shape):
        out = src.read(index) if len(shape) != 2 else src.read(index[0], index[1])
    elif kind in ("R", "F"):
        flat = _flat(shape, index)
        out = src.read(_as_slice(flat))
    else:
        k = int(kind[1:])
        cols = _as_slice(_flat(shape[:k], index[:k]))
        rows = _as_slice(_flat(shape[k:], index[k:]))
        out = src.read(rows, cols).T
    return np.ascontiguousarray(out.reshape(part_shape), dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Placement


def stream_params(config: ModelConfig, sources: Iterable[TensorSource], mesh, dtype=None, *,
                  rules=LOGICAL_AXIS_RULES, origin: str = "checkpoint", on_shard: Callable | None = None):
    """The dense parameter tree, each leaf a global `jax.Array` with its logical-axis `NamedSharding` on `mesh`,
    built from this host's shards only. `on_shard(nbytes)` is called after each shard lands on its device."""
    if not config.is_dense:
        raise CheckpointError("checkpoints are imported into dense models only")
    dtype = np.dtype(jnp.dtype(dtype or config.dtype))
    tensor = dict(mesh.shape).get("tensor", 1)
    for what in ("num_heads", "num_kv_heads"):
        if getattr(config, what) % tensor:
            raise ShardingError(f"mesh tensor={tensor} does not divide {what}={getattr(config, what)}; pick a tensor "
                                f"size that divides the heads")
    abstract, claimed = claim_tensors(config, sources, origin)
    shardings = param_shardings(abstract, transformer.param_axes(config), mesh, rules)  # errors before any read

    def build(path, leaf, sharding):
        keys = tuple(p.key for p in path)
        stacked = keys[:2] == ("segments", transformer.segment_key(0))
        shape = tuple(leaf.shape)

        def part(index):
            if not stacked:
                src, kind = claimed[(keys, None)]
                return read_param_part(src, kind, shape, index, dtype)
            layers = range(shape[0])[index[0]]
            out = np.empty((len(layers),) + tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:])),
                           dtype)
            for j, layer in enumerate(layers):
                src, kind = claimed[(keys[2:], layer)]
                out[j] = read_param_part(src, kind, shape[1:], index[1:], dtype)
            return out

        return place(shape, sharding, part, on_shard)

    return jax.tree_util.tree_map_with_path(build, abstract, shardings)


def _key(index, shape):
    return tuple(s.indices(n) for s, n in zip(index, shape))


def place(shape, sharding, part: Callable, on_shard: Callable | None = None) -> jax.Array:
    """A global array from `part(index)`, read once per distinct shard and placed one shard at a time on this
    host's devices (replicas of a shard reuse the one read)."""
    shape = tuple(shape)
    by_index = sorted(sharding.addressable_devices_indices_map(shape).items(), key=lambda kv: _key(kv[1], shape))
    arrays, last_key, data = [], None, None
    for device, index in by_index:
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        key = _key(index, shape)
        if key != last_key:
            data, last_key = None, key
            data = part(index)
        shard = jax.device_put(data, device)
        shard.block_until_ready()
        if on_shard:
            on_shard(shard.nbytes)
        arrays.append(shard)
    data = None
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
