"""The whole pipeline in one command:

    python -m streamline_jax.run                                   # the embedded SmolLM2-135M, offline, minutes
    python -m streamline_jax.run --model llama2-13b --out runs/l13 prune.replacement=ffn train.lr=1e-4

load → score → choose span → prune → train the block → evaluate dense and pruned → save (Orbax + Hugging Face) and
report (report.json, report.md, plots). Settings: configs/pipeline.yaml (the paper's defaults), then the model
preset configs/<name>.yaml, then `--config FILE`, then `key=value` overrides (dotted keys, YAML values).

The output folder is marked finished by a `DONE` file written last. A folder holding a finished run is refused
unless --overwrite, which writes the new run beside it (`.NAME.overwrite`) and puts it in its place only once it has
finished; an unfinished one is continued by the same command (training from its checkpoint). A folder holding
anything a run does not write is never touched. Every setting is checked before the folder is.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import shlex
import sys
from pathlib import Path


# The settings', output folder's and pipeline's public names, re-exported: `streamline_jax.run` is the module the
# command line's users import.
from .pipeline import SharedWork, run
from .run_folder import (DONE, LOCK, TRAIN_CHECKPOINT, folder_lock, mark_holder, settings_diff,
                         staging_folder)
from .run_inputs import check_inputs
from .settings import (CONFIG_DIR, DEFAULT_MODEL, STAGES, ConfigError, RunConfig, TrainSection,
                       build_config, check_layer, parse_overrides, preset_model_config, preset_names, read_yaml,
                       valid_keys)

__all__ = ["main", "make_parser", "parse_stages", "run", "SharedWork", "check_inputs", "DONE", "LOCK",
           "TRAIN_CHECKPOINT", "folder_lock", "mark_holder", "settings_diff", "staging_folder", "CONFIG_DIR",
           "DEFAULT_MODEL", "STAGES", "ConfigError", "RunConfig", "TrainSection", "build_config", "check_layer",
           "parse_overrides", "preset_model_config", "preset_names", "read_yaml", "valid_keys"]

NEEDS = {"prune": ("score",), "train": ("prune",), "save": ("prune",)}

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # streamline_jax.run under `python -m` too


# --------------------------------------------------------------------------------------------------------------
# Command line


def parse_stages(text: str | None) -> tuple[str, ...]:
    if not text:
        return STAGES
    wanted = [s.strip() for s in text.replace(",", " ").split() if s.strip()]
    for s in wanted:
        if s not in STAGES:
            near = difflib.get_close_matches(s, STAGES, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown stage {s!r}{hint} (stages: {', '.join(STAGES)}; load always runs)")
    chosen = set(wanted)
    for s in reversed(STAGES):  # prerequisites, later stages first: train needs prune, which needs score
        if s in chosen:
            chosen.update(NEEDS.get(s, ()))
    return tuple(s for s in STAGES if s in chosen)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamline-jax",
        description="LLM-Streamline in one command: load, score, prune, train, evaluate, save, report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(preset_names()) + "\nstages: " + ", ".join(STAGES) +
               "\nkeys: " + ", ".join(valid_keys()))
    p.add_argument("--model", help=f"preset name, local folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    from .config_files import recipe_names

    p.add_argument("--config", help="a YAML file of settings, or a shipped recipe's name (" +
                                    ", ".join(recipe_names()) + "), applied after the preset")
    p.add_argument("--out", help="output folder (default runs/<model>)")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (prerequisites are added)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="folder for compiled programs reused by later runs, or 'off' (default: "
                        "$STREAMLINE_JAX_COMPILATION_CACHE, else ~/.cache/streamline_jax/xla)")
    p.add_argument("--target", help="mesh layout from configs/meshes.yaml (e.g. v5e-16, v5p-32, 8xH100); default: the "
                                    "layout whose chips and count match the devices found, else the mesh.* settings")
    p.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2",
                   help="run every value (every combination, when repeated) into OUT/points/: one load, one scoring "
                        "pass and one dense evaluation for all; a table and plot of quality against size in OUT")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. train.lr=1e-4")
    from .distributed import add_arguments

    add_arguments(p)
    return p


def default_out(config: RunConfig, preset: str | None, sweep: bool = False) -> Path:
    name = preset or Path(config.model.source.rstrip("/")).name.removesuffix(".gguf")
    return Path("runs") / (f"{name}-sweep" if sweep else name)


def _training_error():
    from .train import TrainingError

    return TrainingError


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when the handler was made."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def main(argv: list[str] | None = None) -> int:
    from .interrupts import terminate_as_interrupt

    with terminate_as_interrupt():  # a scheduler's SIGTERM stops the run like Ctrl-C: at a safe point, resumable
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = make_parser().parse_intermixed_args(argv)
    package_log = logging.getLogger(__package__)  # every module's logger is its child
    if not package_log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        package_log.addHandler(h)
        package_log.setLevel(logging.INFO)
        package_log.propagate = False
    try:
        config, preset = build_config(args.model, args.config, args.overrides)
        stages = parse_stages(args.stages)
        out = Path(args.out) if args.out else default_out(config, preset, bool(args.sweep))
        if args.sweep:
            from .sweep import parse_axes

            axes = parse_axes(args.sweep)
            if args.resume:
                raise ConfigError("--resume does not apply to a sweep: a sweep continues its unfinished points "
                                  "by itself")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .distributed import DistributedError, enable_compilation_cache, initialize_from_args

    try:
        initialize_from_args(args)  # before any other JAX call; a no-op for one process off TPU
        enable_compilation_cache(args.compilation_cache)
        if args.target:
            from .mesh_layouts import find_target

            find_target(args.target)  # an unknown layout name fails before any work
    except (DistributedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.sweep:
            from .sweep import run_sweep

            run_sweep(args.model, args.config, args.overrides, axes, out, stages, overwrite=args.overwrite,
                      progress=not args.quiet, target=args.target)
            print(f"sweep report: {Path(out).absolute() / 'report.md'}")
            return 0
        command = "python -m streamline_jax.run " + shlex.join(sys.argv[1:] if argv is None else argv)
        report = run(config, out, stages, overwrite=args.overwrite, resume=args.resume, preset=preset,
                     progress=not args.quiet, target=args.target, command=command)
    except KeyboardInterrupt:
        work = staging_folder(Path(out).absolute()) if args.overwrite else Path(out)
        work = work if work.exists() else Path(out)
        ckpt = work / TRAIN_CHECKPOINT
        where = f" from the training checkpoint in {ckpt}" if ckpt.exists() else ""
        kept = f" ({out} is kept as it was)" if work != Path(out) else ""
        log.error("interrupted: %s is not marked finished%s; the same command continues it%s", work, kept, where)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, _training_error()) as e:
        print("\n".join([f"error: {e}", *getattr(e, "__notes__", ())]), file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a write (a full disk, no permission): one line naming the path
        from .files import describe

        print("\n".join([f"error: {describe(e)}", *getattr(e, "__notes__", ())]), file=sys.stderr)
        return 1
    except Exception as e:  # not bad input but a fault of ours: one line here, the traceback in run.log
        if not getattr(e, "__notes__", None):
            raise
        print("\n".join([f"error: {type(e).__name__}: {e}", *e.__notes__]), file=sys.stderr)
        return 1
    from .distributed import is_main_process
    from .report import summary

    if is_main_process():  # one summary for the whole run
        print(summary(report, Path(out).absolute()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
