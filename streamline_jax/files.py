"""Files written whole or not at all: whatever stops the writer (a full disk, a kill), a reader and the next run
find the old file, the new one, or none, never a half-written one. Every file a run writes goes through here (the
folders through `model_io.atomic_folder`), with the permissions the user's umask gives, like any other tool's."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import tempfile
from pathlib import Path

# The temporaries' names: `.NAME.tmp-XXXX` beside the target (a killed writer's are removed by the next run)
TEMP = re.compile(r"^\..+\.tmp-")


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def open_mode(path: Path) -> None:
    """Give `path` (a temporary from mkstemp/mkdtemp, owner-only) the permissions a plain open/mkdir would."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path` for a writer that takes a file name; it replaces `path` once the block
    ends without error, with the umask's permissions, and is removed on any error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        open_mode(tmp)
        os.replace(tmp, path)
    except OSError as e:  # the system's error names the temporary, or no file: name the one being written
        tmp.unlink(missing_ok=True)
        if e.errno is None:  # raised by a writer, not the system: its own words
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Yield a file object writing a temporary beside `path`; it replaces `path` once closed without error, and
    is removed on any error."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def temporaries_of(path: str | os.PathLike) -> list[Path]:
    """The temporaries a writer of `path` killed before its rename left beside it."""
    path = Path(path)
    return [p for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*") if TEMP.match(p.name)]


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}


def describe(e: OSError) -> str:
    """One line for an error of the system's (a full disk, a folder without write permission): what, and where."""
    where = f"{e.filename}: " if e.filename else ""
    hint = ("; free some space and run the same command again" if e.errno in FULL else
            "; choose a folder you can write in (--out)" if e.errno in REFUSED else "")
    return f"{where}{e.strerror or e}{hint}"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text or bytes) to `path` whole or not at all."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)
