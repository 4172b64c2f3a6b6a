"""Stage 6, export: the pruned model as an Orbax checkpoint (any layout, restored onto any mesh) and as a stock
Hugging Face folder (layouts made of decoder layers and `ffn` blocks).

Orbax folder:   see `model_io.py`.
HF folder:      config.json (the pruned depth), model.safetensors (or shards + index), tokenizer files.
                An `ffn` block becomes a decoder layer whose attention output projection is zero: the same function.
                An `mlp` or `linear` block has no stock form: `ExportError`.

Every folder is written into a temporary folder beside the target and renamed into place, so a failed or
interrupted write never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import hf_tensors_from_params
from .distributed import host_readable
from .model_io import ORBAX_MARKER, atomic_folder, load_orbax_model, read_orbax_config, save_orbax_model  # noqa: F401
from .models import transformer
from .models.config import ModelConfig, Segment, to_hf_config
from .models.model import Model

MAX_SHARD_BYTES = 5 * 1024 ** 3  # safetensors shard size, as transformers' save_pretrained defaults to


class ExportError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Hugging Face


def check_hf_exportable(config: ModelConfig) -> None:
    """Raise `ExportError` before any work if the layout has no stock Hugging Face form."""
    for i, seg in enumerate(config.layout):
        if seg.kind in ("mlp", "linear"):
            raise ExportError(f"segment {i} is an `{seg.kind}` replacement block, which no stock Hugging Face "
                              f"architecture has (a decoder layer's feed-forward is not linear); it can only be saved "
                              f"as an Orbax checkpoint (load it with streamline_jax.load)")
        if seg.kind == "ffn" and config.family == "opt" and not config.do_layer_norm_before:
            raise ExportError("an `ffn` block of a post-norm OPT (do_layer_norm_before=False) is not a decoder layer "
                              "with zero attention (the attention layer norm would still apply); use Orbax")


def as_decoder_layers(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """The same function with every `ffn` block written as a full decoder layer whose attention adds zero:
    attention projections (and biases) zero, the attention norm's scale one and bias zero."""
    check_hf_exportable(config)
    if not any(seg.kind == "ffn" for seg in config.layout):
        return config, params
    layer_config = config.one_block(Segment("layer"))
    layer_shapes = transformer.abstract_params(layer_config)["segments"][transformer.segment_key(0)]
    segments, layout = {}, []
    for i, seg in enumerate(config.layout):
        p = params["segments"][transformer.segment_key(i)]
        if seg.kind == "ffn":
            def fill(path, a, ffn=p):
                keys = [k.key for k in path]
                try:
                    sub = ffn
                    for k in keys:
                        sub = sub[k]
                    return jnp.asarray(sub)
                except KeyError:  # attention part: a zero contribution
                    value = 1.0 if keys[-1] == "scale" else 0.0
                    return jnp.full(a.shape, value, a.dtype)
            p = jax.tree_util.tree_map_with_path(fill, layer_shapes)
            seg = Segment("layer")
        segments[transformer.segment_key(i)] = p
        layout.append(seg)
    new_params = {**params, "segments": segments}
    return config.replace(layout=tuple(layout)), new_params


def write_safetensors(tensors, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write (name, array) pairs as model.safetensors, or as shards plus model.safetensors.index.json. One tensor is
    in memory at a time: each goes to its shard's data file as it comes, and the header is put in front of the data
    once every shard is known (numpy has no bfloat16 of safetensors' writer: the header is written here)."""
    shards: list[dict] = []  # {name: (dtype, shape, nbytes)} per shard; its data in folder/.shard-<i>.data
    size, data = 0, None
    try:
        for name, array in tensors:
            array = np.ascontiguousarray(array)
            if data is None or (shards[-1] and size + array.nbytes > max_shard_bytes):
                if data is not None:
                    data.close()
                shards.append({})
                size, data = 0, open(folder / f".shard-{len(shards)}.data", "wb")
            data.write(array.tobytes())
            shards[-1][name] = (array.dtype, array.shape, array.nbytes)
            size += array.nbytes
    finally:
        if data is not None:
            data.close()
    if len(shards) == 1:
        _finish_shard(folder / ".shard-1.data", shards[0], folder / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _finish_shard(folder / f".shard-{i + 1}.data", shard, folder / fname)
        names.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(nbytes for shard in shards for _, _, nbytes in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16",
                      np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def _finish_shard(data: Path, shard: dict, path: Path) -> None:
    """The safetensors file: its header, then the shard's data file copied behind it (and removed)."""
    import shutil

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, nbytes) in shard.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f, open(data, "rb") as src:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        shutil.copyfileobj(src, f, 64 * 1024 ** 2)
    data.unlink()


def export_hf(model: Model, folder: str | os.PathLike, overwrite: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` as a stock Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads with no custom
    code: config.json with the pruned depth, safetensors, tokenizer. `ExportError` for an `mlp` block."""
    config = model.config
    check_hf_exportable(config)  # before any work
    if model.tokenizer is None:
        raise ExportError("the model has no tokenizer; a Hugging Face folder needs one (load the model with it)")
    folder = Path(folder).absolute()
    layer_config, params = as_decoder_layers(config, model.params)
    hf_config = to_hf_config(layer_config)
    with atomic_folder(folder, overwrite) as tmp:
        write_safetensors(hf_tensors_from_params(layer_config, host_readable(params)), tmp, max_shard_bytes)
        model.tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")  # last
    return folder
