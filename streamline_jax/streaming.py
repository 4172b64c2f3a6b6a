"""Streaming load straight onto a mesh: every parameter is built shard by shard on the devices that hold it,
each shard read from the checkpoint by byte range (safetensors and torch .bin through a memory map, GGUF by
dequantizing only the rows a shard needs). The whole model is never on one host; a host reads only the slices its
own devices hold, and the staging memory is one shard at a time; of the stacked layers, one stacked tensor's shards,
each layer's tensor read once for all of this host's devices (`place_layers`).

`jax.make_array_from_callback` would read every local shard before placing any; placing them one by one and joining
them with `jax.make_array_from_single_device_arrays` keeps the staging to a single shard.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import CheckpointError, TensorSource, claim_tensors, to_param
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
        shape = tuple(leaf.shape)
        if keys[:2] == ("segments", transformer.segment_key(0)):
            return place_layers(shape, sharding, lambda layer: claimed[(keys[2:], layer)], dtype, on_shard)
        src, kind = claimed[(keys, None)]
        return place(shape, sharding, lambda index: read_param_part(src, kind, shape, index, dtype), on_shard)

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


def place_layers(shape, sharding, layer_source: Callable, dtype, on_shard: Callable | None = None) -> jax.Array:
    """A global array of stacked layers [L, ...], each layer's tensor (`layer_source(layer)`: (source, kind)) read
    once and cut for every device of this host that holds part of it; each distinct shard is staged on the host
    whole, placed on its devices and dropped. Reading each device's part on its own read a layer's every page once per
    device (its columns are strided): 8 simulated devices took 10 minutes over llama2-7b once its files outgrew the
    page cache. The staging is this host's share of one stacked tensor (the first ones built are the largest)."""
    shape, inner = tuple(shape), tuple(shape[1:])
    shards = {}  # distinct shard -> (its index beyond the layer axis, its layers, its devices, host array)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        layers = list(range(shape[0])[index[0]])
        key = (_key(index[1:], inner), tuple(layers))
        if key not in shards:
            part = tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], inner))
            shards[key] = (index[1:], layers, [], np.empty((len(layers),) + part, dtype))
        shards[key][2].append(device)
    for layer in range(shape[0]):
        src, kind = layer_source(layer)
        whole = to_param(kind, src.load(), inner)  # one read: its pages stay cached while every part is cut
        for index, layers, _, host in shards.values():
            if layer in layers:
                host[layers.index(layer)] = whole[index]
        whole = None
    placed = {}
    for key in list(shards):
        _, _, devices, host = shards.pop(key)
        for device in devices:
            placed[device] = jax.device_put(host, device).block_until_ready()
            if on_shard:
                on_shard(placed[device].nbytes)
        host = None
    arrays = [placed[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
