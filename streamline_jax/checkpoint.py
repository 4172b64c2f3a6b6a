"""Checkpoint tensors <-> our parameter tree: the name tables of `models/families.py` applied, Hugging Face files
read as tensor sources, and one function (`claim_tensors`) that claims every checkpoint tensor for a parameter,
used by the plain load, the streaming load and the reference tests alike.

Every tensor must be claimed exactly once and have the right shape: a missing, extra or misshapen tensor is an error
that names it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np

from .models import transformer
from .models.config import ModelConfig, UnsupportedArchitectureError, from_hf_config
from .models.families import BLOCK_FAMILIES, IGNORED_TENSORS


class CheckpointError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Tensor sources: one checkpoint tensor in its Hugging Face layout, readable whole or by parts


class TensorSource:
    """A checkpoint tensor: `load()` the whole array, `read(rows, cols)` part of a 2-D [out, in] tensor, `read(index)`
    part of another. `rows`/`cols` are slices or sorted index arrays. `shape=None`: known only once loaded."""

    def __init__(self, name: str, shape: tuple | None, array: Callable[[], np.ndarray]):
        self.name, self._array = name, array
        self._shape = None if shape is None else tuple(shape)

    @property
    def shape(self) -> tuple:
        if self._shape is None:
            self._shape = tuple(np.shape(self._array()))
        return self._shape

    def load(self) -> np.ndarray:
        return np.asarray(self._array())

    def read(self, *index) -> np.ndarray:
        a = self._array()
        if len(index) == 2:
            return np.asarray(a[index[0]][:, index[1]])
        return np.asarray(a[index[0]])


def sources_from_loaders(tensors: Iterable[tuple[str, Callable[[], np.ndarray]]]) -> Iterator[TensorSource]:
    for name, load in tensors:
        yield TensorSource(name, None, load)


# --------------------------------------------------------------------------------------------------------------
# Name tables


def to_param(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    if kind in ("R", "F"):
        return w.reshape(shape)
    return w.T.reshape(shape)


def from_param(kind: str, p: np.ndarray) -> np.ndarray:
    """Inverse of `to_param`: our parameter back to the checkpoint's layout."""
    if kind == "R":
        return p
    if kind == "F":
        return p.reshape(-1)
    k = int(kind[1:])
    return p.reshape(int(np.prod(p.shape[:k])), -1).T


def checkpoint_shape(kind: str, shape: tuple) -> tuple:
    """The checkpoint's shape of a parameter of `shape` stored with transform `kind`."""
    if kind == "R":
        return tuple(shape)
    if kind == "F":
        return (int(np.prod(shape)),)
    k = int(kind[1:])
    return (int(np.prod(shape[k:])), int(np.prod(shape[:k])))


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def get_path_or_none(tree, path):
    try:
        return get_path(tree, path)
    except (KeyError, TypeError):
        return None


def set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def normalise_name(family: str, name: str) -> str:
    fix = BLOCK_FAMILIES[family].hf_prefix_fix  # e.g. facebook/opt-* name tensors without `model.`
    if fix and name.startswith(fix[0]):
        return fix[1] + name[len(fix[0]):]
    return name


def match_name(family: str, name: str):
    """(path in our tree, layer or None, transform kind) of a checkpoint tensor name, or None."""
    for pattern, target, kind in BLOCK_FAMILIES[family].rules:
        m = re.fullmatch(pattern, name)
        if m:
            layer = int(m.group(1)) if target.startswith("layers.") else None
            return m.expand(target).split("."), layer, kind
    return None


