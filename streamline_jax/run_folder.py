"""A run's output folder: what a run writes there (and nothing else is touched), the overwrite staging beside it,
the lock, the record of a failure, and the check that a resumed run has the same settings."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from .files import TEMP, write_atomic
from .settings import ConfigError, RunConfig

DONE = "DONE"
RUN_CONFIG = "run_config.yaml"
FAILED = "FAILED"  # what the last failed run said: its stage and error; removed when a run finishes
LOCK = ".lock"
TRAIN_CHECKPOINT = "train_checkpoint"
DISTILL_CHECKPOINT = "distill_checkpoint"  # train.distill_steps' phase
PAIR_CACHE = "pair_cache"  # the span's (input, target) pairs on disk while the run lasts (train.pair_cache)
SPAN_HEAL = "span_heal.json"  # score.metric=heal's candidates, which a resume reads instead of healing again
OFFLOADED_SPAN = "offloaded_span"  # the dense span's layers on disk while training reads cached pairs
SELF_DATA = "self_data.jsonl"  # the dense model's own text for the distillation (data.distill_text=self)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The output folder


def settings_diff(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every setting that differs between a saved run's settings and these."""
    return [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {now[s][k]!r}" for s in now for k in now[s]
            if saved.get(s, {}).get(k) != now[s][k]]


def saved_settings(folder: Path) -> dict | None:
    """The settings of the run in `folder`; None where it holds none whole (absent, empty or cut short, as a full
    disk left it before these files were written atomically)."""
    try:
        saved = yaml.safe_load((folder / RUN_CONFIG).read_text())
    except (FileNotFoundError, IsADirectoryError, yaml.YAMLError, UnicodeDecodeError):
        return None
    whole = isinstance(saved, dict) and saved and all(isinstance(v, dict) for v in saved.values())
    return saved if whole else None


