"""Streaming load straight onto a mesh: every parameter is built shard by shard on the devices that hold it,
each shard read from the checkpoint by byte range (safetensors and torch .bin through a memory map, GGUF by
dequantizing only the rows a shard needs). The whole model is never on one host; a host reads only the slices its
own devices hold, and the staging memory is one shard at a time.

`jax.make_array_from_callback` would read every local shard before placing any; placing them one by one and joining
them with `jax.make_array_from_single_device_arrays` keeps the staging to a single shard.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .models import transformer
from .models.config import ModelConfig, from_hf_config
from .models.model import Model
from .sharding import LOGICAL_AXIS_RULES, ShardingError, param_shardings

L = importlib.import_module(__package__ + ".loading")


# --------------------------------------------------------------------------------------------------------------
# Tensor sources: one checkpoint tensor in its Hugging Face layout, readable by parts


class TensorSource:
    """A checkpoint tensor readable by parts: `read(rows, cols)` for a 2-D [out, in] tensor, `read(index)` for
    others. `rows`/`cols` are slices or sorted index arrays."""

    def __init__(self, name: str, shape: tuple, array: Callable[[], np.ndarray]):
        self.name, self.shape, self._array = name, tuple(shape), array

    def read(self, *index) -> np.ndarray:
        a = self._array()
        if len(index) == 2:
            return np.asarray(a[index[0]][:, index[1]])
        return np.asarray(a[index[0]])


class GGUFSource(TensorSource):
    """A GGUF tensor: only the rows a shard needs are dequantized; llama.cpp's q/k row permutation is undone by
    reading the permuted rows."""

    def __init__(self, name, tensor, row_perm=None):
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        super().__init__(name, shape, None)
        self.tensor, self.row_perm = tensor, row_perm

    def read(self, *index):
        import gguf

        data = self.tensor.data
        rows = index[0]
        if self.row_perm is not None:
            rows = self.row_perm[rows]
        part = data[rows]
        if self.tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            part = gguf.quants.dequantize(part, self.tensor.tensor_type)
        part = np.asarray(part, np.float32)
        return part[:, index[1]] if len(index) == 2 else part


def safetensors_sources(path: Path) -> dict[str, TensorSource]:
    out = {}
    for name, (dtype, shape, offset) in L.safetensors_index(path).items():
        def array(dtype=dtype, shape=shape, offset=offset):
            count = int(np.prod(shape)) if shape else 1
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)
        out[name] = TensorSource(name, shape, array)
    return out


def torch_bin_sources(path: Path) -> dict[str, TensorSource]:
    return {name: TensorSource(name, None, load) for name, load in L.read_torch_bin(path)}


def hf_folder_sources(folder: Path) -> tuple[dict, dict[str, TensorSource]]:
    """(config.json, sources) of a Hugging Face folder: one safetensors file, a sharded index, or .bin files."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise L.CheckpointError(f"{folder}: not a model folder (no config.json)")
    hf = json.loads((folder / "config.json").read_text())
    files, reader = L.hf_checkpoint_files(folder)
    sources = {}
    for f in files:
        if not f.exists():
            raise L.CheckpointError(f"checkpoint shard {f} is listed in the index but missing")
        part = safetensors_sources(f) if reader is L.read_safetensors else torch_bin_sources(f)
        for name, src in part.items():
            if name in sources:
                raise L.CheckpointError(f"{folder}: tensor {name!r} appears in more than one shard")
            if src.shape is None:  # torch: shape from the mapped tensor itself
                src.shape = tuple(src._array().shape)
            sources[name] = src
    return hf, sources


def gguf_sources(path: Path) -> tuple[dict, dict[str, TensorSource], object]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    hf = L.gguf_hf_config(reader)
    sources = {}
    for t in reader.tensors:
        for pattern, target in L.GGUF_NAMES:
            m = re.fullmatch(pattern, t.name)
            if m:
                name = m.expand(target)
                break
        else:
            raise L.CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r}")
        perm = None
        heads = {".q_proj.": hf["num_attention_heads"], ".k_proj.": hf["num_key_value_heads"]}
        for key, n in heads.items():
            if key in name and name.endswith(".weight"):
                perm = L.unpermute_rows(np.arange(int(t.shape[-1])), n)
        sources[name] = GGUFSource(name, t, perm)
    return hf, sources, reader


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
    """The part `index` of our parameter of `shape` (transform `kind`, see load.py) read from `src`."""
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