def claim_tensors(config: ModelConfig, sources: Iterable[TensorSource], origin: str = "checkpoint"):
    """Claim each checkpoint tensor for one parameter of the dense model `config`.

    Returns (abstract params, {(path, layer): (source, kind)}), where `path` is inside `segments/seg_0` for a layer
    tensor (`layer` its index) and from the root otherwise (`layer` None). Unknown, misshapen, duplicate and missing
    tensors are errors naming them.
    """
    if not config.is_dense:
        raise CheckpointError("checkpoints are imported into dense models only")
    abstract = transformer.abstract_params(config)
    stack = abstract["segments"][transformer.segment_key(0)]
    claimed = {}
    for src in sources:
        raw_name = src.name
        name = normalise_name(config.family, raw_name)
        if any(re.fullmatch(p, name) for p in IGNORED_TENSORS):
            continue
        hit = match_name(config.family, name)
        if hit is None:
            raise CheckpointError(f"{origin}: unexpected tensor {raw_name!r} (no parameter of a {config.family} "
                                  f"model takes it)")
        path, layer, kind = hit
        if path == ["lm_head"] and config.tie_word_embeddings:
            continue  # a tied head saved explicitly is the embedding again
        if layer is not None:
            if layer >= config.num_layers:
                raise CheckpointError(f"{origin}: tensor {raw_name!r} is for layer {layer}, but the config has "
                                      f"{config.num_layers} layers")
            path = path[1:]
            target = get_path_or_none(stack, path)
            shape = None if target is None else tuple(target.shape[1:])
        else:
            target = get_path_or_none(abstract, path)
            shape = None if target is None else tuple(target.shape)
        if target is None:
            raise CheckpointError(f"{origin}: unexpected tensor {raw_name!r} for this config")
        if tuple(src.shape) != checkpoint_shape(kind, shape):
            raise CheckpointError(f"{origin}: tensor {raw_name!r} has shape {tuple(src.shape)}, expected "
                                  f"{checkpoint_shape(kind, shape)}")
        key = (tuple(path), layer)
        if key in claimed:
            raise CheckpointError(f"{origin}: tensor {raw_name!r} appears twice")
        claimed[key] = (src, kind)
    _check_complete(config, abstract, claimed, origin)
    return abstract, claimed


def params_from_sources(config: ModelConfig, sources: Iterable[TensorSource], dtype=None,
                        origin: str = "checkpoint"):
    """The dense parameter tree (numpy arrays on the host) from checkpoint tensors."""
    dtype = np.dtype(jax.numpy.dtype(dtype or config.dtype))
    abstract, claimed = claim_tensors(config, sources, origin)

    def build(path, leaf):
        keys = tuple(p.key for p in path)
        if keys[:2] != ("segments", transformer.segment_key(0)):
            src, kind = claimed[(keys, None)]
            return to_param(kind, src.load(), leaf.shape).astype(dtype)
        out = np.empty(leaf.shape, dtype)
        for layer in range(leaf.shape[0]):
            src, kind = claimed[(keys[2:], layer)]
            out[layer] = to_param(kind, src.load(), leaf.shape[1:])
        return out

    return jax.tree_util.tree_map_with_path(build, abstract)


def params_from_tensors(config: ModelConfig, tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
                        dtype=None, source: str = "checkpoint"):
    """`params_from_sources` for (name, loader) pairs."""
    return params_from_sources(config, sources_from_loaders(tensors), dtype, source)


def _check_complete(config, abstract, claimed, origin):
    missing = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = [p.key for p in path]
        if keys[:2] == ["segments", transformer.segment_key(0)]:
            for layer in range(leaf.shape[0]):
                if (tuple(keys[2:]), layer) not in claimed:
                    missing.append(hf_name(config, keys[2:], layer))
        elif (tuple(keys), None) not in claimed:
            missing.append(hf_name(config, keys, None))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{origin}: missing tensor(s) {', '.join(missing[:5])}{more}")


def hf_name(config, keys, layer):
    """The checkpoint name of one of our parameters (inverse of the rule table)."""
    target = ".".join((["layers"] if layer is not None else []) + list(keys))
    for pattern, tmpl, kind in BLOCK_FAMILIES[config.family].rules:
        if (layer is not None) != tmpl.startswith("layers."):
            continue
        # turn the regex into a name by substituting its groups from the target
        tmpl_re = "^" + re.escape(tmpl).replace(r"\\2", "(.+)").replace(r"\2", "(.+)") + "$"
        m = re.match(tmpl_re, target)
        if not m:
            continue
        name = pattern.replace("\\.", ".")
        if layer is not None:
            name = re.sub(r"\(\\d\+\)", str(layer), name, count=1)
        groups = iter(m.groups())
        name = re.sub(r"\([^)]*\)", lambda _: next(groups), name)
        hit = match_name(config.family, name)
        if hit and hit[0] == target.split(".") and hit[1] == layer:
            return name
    return ".".join(keys)


