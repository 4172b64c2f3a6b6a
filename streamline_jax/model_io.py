"""Our own model folders: Orbax checkpoints of any layout (restored onto any mesh, whatever device count saved
them), and the atomic folder writes every saved folder goes through.

Orbax folder:   params/ (Orbax), tokenizer files, `streamline_model.json` (the config; written last: its presence
                means the folder is complete). `loading.load(folder)` reads it back through `load_orbax_model`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from .checkpoint import load_tokenizer
from .files import open_mode
from .models import transformer
from .models.config import ModelConfig
from .models.model import Model

ORBAX_MARKER = "streamline_model.json"  # written last by save_orbax_model
ORBAX_FORMAT = 1
PARAMS_DIR = "params"


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False, all_processes: bool = False):
    """Yield a temporary folder beside `target`; on success it replaces `target`, on error it is removed.
    `all_processes`: every process of a multi-process run calls this and writes into the same folder (an Orbax
    save); process 0 makes it and swaps it in once all have finished."""
    from .distributed import barrier, is_main_process

    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite (--overwrite) to replace it")
    together = all_processes and jax.process_count() > 1
    leader = not together or is_main_process()
    if together:  # one name every process agrees on
        tmp = target.with_name(f".{target.name}.tmp-all-processes")
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(f"atomic_folder:made:{target}")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if together:
            barrier(f"atomic_folder:written:{target}")
        if leader:  # mkdtemp's folder (and some writers' files) are the owner's only; the umask decides, as elsewhere
            for path in [tmp, *tmp.rglob("*")]:
                open_mode(path)
        if leader and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif leader:
            os.replace(tmp, target)
        if together:
            barrier(f"atomic_folder:swapped:{target}")
    finally:
        if leader and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Orbax


def save_orbax_model(model: Model, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save params (Orbax, sharded as they are), the tokenizer and the config marker (last) into `folder`. In a
    multi-process run every process calls it."""
    from .distributed import is_main_process, save_params

    folder = Path(folder).absolute()
    with atomic_folder(folder, overwrite, all_processes=True) as tmp:
        save_params(tmp / PARAMS_DIR, model.params)  # every process writes its own shards
        if is_main_process():
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(str(tmp))
            (tmp / ORBAX_MARKER).write_text(json.dumps(
                {"format": ORBAX_FORMAT, "params": PARAMS_DIR, "config": model.config.to_dict()}, indent=2) + "\n")
    return folder


def read_orbax_config(folder: str | os.PathLike) -> ModelConfig:
    marker = Path(folder) / ORBAX_MARKER
    if not marker.exists():
        raise FileNotFoundError(f"{folder} is not a finished streamline_jax model folder (no {ORBAX_MARKER})")
    meta = json.loads(marker.read_text())
    if meta.get("format") != ORBAX_FORMAT:
        raise ValueError(f"{marker}: unknown format {meta.get('format')!r}; this version reads format {ORBAX_FORMAT}")
    return ModelConfig.from_dict(meta["config"])


def load_orbax_model(path: str | os.PathLike, dtype: str | None = None, mesh=None) -> Model:
    """Restore a model saved by `save_orbax_model` onto `mesh` (sharded by the logical-axis rules) or, without one,
    onto the default device, whatever device count saved it. `dtype` casts the parameters (default: as saved)."""
    from .distributed import restore_params
    from .sharding import param_shardings

    folder = Path(path).absolute()
    config = read_orbax_config(folder)
    if dtype is not None:
        config = config.replace(dtype=str(jnp.dtype(dtype)))
    abstract = transformer.abstract_params(config)
    if mesh is not None:
        shardings = param_shardings(abstract, transformer.param_axes(config), mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = restore_params(folder / PARAMS_DIR, target)
    return Model(config, params, load_tokenizer(folder), mesh)
