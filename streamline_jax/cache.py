"""Results that outlive a run, keyed by what they depend on: the dense model's evaluation, reused by reruns and by
every point of a sweep (see `run`).

A key is a SHA-256 over a JSON description of the inputs. Files enter it by path, size and modification time (not
their bytes: hashing a 26 GB checkpoint would cost more than most evaluations), and the package's own source enters
it whole, so a code change never serves a stale figure. The cache folder is $STREAMLINE_JAX_RESULTS_CACHE, else
~/.cache/streamline_jax/results; `STREAMLINE_JAX_RESULTS_CACHE=off` turns it off.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .files import write_atomic

PACKAGE = Path(__file__).resolve().parent


def cache_root() -> Path | None:
    where = os.environ.get("STREAMLINE_JAX_RESULTS_CACHE", "")
    if where.lower() == "off":
        return None
    return Path(where).expanduser() if where else Path.home() / ".cache" / "streamline_jax" / "results"


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def path_stamp(path: str | os.PathLike) -> Any:
    """What a file or folder is, cheaply: each file's path, size and mtime; a name that is no path stays a name."""
    path = Path(path).expanduser()
    if path.is_file():
        return _file_stamp(path)
    if path.is_dir():
        return [_file_stamp(p) for p in sorted(path.rglob("*")) if p.is_file()]
    return str(path)


@functools.cache  # the code a process runs is the code it imported, whatever happens to the files later
def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(PACKAGE.rglob("*.py")):
        h.update(p.relative_to(PACKAGE).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"__type__": type(x).__name__, **{k: _plain(v) for k, v in dataclasses.asdict(x).items()}}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)


def content_key(**parts) -> str:
    """The key of a result computed from `parts` (JSON-able values, dataclasses, path stamps) by this package."""
    text = json.dumps({"source": _source_digest(), **_plain(parts)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read(kind: str, key: str) -> dict | None:
    root = cache_root()
    if root is None:
        return None
    path = root / kind / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # absent, or cut short by a crash of an older version
        return None


def write(kind: str, key: str, value: dict) -> Path | None:
    """Store `value` (JSON-able) atomically: a reader sees the whole file or none."""
    root = cache_root()
    if root is None:
        return None
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / f"{key}.json", json.dumps(value))