def _claim(config: ModelConfig, sources: dict[str, TensorSource], origin: str):
    """{(path, layer): (source, kind)}, checking names, shapes, duplicates and completeness as load.py does."""
    abstract = transformer.abstract_params(config)
    stack = abstract["segments"]["seg_0"]
    claimed = {}
    for raw_name, src in sources.items():
        name = L._normalise_name(config.family, raw_name)
        if any(re.fullmatch(p, name) for p in L.IGNORED):
            continue
        hit = L._match(config.family, name)
        if hit is None:
            raise L.CheckpointError(f"{origin}: unexpected tensor {raw_name!r} (no parameter of a {config.family} "
                                    f"model takes it)")
        path, layer, kind = hit
        if path == ["lm_head"] and config.tie_word_embeddings:
            continue
        if layer is not None:
            if layer >= config.num_layers:
                raise L.CheckpointError(f"{origin}: tensor {raw_name!r} is for layer {layer}, but the config has "
                                        f"{config.num_layers} layers")
            path = path[1:]
            target = L._get_or_none(stack, path)
            shape = None if target is None else target.shape[1:]
        else:
            target = L._get_or_none(abstract, path)
            shape = None if target is None else target.shape
        if target is None:
            raise L.CheckpointError(f"{origin}: unexpected tensor {raw_name!r} for this config")
        if tuple(src.shape) != L._hf_shape(kind, shape):
            raise L.CheckpointError(f"{origin}: tensor {raw_name!r} has shape {tuple(src.shape)}, expected "
                                    f"{L._hf_shape(kind, shape)}")
        key = (tuple(path), layer)
        if key in claimed:
            raise L.CheckpointError(f"{origin}: tensor {raw_name!r} appears twice")
        claimed[key] = (src, kind)
    L._check_complete(config, abstract, set(claimed), origin)
    return abstract, claimed


def stream_params(config: ModelConfig, sources: dict[str, TensorSource], mesh, dtype=None, *,
                  rules=LOGICAL_AXIS_RULES, origin: str = "checkpoint", on_shard: Callable | None = None):
    """The dense parameter tree, each leaf a global `jax.Array` with its logical-axis `NamedSharding` on `mesh`,
    built from this host's shards only. `on_shard(nbytes)` is called after each shard lands on its device."""
    if not config.is_dense:
        raise L.CheckpointError("checkpoints are imported into dense models only")
    dtype = np.dtype(jnp.dtype(dtype or config.dtype))
    tensor = dict(mesh.shape).get("tensor", 1)
    for what in ("num_heads", "num_kv_heads"):
        if getattr(config, what) % tensor:
            raise ShardingError(f"mesh tensor={tensor} does not divide {what}={getattr(config, what)}; pick a tensor "
                                f"size that divides the heads")
    abstract, claimed = _claim(config, sources, origin)
    shardings = param_shardings(abstract, transformer.param_axes(config), mesh, rules)  # errors before any read

    def build(path, leaf, sharding):
        keys = tuple(p.key for p in path)
        stacked = keys[:2] == ("segments", "seg_0")
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


# --------------------------------------------------------------------------------------------------------------
# Entry point


def stream_load(source, mesh, dtype: str = "float32", cache=None, on_shard: Callable | None = None) -> Model:
    """`load.load(source, dtype, mesh=mesh)`: an embedded name, a Hugging Face folder (safetensors, sharded or not,
    or .bin) or hub id, or a .gguf file, streamed onto `mesh`."""
    source_str = str(source)
    path = Path(source_str).expanduser()
    if source_str in L.EMBEDDED_MODELS:
        path = L.embedded_hf_folder(source_str, cache)
    elif path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        hf, sources, _reader = gguf_sources(path)
        config = from_hf_config(hf, dtype=dtype)
        params = stream_params(config, sources, mesh, dtype, origin=str(path), on_shard=on_shard)
        return Model(config, params, L.gguf_tokenizer(path, _reader), mesh)
    elif path.is_dir() and (path / L.ORBAX_MARKER).exists():  # our Orbax format restores sharded by itself
        return importlib.import_module(__package__ + ".export").load_orbax_model(path, dtype=dtype, mesh=mesh)
    elif not path.exists() and L._looks_like_hub_id(source_str):
        path = L._download(source_str)
    elif not path.is_dir():
        return L.load(source, dtype, mesh=None, cache=cache)  # raises the usual clear error
    hf, sources = hf_folder_sources(path)
    config = from_hf_config(hf, dtype=dtype)
    params = stream_params(config, sources, mesh, dtype, origin=str(path), on_shard=on_shard)
    return Model(config, params, L.load_tokenizer(path), mesh)