def hf_tensors_from_params(config: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """Our dense (or `layers`/`layer`-only) parameter tree as Hugging Face tensors, in layer order."""
    top = {k: v for k, v in params.items() if k != "segments"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(top)[0]:
        keys = [p.key for p in path]
        if keys == ["lm_head"] and config.tie_word_embeddings:
            continue
        yield _named(config, keys, None, leaf)
    layer = 0
    for i, seg in enumerate(config.layout):
        seg_params = params["segments"][transformer.segment_key(i)]
        if seg.kind not in ("layers", "layer"):
            raise CheckpointError(f"segment {i} is a {seg.kind!r} block, which has no Hugging Face layer form")
        for j in range(seg.num_layers):
            one = jax.tree.map(lambda a: a[j], seg_params) if seg.kind == "layers" else seg_params
            for path, leaf in jax.tree_util.tree_flatten_with_path(one)[0]:
                yield _named(config, [p.key for p in path], layer, leaf)
            layer += 1


def _named(config, keys, layer, leaf):
    name = hf_name(config, keys, layer)
    return name, from_param(match_name(config.family, name)[2], np.asarray(leaf))


# --------------------------------------------------------------------------------------------------------------
# Hugging Face files


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_index(path: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, absolute byte offset) from a safetensors header; reads no tensor data. A file whose
    header cannot be read, or that is shorter than its header says, is named."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except (struct.error, ValueError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header cannot be read; truncated?)")
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        end = max(end, stop)
        out[name] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: its header lists {8 + n + end:,} bytes, the file has {size:,}")
    return out


def safetensors_sources(path: Path) -> Iterator[TensorSource]:
    """Tensors read lazily through a memory map, bfloat16 included (numpy has no bfloat16 of its own)."""
    for name, (dtype, shape, offset) in safetensors_index(path).items():
        def array(dtype=dtype, shape=shape, offset=offset):
            count = int(np.prod(shape)) if shape else 1
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)
        yield TensorSource(name, shape, array)


def torch_bin_sources(path: Path) -> Iterator[TensorSource]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: PyTorch .bin checkpoints need torch installed (or convert to safetensors)")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name, t in state.items():
        def load(t=t):
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        yield TensorSource(name, tuple(t.shape), load)


def read_hf_config(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None


# config.json fields that must be whole numbers
HF_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "word_embed_proj_dim")


def read_hf_model_config(folder: Path, dtype: str = "float32") -> ModelConfig:
    """A Hugging Face folder's config.json as a ModelConfig; an error names the file and the field at fault."""
    path = Path(folder) / "config.json"
    hf = read_hf_config(folder)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    for key in HF_INT_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{path}: field {key!r} must be an integer, got {value!r}")
    try:
        return from_hf_config(hf, dtype=dtype)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{path}: {e}") from None


def hf_folder_sources(folder: Path) -> list[TensorSource]:
    """The tensor sources of a Hugging Face folder: one safetensors file, a sharded index, or .bin files."""
    folder = Path(folder)
    sources, seen = [], set()
    for f in checkpoint_files(folder):
        if not f.exists():
            raise CheckpointError(f"checkpoint shard {f} is listed in the index but missing")
        for src in (torch_bin_sources(f) if f.suffix == ".bin" else safetensors_sources(f)):
            if src.name in seen:
                raise CheckpointError(f"{folder}: tensor {src.name!r} appears in more than one shard")
            seen.add(src.name)
            sources.append(src)
    return sources


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder (its shards, in order)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin found")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    """Whether a Hugging Face folder holds a tokenizer (one of TOKENIZER_FILES)."""
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None where it has none."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
