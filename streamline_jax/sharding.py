"""Logical axis names → mesh axes (MaxText-style rules), mesh construction and parameter placement.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters), `tensor` (heads / mlp /
vocab split). The batch is split over data and fsdp.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None for replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_proj", None),
    ("positions", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
)


class ShardingError(ValueError):
    pass


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One of the sizes may be -1: it takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError("at most one mesh axis size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices cannot be split into data×fsdp×tensor with fixed sizes "
                                f"{[s for s in sizes if s != -1]}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
                            f"found {len(devices)}")
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> P:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may split only one dimension
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def _check_divisible(path: str, shape, spec: P, mesh: Mesh):
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            raise ShardingError(
                f"parameter {path} dimension {dim} of size {size} cannot be split {parts} ways over mesh axes "
                f"{axes} (mesh {dict(mesh.shape)}); pick a mesh whose tensor/fsdp sizes divide it")


def param_shardings(abstract_params, axes, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for every parameter; raises ShardingError naming a parameter the mesh cannot divide."""
    def one(path, leaf, names):
        spec = logical_to_spec(names, rules)
        _check_divisible(jax.tree_util.keystr(path), leaf.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_params, axes, is_leaf=lambda x: hasattr(x, "shape"))


def shard_params(params, axes, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    shardings = param_shardings(params, axes, mesh, rules)
    return jax.tree.map(jax.device_put, params, shardings)


def shard_bytes(leaf) -> int:
    """Bytes of one device's shard of an array or ShapeDtypeStruct (the whole of it without a sharding)."""
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
    """Split the leading (batch) axis over data and fsdp; replicate if the batch does not divide."""
    parts = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size is not None and batch_size % parts:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(mesh: Mesh, arrays):
    return tuple(jax.device_put(a, batch_sharding(mesh, a.ndim, a.shape[0])) for a in arrays)


def place_batch(mesh: Mesh | None, arrays):
    """A batch's arrays (a tuple, or a dict of them) split over the mesh's data axes; as they are without a mesh."""
    if mesh is None:
        return arrays
    if isinstance(arrays, Mapping):
        return dict(zip(arrays, shard_batch(mesh, tuple(arrays.values()))))
    return shard_batch(mesh, tuple(arrays))