def write_settings(folder: Path, config: RunConfig) -> None:
    write_atomic(folder / RUN_CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_failure(out: Path) -> str | None:
    """What the last run in `out` said when it failed ("stage: error"), or None."""
    path = out / FAILED
    return path.read_text().strip() if path.exists() else None


# What a run writes in its folder; a folder holding anything else is not ours and is never touched.
RUN_FILES = {DONE, RUN_CONFIG, FAILED, LOCK, SPAN_HEAL, SELF_DATA, "report.json", "report.md", "run.log"}
RUN_FOLDERS = {TRAIN_CHECKPOINT, DISTILL_CHECKPOINT, PAIR_CACHE, "model", "hf", "plots"}
# Settings that change only evaluation, samples and what is saved: a resume may change them (training is kept).
RESUMABLE_SECTIONS = ("eval", "samples", "export")


def staging_folder(out: Path) -> Path:
    """Where --overwrite writes the new run, beside the old one, until it finishes and takes the old one's place."""
    return out.parent / f".{out.name}.overwrite"


def foreign_entries(out: Path) -> list[str]:
    """What `out` holds that no run writes (a user's notes, other folders): such a folder is never ours."""
    return sorted(p.name for p in out.iterdir()
                  if not ((p.name in RUN_FILES and p.is_file()) or (p.name in RUN_FOLDERS and p.is_dir())
                          or TEMP.match(p.name)))  # the temporaries of a run killed while writing


def is_run_folder(out: Path) -> bool:
    return (out / RUN_CONFIG).is_file() and not foreign_entries(out)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _refuse_foreign(out: Path) -> None:
    if (out / RUN_CONFIG).is_file():
        raise ConfigError(f"--out {out} holds a run and also {', '.join(foreign_entries(out))}, which no run writes; "
                          f"move them out or choose another folder (nothing was changed)")
    raise ConfigError(f"--out {out} is not empty and holds no streamline_jax run; choose another folder")


def prepare_out(out: Path, config: RunConfig, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Check `out` before any work; return (the folder to write the run in, whether the run resumes there).

    A finished run is refused unless overwrite; an unfinished one resumes by itself when its settings equal these
    (or differ only in evaluation, samples or export settings), and is refused, naming the settings that differ,
    when they do not (unless overwrite). With overwrite, the new run is written in `staging_folder(out)`, and
    `finish_out` puts it in the old run's place once it has finished: until then the old run is kept whole."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file")
    contents = [p for p in out.iterdir() if p.name != LOCK] if out.exists() else []
    if contents and not is_run_folder(out):
        _refuse_foreign(out)
    if contents and not (out / DONE).exists() and saved_settings(out) is None:
        log.warning("%s holds no whole %s (a run stopped as it began, e.g. by a full disk): treated as empty",
                    out, RUN_CONFIG)
        for path in contents:
            _remove(path)
        contents = []
    if overwrite and contents:
        return _prepare_staging(out, config)
    if (out / DONE).exists():
        if resume:
            raise ConfigError(f"{out} holds a finished run; nothing to resume (pass --overwrite to run again)")
        raise ConfigError(f"{out} holds a finished run; pass --overwrite to replace it (it is kept until the new "
                          f"run finishes)")
    if contents:
        _check_resume(out, config, resume)
        resume = True
    elif resume:
        raise ConfigError(f"--resume: {out} holds no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_settings(out, config)
    return out, resume


def _check_resume(out: Path, config: RunConfig, resume: bool) -> None:
    """Allow continuing the unfinished run in `out` with these settings, or refuse naming what differs."""
    failure = read_failure(out)
    stopped = f"it stopped in {failure}" if failure else "it did not finish"
    diff = settings_diff(saved_settings(out) or {}, config.to_dict())
    fixed = [d for d in diff if not d.startswith(tuple(f"{s}." for s in RESUMABLE_SECTIONS))]
    if fixed:
        raise ConfigError(f"{out} holds an unfinished run ({stopped}) whose settings differ from these in "
                          f"{'; '.join(fixed)}. Rerun with its settings to continue it, pass --overwrite to "
                          f"start again with these (the old run is kept until the new one finishes), or choose "
                          f"another --out")
    if diff:  # evaluation-only changes: training and its checkpoint are kept
        log.info("%s: continuing the unfinished run (%s) with new evaluation settings: %s", out, stopped,
                 "; ".join(diff))
        write_settings(out, config)
    elif not resume:
        log.info("%s holds an unfinished run with the same settings (%s): resuming it", out, stopped)
    for path in out.iterdir():  # the temporaries of a run killed while writing
        if TEMP.match(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _prepare_staging(out: Path, config: RunConfig) -> tuple[Path, bool]:
    """The staging folder for --overwrite and whether the run resumes there: an unfinished replacement with these
    settings is continued (from its training checkpoint), any other is started again."""
    staging = staging_folder(out)
    if staging.exists():
        if not staging.is_dir() or [p for p in staging.iterdir() if p.name != LOCK] and not is_run_folder(staging):
            raise ConfigError(f"{staging} (where --overwrite writes the new run) holds something else; remove it")
        saved = saved_settings(staging)
        same = saved is not None and not settings_diff(saved, config.to_dict())
        if same and not (staging / DONE).exists():
            log.info("continuing the unfinished replacement of %s in %s", out, staging)
            _check_resume(staging, config, True)
            return staging, True
        shutil.rmtree(staging)
    staging.mkdir()
    write_settings(staging, config)
    log.info("--overwrite: the new run is written in %s; %s is kept until it finishes", staging, out)
    return staging, False


def finish_out(work: Path, out: Path) -> None:
    """Put a finished run written in a staging folder in `out`'s place (one atomic exchange where the system has
    it), then remove the old run."""
    if work == out:
        return
    if not _exchange(work, out):
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(work, out)
        work = old
    shutil.rmtree(work)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold `out`'s lock for the run: a second run on the same folder is refused with the holder's pid and start
    time. The lock is the kernel's (flock on the folder itself), so it goes with the process however it dies; the
    holder's pid and start time are written in `out/.lock` once the folder is known to be ours (`mark_holder`)
    and cleared at the end, so a record left behind is a stale lock of a run that was killed."""
    import fcntl

    if out.exists() and not out.is_dir():  # before mkdir, which would fail on it with a traceback
        raise ConfigError(f"--out {out} is a file")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
            raise ConfigError(f"{out} is in use by another run ({holder or 'holder unknown'}); wait for it to "
                              f"finish or choose another --out") from None
        stale = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
        if stale:
            log.warning("%s: stale lock of a run that ended without releasing it (%s, no longer running): taken "
                        "over", out, stale)
        try:
            yield
        finally:
            if (out / LOCK).is_file():
                write_atomic(out / LOCK, "")
            if created and out.exists() and not any(out.iterdir()):
                out.rmdir()  # refused before any work: leave no empty folder behind
    finally:
        os.close(fd)  # releases the flock


def mark_holder(folder: Path) -> None:
    write_atomic(folder / LOCK, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")


TRAINED_SPANS = "spans.json"  # in train_checkpoint/: the spans its blocks replace and the data that chose them


def check_trained_spans(c: RunConfig, pruned, out: Path, resume: bool) -> None:
    """Record the spans training starts on; a resume that chose other spans is refused saying why they moved."""
    from .cache import path_stamp
    from .distributed import main_only
    from .run_inputs import data_path

    calibration = data_path(c.data.calibration)
    now = {"spans": [list(s) for s in pruned.config.pruned_spans], "calibration": path_stamp(calibration)}
    path = out / TRAIN_CHECKPOINT / TRAINED_SPANS
    saved = json.loads(path.read_text()) if resume and path.is_file() else None
    if saved is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        main_only(write_atomic)(path, json.dumps(now))
    elif saved["spans"] != now["spans"]:
        why = (f"the calibration data ({calibration}) changed since the run stopped"
               if saved["calibration"] != now["calibration"] else "the calibration data is unchanged")
        raise ConfigError(f"{out}: the chosen span moved from {_spans_text(saved['spans'])} to "
                          f"{_spans_text(now['spans'])}: {why}, so its training checkpoint is of another span. "
                          f"Restore the data to continue the run, or pass --overwrite to start again on this data")


def _spans_text(spans) -> str:
    return ", ".join(f"layers [{start}, {start + length}) -> {kind}" for start, length, kind in spans)
