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
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODEL = "smollm2-135m"
STAGES = ("score", "prune", "train", "evaluate", "save")
PRUNE_INITS = ("default", "linear")
NEEDS = {"prune": ("score",), "train": ("prune",), "save": ("prune",)}
DONE = "DONE"
RUN_CONFIG = "run_config.yaml"
FAILED = "FAILED"  # what the last failed run said: its stage and error; removed when a run finishes
LOCK = ".lock"
TRAIN_CHECKPOINT = "train_checkpoint"
PAIR_CACHE = "pair_cache"  # the span's (input, target) pairs on disk while the run lasts (train.pair_cache)
NOT_PRESETS = ("pipeline", "meshes")

log = logging.getLogger("streamline_jax.run")


class ConfigError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Settings: frozen dataclasses, one per section


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = DEFAULT_MODEL
    hub_id: str | None = None
    dtype: str | None = None
    compute_dtype: str = "auto"
    architecture: dict | None = None


@dataclasses.dataclass(frozen=True)
class DataSection:
    calibration: str = "{data}/corpus/train.jsonl"
    train: str | None = None
    valid: str | None = "{data}/corpus/valid.jsonl"
    text_field: str = "text"
    seq_len: int = 2048
    calib_chunks: int = 256
    train_chunks: int = 4096
    valid_chunks: int = 64
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class ScoreSection:
    metric: str = "cosine"
    sparsity: float | None = 0.25
    num_layers: int | None = None
    protect_first: int = 0
    protect_last: int = 0
    spans: int = 1  # disjoint spans, each replaced by its own block (score.choose_spans)


@dataclasses.dataclass(frozen=True)
class PruneSection:
    replacement: str = "layer"
    mlp_width: int | None = None
    init: str = "default"  # `linear`: fit an mlp/ffn block's output projection in closed form before training
    ridge: float = 1e-4  # of the closed-form fits (`linear` blocks, init=linear), relative to trace(X^T X)/width
    fit_weighting: str = "token"  # of the closed-form fits: token (relative error per token) | uniform (ReplaceMe's)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    mode: str = "mse"
    num_steps: int | None = None
    epochs: int = 1
    lr: float = 2e-4
    min_lr: float = 5e-5
    warmup_steps: int | None = None
    weight_decay: float = 1e-3
    clip_norm: float = 5.0
    grad_accum: int = 1
    eval_every: int | None = None
    checkpoint_every: int | None = None
    compute_dtype: str | None = None
    seed: int = 0
    freeze: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ("block",)
    shuffle: bool = False
    lr_schedule: str = "cosine"
    mse_weighting: str = "uniform"
    pair_cache: bool = False
    kd_temperature: float = 1.0
    kd_ce_weight: float = 0.0
    kd_hidden_layers: tuple[int, ...] = ()
    kd_hidden_weight: float = 0.0
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class EvalSection:
    tasks: tuple[str, ...] = ("wikitext2", "piqa")
    limit: int | None = None
    ppl_windows: int | None = None
    perplexity_text: str | None = None
    window: int = 1024
    batch_size: int = 32
    harness_tasks: tuple[str, ...] = ()  # lm-evaluation-harness task names (needs the lm-eval extra), eval.limit each


@dataclasses.dataclass(frozen=True)
class SamplesSection:
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class ExportSection:
    orbax: bool = True
    hf: bool = True


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    score: ScoreSection = ScoreSection()
    prune: PruneSection = PruneSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    samples: SamplesSection = SamplesSection()
    export: ExportSection = ExportSection()
    mesh: MeshSection = MeshSection()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, for YAML/JSON


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _section_classes().items() for f in dataclasses.fields(cls)]


def _unknown(key: str, candidates: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    hint = f"; did you mean {(near or by_leaf)[0]!r}?" if (near or by_leaf) else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _check_type(value, hint, key: str, where: str):
    """`value` as the type `hint` asks for, or a ConfigError naming the key, the expected type and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key, where)
    bad = ConfigError(f"{where}: {key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple:
        item = args[0]
        if isinstance(value, item):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise bad
        return tuple(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin is tuple:
        return "a list of integers" if args[0] is int else "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        hint, str(hint))


def check_layer(layer: dict, where: str) -> dict:
    """Check one settings layer (a YAML file or the overrides): known sections and keys, right types."""
    if layer is None:
        return {}
    if not isinstance(layer, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(layer).__name__}")
    classes = _section_classes()
    out = {}
    for section, values in layer.items():
        if section not in classes:
            raise _unknown(str(section), list(classes) + valid_keys(), where)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        hints = typing.get_type_hints(classes[section])
        checked = {}
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"{section}.{key}", valid_keys(), where)
            checked[key] = _check_type(value, hints[key], f"{section}.{key}", where)
        if section == "model" and checked.get("architecture"):
            from .models.config import ModelConfig, check_keys

            try:
                check_keys(checked["architecture"], ModelConfig, "model.architecture")
            except KeyError as e:
                raise ConfigError(f"{where}: {e.args[0]}") from None
        out[section] = checked
    return out


def merge(base: dict, layer: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in layer.items():
        out.setdefault(section, {}).update(values)
    return out


def parse_overrides(items: list[str]) -> dict:
    layer: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        if "." not in key:
            raise _unknown(key, valid_keys(), "override")
        section, _, name = key.partition(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value ({e})") from None
        layer.setdefault(section, {})[name] = value
    return layer


def read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in NOT_PRESETS)


def resolve_model(model: str | None) -> tuple[str | None, dict]:
    """(preset name or None, a settings layer) for --model: a preset, a local folder/.gguf, or a hub id."""
    model = model or DEFAULT_MODEL
    if model in preset_names():
        return model, {}
    path = Path(model).expanduser()
    if path.exists() or path.suffix == ".gguf":
        if not path.exists():
            raise ConfigError(f"GGUF file not found: {path}")
        return None, {"model": {"source": str(path.absolute())}}
    if "/" in model and not model.startswith((".", "/", "~")):
        return None, {"model": {"source": model, "hub_id": model}}
    if model.startswith((".", "/", "~")) or "\\" in model:
        raise ConfigError(f"--model {model}: no such folder or file ({path.absolute()})")
    near = difflib.get_close_matches(model, preset_names(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"unknown model preset {model!r}{hint} (presets: {', '.join(preset_names())}; or pass a local "
                      f"folder, a .gguf file or a hub id owner/name)")


def build_config(model: str | None = None, config_file: str | None = None,
                 overrides: list[str] = ()) -> tuple[RunConfig, str | None]:
    """pipeline.yaml ← preset ← --config FILE ← key=value overrides, each layer checked; a frozen RunConfig."""
    settings = check_layer(read_yaml(CONFIG_DIR / "pipeline.yaml"), "configs/pipeline.yaml")
    preset, model_layer = resolve_model(model)
    if preset:
        settings = merge(settings, check_layer(read_yaml(CONFIG_DIR / f"{preset}.yaml"), f"configs/{preset}.yaml"))
    else:  # a path or hub id: the preset's source and shapes no longer apply
        settings = merge(settings, {"model": {"hub_id": None, "architecture": None}})
    settings = merge(settings, check_layer(model_layer, "--model"))
    if config_file:
        settings = merge(settings, check_layer(read_yaml(Path(config_file)), str(config_file)))
    settings = merge(settings, check_layer(parse_overrides(list(overrides)), "override"))
    classes = _section_classes()
    config = RunConfig(**{s: classes[s](**settings.get(s, {})) for s in classes})
    check_values(config)
    return config, preset


def check_values(c: RunConfig) -> None:
    """Choices and ranges, before any work."""
    from .pruning import REPLACEMENTS
    from .score import SPAN_METRICS
    from .train import LR_SCHEDULES, MODES, MSE_WEIGHTINGS

    def choice(key, value, allowed):
        if value not in allowed:
            near = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}{hint}")

    choice("score.metric", c.score.metric, SPAN_METRICS)
    choice("prune.replacement", c.prune.replacement, REPLACEMENTS)
    choice("prune.init", c.prune.init, PRUNE_INITS)
    choice("prune.fit_weighting", c.prune.fit_weighting, ("token", "uniform"))
    if c.prune.init == "linear" and c.prune.replacement not in ("mlp", "ffn"):
        raise ConfigError(f"prune.init=linear fits the output projection of an mlp or ffn block, not of "
                          f"prune.replacement={c.prune.replacement!r} (a `linear` block is always fitted)")
    choice("train.mode", c.train.mode, MODES)
    choice("train.lr_schedule", c.train.lr_schedule, LR_SCHEDULES)
    choice("train.mse_weighting", c.train.mse_weighting, MSE_WEIGHTINGS)
    if (c.score.sparsity is None) == (c.score.num_layers is None):
        raise ConfigError("set exactly one of score.sparsity and score.num_layers (the other to null)")
    if c.score.spans > 1 and c.score.metric in ("perplexity", "last"):
        raise ConfigError(f"score.spans={c.score.spans} places spans by their similarity scores; "
                          f"score.metric={c.score.metric} chooses one span only")
    check_ranges(c)
    from .models.model import COMPUTE_DTYPES

    choice("model.compute_dtype", c.model.compute_dtype, ("auto",) + COMPUTE_DTYPES)
    if c.train.compute_dtype is not None:
        choice("train.compute_dtype", c.train.compute_dtype, COMPUTE_DTYPES)
    if c.model.dtype is not None:
        import jax.numpy as jnp

        try:
            jnp.dtype(c.model.dtype)
        except TypeError:
            raise ConfigError(f"model.dtype={c.model.dtype!r} is not a dtype (float32, bfloat16, float16)") from None
    from .tasks import TASKS

    for t in c.eval.tasks:
        choice("eval.tasks", t, sorted(TASKS))
    if c.eval.harness_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.harness_tasks needs lm-evaluation-harness: pip install 'streamline-jax[lm-eval]'")


# (key, lowest allowed, whether the lowest itself is allowed); None (where the type allows it) is always allowed
RANGES = [
    ("data.seq_len", 1, True), ("data.calib_chunks", 1, True), ("data.train_chunks", 1, True),
    ("data.valid_chunks", 0, True), ("data.batch_size", 1, True),
    ("score.sparsity", 0, False), ("score.num_layers", 1, True), ("score.protect_first", 0, True),
    ("score.protect_last", 0, True), ("score.spans", 1, True), ("prune.mlp_width", 1, True), ("prune.ridge", 0, True),
    ("train.num_steps", 1, True), ("train.epochs", 1, True), ("train.lr", 0, False), ("train.min_lr", 0, True),
    ("train.warmup_steps", 0, True), ("train.weight_decay", 0, True), ("train.clip_norm", 0, False),
    ("train.grad_accum", 1, True), ("train.eval_every", 1, True), ("train.checkpoint_every", 1, True),
    ("train.kd_temperature", 0, False), ("train.kd_ce_weight", 0, True), ("train.kd_hidden_weight", 0, True),
    ("train.log_every", 1, True),
    ("eval.limit", 1, True), ("eval.ppl_windows", 1, True), ("eval.window", 2, True), ("eval.batch_size", 1, True),
    ("samples.max_new_tokens", 1, True), ("mesh.data", 1, True), ("mesh.tensor", 1, True),
]


def check_ranges(c: RunConfig) -> None:
    """Every number in its range, before any work: a wrong one is named with the range it must be in."""
    for key, low, inclusive in RANGES:
        section, _, name = key.partition(".")
        value = getattr(getattr(c, section), name)
        if value is None:
            continue
        if not math.isfinite(value) or (value < low if inclusive else value <= low):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"{key} must be {bound}, got {value}")
    if c.score.sparsity is not None and not c.score.sparsity < 1:
        raise ConfigError(f"score.sparsity is the fraction of parameters removed: it must be in (0, 1), got "
                          f"{c.score.sparsity}")
    if c.mesh.fsdp != -1 and c.mesh.fsdp < 1:
        raise ConfigError(f"mesh.fsdp must be >= 1, or -1 (every device left), got {c.mesh.fsdp}")
    if c.train.min_lr > c.train.lr:
        raise ConfigError(f"train.min_lr ({c.train.min_lr}) must not exceed train.lr ({c.train.lr})")
    if c.train.kd_ce_weight > 1:
        raise ConfigError(f"train.kd_ce_weight is the cross-entropy's share of the KD loss: it must be in [0, 1], "
                          f"got {c.train.kd_ce_weight}")
    if c.train.kd_hidden_layers and not c.train.kd_hidden_weight:
        raise ConfigError(f"train.kd_hidden_layers={list(c.train.kd_hidden_layers)} needs train.kd_hidden_weight > 0")
    for pattern in c.train.trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.trainable: {pattern!r} is not a regular expression ({e})") from None
    if not c.train.trainable:
        raise ConfigError("train.trainable is empty: nothing would train ([block] trains the replacement block)")
    if c.train.mode == "mse" and tuple(c.train.trainable) != ("block",):
        raise ConfigError(f"train.mode=mse trains the block only; train.trainable={list(c.train.trainable)} needs "
                          f"train.mode=lm or kd")
    per_step = c.data.batch_size * c.train.grad_accum
    if c.train.num_steps is None and c.data.train_chunks < per_step:
        raise ConfigError(f"data.train_chunks={c.data.train_chunks} gives no optimizer step: one step takes "
                          f"data.batch_size x train.grad_accum = {per_step} chunks")
    if c.train.num_steps is not None:
        available = c.data.train_chunks // c.data.batch_size * c.train.epochs
        if c.train.num_steps * c.train.grad_accum > available:
            raise ConfigError(f"train.num_steps={c.train.num_steps} x train.grad_accum={c.train.grad_accum} needs "
                              f"{c.train.num_steps * c.train.grad_accum} batches, but data.train_chunks="
                              f"{c.data.train_chunks} in batches of {c.data.batch_size} x train.epochs="
                              f"{c.train.epochs} give {available}")


def peek_model_config(c: RunConfig):
    """The model's shapes without its weights (config.json, the Orbax marker, the GGUF header or the preset's
    architecture), or None where that would need a download."""
    from .checkpoint import checkpoint_files, read_hf_model_config, safetensors_index

    path = Path(c.model.source).expanduser()
    try:
        if path.is_dir():
            from .model_io import ORBAX_MARKER, read_orbax_config

            if (path / ORBAX_MARKER).exists():
                return read_orbax_config(path)
            config = read_hf_model_config(path)
            for f in checkpoint_files(path):  # headers only: a truncated file is named before any work
                if f.suffix == ".safetensors" and f.is_file():
                    safetensors_index(f)
            return config
        if path.suffix == ".gguf" and path.is_file():
            import gguf

            from .loading import gguf_hf_config
            from .models.config import from_hf_config

            return from_hf_config(gguf_hf_config(gguf.GGUFReader(str(path))))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: cannot read the model's configuration ({type(e).__name__}: {e})") from None
    if c.model.architecture:  # a preset (embedded, or a hub id not downloaded yet): its shapes
        from .models.config import ModelConfig

        return ModelConfig(**c.model.architecture)
    return None


def check_against_model(c: RunConfig, config) -> None:
    """Settings that depend on the model's shape: span length and sparsity, and sequence lengths against learned
    positions (OPT's table has max_position_embeddings rows; beyond it there are no positions)."""
    from .score import spans_for_sparsity

    depth = config.depth
    room = depth - c.score.protect_first - c.score.protect_last
    if c.score.num_layers is not None:
        if c.score.num_layers >= depth:
            raise ConfigError(f"score.num_layers={c.score.num_layers} would replace all {depth} layers of the model; "
                              f"it must be below {depth}")
        if c.score.num_layers > room:
            raise ConfigError(f"score.num_layers={c.score.num_layers} does not fit between score.protect_first="
                              f"{c.score.protect_first} and score.protect_last={c.score.protect_last} in {depth} "
                              f"layers")
    if c.score.sparsity is not None:
        try:
            length, _ = spans_for_sparsity(config, c.score.sparsity, c.prune.replacement, c.prune.mlp_width,
                                           c.score.protect_first, c.score.protect_last)
        except ValueError as e:
            raise ConfigError(f"score.sparsity: {e}") from None
        if length >= depth:
            raise ConfigError(f"score.sparsity={c.score.sparsity} would replace all {depth} layers of the model")
    if config.family == "opt" and c.data.seq_len > config.max_position_embeddings:
        raise ConfigError(f"data.seq_len={c.data.seq_len} is longer than the {config.max_position_embeddings} "
                          f"positions OPT learned (max_position_embeddings of {c.model.source})")


def preset_model_config(name: str):
    """The abstract ModelConfig of a YAML preset (shapes only), for eval_shape planning and parameter counts."""
    from .models.config import ModelConfig

    layer = check_layer(read_yaml(CONFIG_DIR / f"{name}.yaml"), f"configs/{name}.yaml")
    model = layer.get("model", {})
    if not model.get("architecture"):
        raise ConfigError(f"preset {name!r} gives no model.architecture")
    return ModelConfig(**model["architecture"], dtype=model.get("dtype") or "float32")


# --------------------------------------------------------------------------------------------------------------
# Data: re-iterable batch streams over a text source


class ChunkBatches:
    """Batches of `count` chunks of `seq_len` tokens after the first `skip`, re-read on every iteration (train.py
    iterates once to count and once per epoch). Incomplete batches are dropped, so every step has one shape."""

    def __init__(self, source, tokenizer, seq_len: int, skip: int, count: int, batch_size: int):
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.skip, self.count, self.batch_size = seq_len, skip, count, batch_size

    def __iter__(self):
        from . import data

        chunks = data.token_chunks(self.source, self.tokenizer, self.seq_len)
        train = data.split_chunks(chunks, 0, self.count, self.skip).train
        return data.batches(train, self.batch_size, drop_last=True)


def _data_path(spec: str | None) -> str | None:
    if spec is None:
        return None
    from .tasks import resolve_path

    path = resolve_path(spec)
    return str(path) if path.exists() or "{data}" in spec else spec


# --------------------------------------------------------------------------------------------------------------
# The output folder


def settings_diff(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every setting that differs between a saved run's settings and these."""
    return [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {now[s][k]!r}" for s in now for k in now[s]
            if saved.get(s, {}).get(k) != now[s][k]]


def read_failure(out: Path) -> str | None:
    """What the last run in `out` said when it failed ("stage: error"), or None."""
    path = out / FAILED
    return path.read_text().strip() if path.exists() else None


# What a run writes in its folder; a folder holding anything else is not ours and is never touched.
RUN_FILES = {DONE, RUN_CONFIG, FAILED, LOCK, "report.json", "report.md", "run.log"}
RUN_FOLDERS = {TRAIN_CHECKPOINT, PAIR_CACHE, "model", "hf", "plots"}
EXPORT_TEMP = re.compile(r"^\.(model|hf)\.tmp-")  # export.atomic_folder's, left by a run killed while saving
# Settings that change only evaluation, samples and what is saved: a resume may change them (training is kept).
RESUMABLE_SECTIONS = ("eval", "samples", "export")


def staging_folder(out: Path) -> Path:
    """Where --overwrite writes the new run, beside the old one, until it finishes and takes the old one's place."""
    return out.parent / f".{out.name}.overwrite"


def foreign_entries(out: Path) -> list[str]:
    """What `out` holds that no run writes (a user's notes, other folders): such a folder is never ours."""
    return sorted(p.name for p in out.iterdir()
                  if not ((p.name in RUN_FILES and p.is_file()) or (p.name in RUN_FOLDERS and p.is_dir())
                          or (EXPORT_TEMP.match(p.name) and p.is_dir())))


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
    if overwrite and contents:
        return _prepare_staging(out, config), False
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
        (out / RUN_CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out, resume


def _check_resume(out: Path, config: RunConfig, resume: bool) -> None:
    """Allow continuing the unfinished run in `out` with these settings, or refuse naming what differs."""
    failure = read_failure(out)
    stopped = f"it stopped in {failure}" if failure else "it did not finish"
    diff = settings_diff(read_yaml(out / RUN_CONFIG), config.to_dict())
    fixed = [d for d in diff if not d.startswith(tuple(f"{s}." for s in RESUMABLE_SECTIONS))]
    if fixed:
        raise ConfigError(f"{out} holds an unfinished run ({stopped}) whose settings differ from these in "
                          f"{'; '.join(fixed)}. Rerun with its settings to continue it, pass --overwrite to "
                          f"start again with these (the old run is kept until the new one finishes), or choose "
                          f"another --out")
    if diff:  # evaluation-only changes: training and its checkpoint are kept
        log.info("%s: continuing the unfinished run (%s) with new evaluation settings: %s", out, stopped,
                 "; ".join(diff))
        (out / RUN_CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    elif not resume:
        log.info("%s holds an unfinished run with the same settings (%s): resuming it", out, stopped)
    for path in out.iterdir():  # export temporaries of a run killed while saving
        if EXPORT_TEMP.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _prepare_staging(out: Path, config: RunConfig) -> Path:
    """The staging folder for --overwrite: an unfinished replacement with these settings is continued, any other
    is started again."""
    staging = staging_folder(out)
    if staging.exists():
        if not staging.is_dir() or [p for p in staging.iterdir() if p.name != LOCK] and not is_run_folder(staging):
            raise ConfigError(f"{staging} (where --overwrite writes the new run) holds something else; remove it")
        same = (staging / RUN_CONFIG).is_file() and not settings_diff(read_yaml(staging / RUN_CONFIG),
                                                                       config.to_dict())
        if same and not (staging / DONE).exists():
            log.info("continuing the unfinished replacement of %s in %s", out, staging)
            _check_resume(staging, config, True)
            return staging
        shutil.rmtree(staging)
    staging.mkdir()
    (staging / RUN_CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log.info("--overwrite: the new run is written in %s; %s is kept until it finishes", staging, out)
    return staging


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
                (out / LOCK).write_text("")
            if created and out.exists() and not any(out.iterdir()):
                out.rmdir()  # refused before any work: leave no empty folder behind
    finally:
        os.close(fd)  # releases the flock


def mark_holder(folder: Path) -> None:
    (folder / LOCK).write_text(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")


# --------------------------------------------------------------------------------------------------------------
# The run


class StageTimes(dict):
    """Seconds per stage, and the stage running now (what FAILED names when the run fails)."""

    current = "setup"


@contextlib.contextmanager
def stage(name: str, times: StageTimes):
    log.info("[%s] started", name)
    times.current = name
    start = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    log.info("[%s] done in %.1f s", name, times[name])


def _check_tokenizer_before_load(source: str):
    from .checkpoint import TOKENIZER_FILES, has_tokenizer

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "streamline_model.json").exists() and not has_tokenizer(path):
        raise ConfigError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}); "
                          f"calibration, training and evaluation need one: add it to the folder")


def _strip(results: dict) -> dict:
    """Evaluation results without per-item lists (they stay out of report.json)."""
    drop = ("labels", "predictions", "loglikelihoods")
    return {**results, "tasks": {n: {k: v for k, v in t.items() if k not in drop}
                                 for n, t in results["tasks"].items()}}


def run(config: RunConfig, out: Path, stages: tuple[str, ...] = STAGES, *, overwrite: bool = False,
        resume: bool = False, preset: str | None = None, progress: bool = True, target: str | None = None,
        shared: SharedWork | None = None) -> dict:
    """Run `stages` of the pipeline into `out`; return the report. KeyboardInterrupt propagates (the caller logs)."""
    from .distributed import is_main_process

    out = Path(out).absolute()
    total_start = time.perf_counter()
    times = StageTimes()
    # every check that needs no model first, before the folder is touched; then one run at a time per folder
    inputs = check_inputs(config, stages)
    with folder_lock(out) if is_main_process() else contextlib.nullcontext():
        work, resume = _prepare_all_processes(out, config, overwrite, resume)
        with folder_lock(work) if work != out and is_main_process() else contextlib.nullcontext():
            if is_main_process():
                mark_holder(out)
                mark_holder(work)
            handler = logging.FileHandler(work / "run.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
            try:
                report = _run(config, work, stages, resume, preset, progress, total_start, target, times, inputs,
                              shared)
                if is_main_process():
                    (work / FAILED).unlink(missing_ok=True)
                    finish_out(work, out)
            except BaseException as e:
                if is_main_process():  # the next run says what failed, and resumes
                    _record_failure(work, e, times.current)
                kept = f"; the finished run in {out} is kept as it was" if work != out else ""
                e.add_note(f"{work} is not marked finished{kept}: once the cause is fixed, the same command "
                           f"continues it; other settings need --overwrite")
                raise
            finally:
                log.removeHandler(handler)
                handler.close()
        return report


def _prepare_all_processes(out: Path, config: RunConfig, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """prepare_out on process 0; every process learns where the run is written and whether it resumes."""
    import jax

    from .distributed import barrier, is_main_process

    if jax.process_count() == 1:
        return prepare_out(out, config, overwrite, resume)
    from jax.experimental import multihost_utils

    import numpy as np

    decided = np.zeros(2, np.int32)
    if is_main_process():
        work, resume = prepare_out(out, config, overwrite, resume)
        decided[:] = (work != out, resume)
    barrier("prepare_out")
    staged, resume = (bool(v) for v in multihost_utils.broadcast_one_to_all(decided))
    return (staging_folder(out) if staged else out), resume


def _record_failure(work: Path, error: BaseException, stage_name: str) -> None:
    """FAILED (stage and error) for the next run; the traceback of an unexpected error goes to run.log only."""
    import traceback

    what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    (work / FAILED).write_text(f"stage {stage_name}: {what}\n")
    if not isinstance(error, (KeyboardInterrupt, ConfigError)):
        with open(work / "run.log", "a") as f:
            traceback.print_exception(error, file=f)
        error.add_note(f"the traceback is in {work / 'run.log'}")


@dataclasses.dataclass
class Inputs:
    """What the checks before any work found: the data sources and tasks."""

    calib_source: Any
    train_source: Any
    valid_source: Any
    tasks: list
    hf_ok: bool
    harness: Any = None  # lm-eval's task manager, when eval.harness_tasks names tasks


def check_inputs(c: RunConfig, stages) -> Inputs:
    """Data files, tasks, the tokenizer and the model's shape against the settings: everything that needs no
    model weights, so that bad input fails before the output folder is touched."""
    from . import data
    from .tasks import PerplexityTask, get_task, load_items

    try:
        calib_source = data.text_source(_data_path(c.data.calibration), c.data.text_field)
        train_spec = _data_path(c.data.train)
        train_source = data.text_source(train_spec, c.data.text_field) if train_spec else calib_source
        valid_source = data.text_source(_data_path(c.data.valid), c.data.text_field) if c.data.valid else None
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    tasks = [get_task(t) for t in c.eval.tasks]
    if c.eval.perplexity_text:
        path = _data_path(c.eval.perplexity_text)
        if not Path(path).is_file():
            raise ConfigError(f"eval.perplexity_text: file not found: {path}")
        tasks.append(PerplexityTask("text", path, window=c.eval.window))
    if "evaluate" in stages:
        for t in tasks:
            if not isinstance(t, PerplexityTask):
                load_items(t, c.eval.limit)  # a missing or malformed task file fails here
    harness = None
    if "evaluate" in stages and c.eval.harness_tasks:
        from .lm_eval import check_tasks

        harness = check_tasks(c.eval.harness_tasks)  # lm-eval's task index; an unknown name fails here
    hf_ok = c.export.hf and "save" in stages
    if hf_ok and c.prune.replacement in ("mlp", "linear"):
        log.warning("an `%s` block cannot be exported to a stock Hugging Face architecture: writing the Orbax "
                    "checkpoint only", c.prune.replacement)
        hf_ok = False
    _check_tokenizer_before_load(c.model.source)
    model_config = peek_model_config(c)
    if model_config is not None:
        check_against_model(c, model_config)
        for t in tasks:
            if isinstance(t, PerplexityTask) and "evaluate" in stages and t.window > model_config.max_position_embeddings:
                raise ConfigError(f"the {t.name} perplexity window of {t.window} tokens (eval.window) is longer than "
                                  f"the model's context of {model_config.max_position_embeddings} tokens")
    return Inputs(calib_source, train_source, valid_source, tasks, hf_ok, harness)


@dataclasses.dataclass
class SharedWork:
    """Work that runs in one process share when their settings agree (a sweep's points): the loaded dense model,
    keyed by the model and mesh settings, and span scores, keyed by those and the calibration settings."""

    models: dict = dataclasses.field(default_factory=dict)
    scores: dict = dataclasses.field(default_factory=dict)
    dense_evaluations: dict = dataclasses.field(default_factory=dict)  # for when the disk cache is off
    calibration: dict = dataclasses.field(default_factory=dict)  # tokenized calibration batches


def _load_key(c: RunConfig, preset, target) -> str:
    return json.dumps([dataclasses.asdict(c.model), dataclasses.asdict(c.mesh), preset, target], sort_keys=True)


def _score_key(c: RunConfig, load_key: str, metric: str) -> str:
    d = c.data
    return json.dumps([load_key, d.calibration, d.text_field, d.seq_len, d.calib_chunks, d.batch_size, metric])


def calibration_batches(c: RunConfig, dense, calib_source, shared: SharedWork | None = None) -> list:
    """The calibration chunks in batches (token ids only: small), tokenized once per `shared`: scoring, the
    perplexity span choice and closed-form fits all read them."""
    from . import data

    d = c.data
    key = json.dumps([c.model.source, dense.config.vocab_size, d.calibration, d.text_field, d.seq_len,
                      d.calib_chunks, d.batch_size])
    if shared is not None and key in shared.calibration:
        return shared.calibration[key]
    chunks = data.token_chunks(calib_source, dense.tokenizer, d.seq_len)
    batches = list(data.batches(data.split_chunks(chunks, d.calib_chunks).calib, d.batch_size))
    if shared is not None:
        shared.calibration = {key: batches}  # one calibration set at a time
    return batches


def load_stage(c: RunConfig, preset, target, shared: SharedWork | None):
    """The dense model on its mesh, with the compute dtype resolved; (model, its part of the report)."""
    from .backend import resolve_compute_dtype
    from .loading import load
    from .models.model import with_compute_dtype

    key = _load_key(c, preset, target)
    if shared is not None and key in shared.models:
        dense, why = shared.models[key]
        log.info("%s: loaded already (%s products)", c.model.source, dense.config.compute_dtype)
    else:
        mesh = _mesh(c, preset, target)
        dense = load(c.model.source, c.model.dtype or "float32", mesh=mesh)
        if dense.tokenizer is None:
            raise ConfigError(f"{c.model.source}: the model has no tokenizer; calibration, training and evaluation "
                              f"need one")
        _check_architecture(c, dense.config)
        check_against_model(c, dense.config)
        compute, why = resolve_compute_dtype(c.model.compute_dtype)
        dense = with_compute_dtype(dense, compute)
        log.info("%s: %d layers, %s parameters, %s weights, %s products (%s)", c.model.source, dense.config.depth,
                 f"{dense.num_params:,}", dense.config.dtype, compute, why)
        if shared is not None:
            shared.models = {key: (dense, why)}  # one model at a time: a sweep over models frees the last
    compute = dense.config.compute_dtype
    return dense, {"source": c.model.source, "layers": dense.config.depth, "params": dense.num_params,
                   "dtype": dense.config.dtype, "compute_dtype": compute, "compute_dtype_why": why,
                   "config": dense.config.to_dict()}


def score_stage(c: RunConfig, dense, calib_source, progress: bool, shared: SharedWork | None, load_key: str):
    """Span scores on the calibration chunks (reused from `shared` when their settings agree) and the spans they
    choose: (scores, choices, report parts). `perplexity` and `last` choose otherwise; the cosine tables still go
    in the report."""
    from . import score as score_mod

    by_similarity = c.score.metric in score_mod.METRICS
    metric = c.score.metric if by_similarity else "cosine"
    key = _score_key(c, load_key, metric)
    scores = shared.scores.get(key) if shared is not None else None
    if scores is None:
        scores = score_mod.score_spans(dense, calibration_batches(c, dense, calib_source, shared), metric,
                                       progress=progress)
        if shared is not None:
            shared.scores[key] = scores
    else:
        log.info("span scores: computed already for these calibration settings")
    span_args = dict(length=c.score.num_layers, sparsity=c.score.sparsity, replacement=c.prune.replacement,
                     protect_first=c.score.protect_first, protect_last=c.score.protect_last,
                     mlp_width=c.prune.mlp_width)
    parts = {"scores": {"metric": scores.metric, "num_tokens": scores.num_tokens, "cosine": scores.cosine,
                        "angular": scores.angular, "block_influence": scores.block_influence}}
    if c.score.metric == "perplexity":
        choice, costs = score_mod.choose_span_by_loss(dense, calibration_batches(c, dense, calib_source, shared),
                                                      **span_args, progress=progress)
        log.info("%s", costs)
        parts["span_costs"] = costs.to_dict()
        choices = [choice]
    elif c.score.metric == "last":
        choices = [score_mod.choose_last_span(dense.config, **span_args)]
    else:
        choices = score_mod.choose_spans(scores, c.score.spans, **span_args)
    for choice in choices:
        log.info("chosen span: %s", choice)
    described = [{"start": ch.start, "length": ch.length, "end": ch.end, "replacement": ch.replacement,
                  "metric": scores.span_metric if by_similarity else c.score.metric, "score": ch.score,
                  "params_removed": ch.params_removed, "params_total": ch.params_total, "sparsity": ch.sparsity}
                 for ch in choices]
    parts.update({"span": described[0]} if len(choices) == 1 else {"spans": described})
    return scores, choices, parts


def prune_stage(c: RunConfig, dense, choices, calib_source, shared: SharedWork | None = None):
    """The spans cut out and their blocks put in (a `linear` block, or `prune.init=linear`, fitted in closed form
    on the calibration chunks): (pruned model, report parts)."""
    from . import pruning as prune_mod

    pruned = dense
    for choice in sorted(choices, key=lambda ch: -ch.start):  # later spans first: earlier starts stay valid
        pruned = prune_mod.prune(pruned, choice.start, choice.length, c.prune.replacement, c.prune.mlp_width)
    parts = {}
    if c.prune.replacement == "linear" or c.prune.init == "linear":
        from .linear_fit import fit_linear

        pruned, fits = fit_linear(dense, pruned, calibration_batches(c, dense, calib_source, shared), c.prune.ridge,
                                  c.prune.fit_weighting)
        parts["linear_fit"] = [dataclasses.asdict(f) for f in fits]
        for f in fits:
            log.info("closed-form fit on %d calibration tokens: relative error %.4f (1 = the `none` replacement)",
                     f.tokens, f.relative_error)
    parts.update(params={"dense": dense.num_params, "pruned": pruned.num_params,
                         "dense_layers": dense.config.depth, "pruned_layers": pruned.config.depth},
                 pruned_config=pruned.config.to_dict())
    return pruned, parts


def train_stage(c: RunConfig, dense, pruned, inputs: Inputs, out: Path, resume: bool, progress: bool,
                preset: str | None = None, target: str | None = None):
    """The replacement block trained on the training stage's layout (configs/meshes.yaml: `mse` for mode mse, `lm`
    for lm and kd; its mesh and remat policy); (pruned model on the mesh it came on, training history). Where that
    mesh differs from the models' one, the models are re-sharded onto it for training (the dense model is then on
    the devices twice while it trains) and the trained model back."""
    from . import data
    from .loading import place_on_mesh
    from .train import train_replacement, trainable_blocks

    remat, layout_name, home = "none", None, pruned.mesh
    staged = stage_layout("mse" if c.train.mode == "mse" else "lm", preset, target)
    if staged is not None:
        mesh, layout = staged
        remat, layout_name = layout.remat, str(layout)
        if c.data.batch_size != layout.batch:  # the memory plan (scripts/plan_memory.py) was for the layout's batch
            log.warning("training batch data.batch_size=%d is not the batch %d its layout was planned for (%s); "
                        "plan it with scripts/plan_memory.py --batch %d", c.data.batch_size, layout.batch, layout,
                        c.data.batch_size)
        if dense.mesh is not None and mesh != dense.mesh:
            log.info("training re-shards the models onto its layout: %s", layout)
            dense, pruned = place_on_mesh(dense, mesh), place_on_mesh(pruned, mesh)

    seq, batch = c.data.seq_len, c.data.batch_size
    skip = c.data.calib_chunks if inputs.train_source is inputs.calib_source else 0
    train_batches = ChunkBatches(inputs.train_source, dense.tokenizer, seq, skip, c.data.train_chunks, batch)
    if c.train.shuffle:  # a permutation per epoch needs the batches listed (token ids only: small)
        train_batches = list(train_batches)
    valid_batches = None
    if inputs.valid_source is not None and c.data.valid_chunks:
        vchunks = data.split_chunks(data.token_chunks(inputs.valid_source, dense.tokenizer, seq),
                                    c.data.valid_chunks).calib
        valid_batches = list(data.batches(vchunks, batch))
    t = c.train
    blocks = trainable_blocks(pruned.config)
    histories = []
    for block in blocks:  # one at a time: each learns its own dense span, the others' weights do not enter
        sub = "" if len(blocks) == 1 else block.key  # one block: the folders a single-span run always had
        pruned, history = train_replacement(
            dense, pruned, train_batches, mode=t.mode, valid_batches=valid_batches, num_steps=t.num_steps,
            lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
            clip_norm=t.clip_norm, grad_accum=t.grad_accum, epochs=t.epochs, eval_every=t.eval_every,
            checkpoint_dir=out / TRAIN_CHECKPOINT / sub, checkpoint_every=t.checkpoint_every, resume=resume,
            seed=t.seed, compute_dtype=t.compute_dtype, freeze=t.freeze, shuffle=t.shuffle, block_key=block.key,
            lr_schedule=t.lr_schedule, mse_weighting=t.mse_weighting, progress=progress, return_history=True,
            trainable=t.trainable, kd_temperature=t.kd_temperature, kd_ce_weight=t.kd_ce_weight,
            kd_hidden_layers=t.kd_hidden_layers, kd_hidden_weight=t.kd_hidden_weight, log_every=t.log_every,
            remat=remat,
            pair_cache=out / PAIR_CACHE / sub if t.pair_cache and t.mode == "mse" else None)  # pairs are MSE's
        histories.append({**history, "mode": t.mode, "block": block.key, "span": [block.start, block.length]})
    if home is not None and pruned.mesh != home:
        pruned = place_on_mesh(pruned, home)
    ran_on = {"layout": layout_name, "remat": remat}  # layout None: no meshes.yaml target (mesh.* settings)
    if len(histories) == 1:
        return pruned, {**histories[0], **ran_on}
    return pruned, {"mode": t.mode, "blocks": histories, "wall_s": sum(h.get("wall_s", 0) for h in histories),
                    **ran_on}


def dense_evaluation_key(c: RunConfig, dense, tasks) -> str:
    """What the dense model's evaluation depends on: the model's files and settings, the tasks and their files."""
    from . import cache
    from .loading import resolve_source

    _, path = resolve_source(c.model.source)
    task_files = [cache.path_stamp(_data_path(v)) for t in tasks for v in dataclasses.asdict(t).values()
                  if isinstance(v, str) and Path(_data_path(v)).exists()]
    e = c.eval
    return cache.content_key(model=cache.path_stamp(path), dtype=dense.config.dtype,
                             compute_dtype=dense.config.compute_dtype, tasks=tasks, task_files=task_files,
                             limit=e.limit, ppl_windows=e.ppl_windows, batch_size=e.batch_size,
                             devices=_device_kind())


def _device_kind() -> str:
    import jax

    return f"{jax.default_backend()} x{jax.device_count()}"


def evaluate_dense(c: RunConfig, dense, tasks, progress: bool, shared: SharedWork | None = None) -> dict:
    """The dense model's evaluation, from the cache when these settings were evaluated before (`cache.py`)."""
    from . import cache, evaluation as ev
    from .distributed import main_only
    from .report import jsonable

    key = dense_evaluation_key(c, dense, tasks)
    found = cache.read("dense_eval", key) or (shared.dense_evaluations.get(key) if shared is not None else None)
    if found is not None:
        log.info("dense evaluation: reused from the cache (%s)", key)
        return found
    results = jsonable(_evaluate(ev, dense, tasks, c, progress))
    main_only(cache.write)("dense_eval", key, results)
    if shared is not None:
        shared.dense_evaluations[key] = results
    return results


def evaluate_stage(c: RunConfig, dense, pruned, tasks, progress: bool, shared: SharedWork | None = None) -> dict:
    from . import evaluation as ev

    start = time.perf_counter()
    results = {"dense": evaluate_dense(c, dense, tasks, progress, shared)}
    parts = {"evaluation_s": {"dense": time.perf_counter() - start}}  # ~0 when the cache had it
    if pruned is not None:
        start = time.perf_counter()
        results["pruned"] = _evaluate(ev, pruned, tasks, c, progress)
        parts["evaluation_s"]["pruned"] = time.perf_counter() - start
        retention = ev.compare(results["dense"], results["pruned"])
        parts["retention"] = retention.to_dict()
        log.info("evaluation:\n%s", retention.to_markdown())
    parts["evaluation"] = {k: _strip(v) for k, v in results.items()}
    return parts


def harness_stage(c: RunConfig, dense, pruned, harness) -> dict:
    from .lm_eval import evaluate_harness

    return {name: evaluate_harness(m, c.eval.harness_tasks, limit=c.eval.limit, batch_size=c.eval.batch_size,
                                   manager=harness)["tasks"]
            for name, m in (("dense", dense), ("pruned", pruned)) if m is not None}


def save_stage(c: RunConfig, pruned, out: Path, hf_ok: bool) -> dict:
    """The pruned model as an Orbax checkpoint and a Hugging Face folder; what was written where."""
    from . import export
    from .distributed import main_only
    from .interrupts import deferred_interrupts
    from .models.model import with_compute_dtype

    outputs = {}
    with deferred_interrupts():  # Ctrl-C waits for the files to be whole
        pruned = with_compute_dtype(pruned, None)  # the checkpoint leaves the choice to whoever loads it
        if c.export.orbax:
            export.save_orbax_model(pruned, out / "model", overwrite=True)
            outputs["orbax"] = "model/ (streamline_jax.load)"
        if hf_ok:  # gathered on every process (a collective), written by process 0
            from .distributed import to_host

            host = pruned.replace(params=to_host(pruned.params))
            main_only(export.export_hf)(host, out / "hf", overwrite=True)
            outputs["hf"] = "hf/ (transformers.AutoModelForCausalLM.from_pretrained)"
        elif c.export.hf:
            outputs["hf"] = f"not written: an `{c.prune.replacement}` block has no stock Hugging Face form"
    return outputs


def _run(c: RunConfig, out: Path, stages, resume, preset, progress, total_start, target, times: StageTimes,
         inputs: Inputs, shared: SharedWork | None = None) -> dict:
    import jax

    from .distributed import main_only
    from .report import write_report

    log.info("output folder %s; stages %s", out, ", ".join(stages))
    shared = shared if shared is not None else SharedWork()  # this run's own: calibration tokenized once
    report: dict[str, Any] = {"stages": list(stages), "config": c.to_dict(), "preset": preset,
                              "devices": [str(d) for d in jax.devices()], "finished": None}
    with stage("load", times):
        dense, report["model"] = load_stage(c, preset, target, shared)
    staged = stage_layout("scoring", preset, target)
    # the layout (configs/meshes.yaml) each stage ran on; None: the mesh.* settings, or one device
    report["layouts"] = {"load, score, evaluate": str(staged[1]) if staged else None}
    scores = choices = pruned = history = None
    if "score" in stages:
        with stage("score", times):
            scores, choices, parts = score_stage(c, dense, inputs.calib_source, progress, shared,
                                                _load_key(c, preset, target))
        report.update(parts)
    if "prune" in stages:
        with stage("prune", times):
            pruned, parts = prune_stage(c, dense, choices, inputs.calib_source, shared)
        report.update(parts)
    if "train" in stages and c.prune.replacement not in ("none", "linear"):  # `linear` is fitted, not trained
        with stage("train", times):
            pruned, history = train_stage(c, dense, pruned, inputs, out, resume, progress, preset, target)
        report["training"] = history
        report["layouts"]["train"] = history.get("layout")
    if "evaluate" in stages and inputs.tasks:
        with stage("evaluate", times):
            report.update(evaluate_stage(c, dense, pruned, inputs.tasks, progress, shared))
    if inputs.harness is not None:
        with stage("harness", times):
            report["harness"] = harness_stage(c, dense, pruned, inputs.harness)
    if pruned is not None and c.samples.prompts and "evaluate" in stages:
        with stage("samples", times):
            from .generation import side_by_side

            report["samples"] = side_by_side({"dense": dense, "pruned": pruned}, list(c.samples.prompts),
                                             c.samples.max_new_tokens)
    outputs = {}
    if "save" in stages:
        with stage("save", times):
            outputs = save_stage(c, pruned, out, inputs.hf_ok)
    report["outputs"] = outputs
    times["total"] = time.perf_counter() - total_start
    report["stage_times"] = times
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    chosen = (choices[0].start, choices[0].length) if choices else None
    report = main_only(write_report)(report, out, scores, chosen, history) or report
    main_only((out / DONE).write_text)(report["finished"] + "\n")  # last: the folder is finished
    main_only(shutil.rmtree)(out / PAIR_CACHE, ignore_errors=True)  # only a resume of this run needed it
    log.info("report: %s", out / "report.md")
    return report


def stage_layout(stage: str, preset: str | None, target: str | None):
    """(mesh, layout) configs/meshes.yaml gives a stage (scoring, mse, lm) on the named target, else on the target
    matching the devices found; None when there is neither (one device, or the mesh.* settings)."""
    import jax

    from . import plan

    if target is None and (jax.device_count() == 1 or plan.pick_target() is None):
        return None
    return plan.stage_mesh(stage, target=target, model=preset)


def _mesh(c: RunConfig, preset: str | None, target: str | None):
    """The mesh the model loads onto (and scores and evaluates on): the scoring stage's layout from
    configs/meshes.yaml (see `stage_layout`), else the mesh.* settings. One device: no mesh. Training runs on its
    own stage's layout (`train_stage`)."""
    import jax

    from .sharding import make_mesh

    staged = stage_layout("scoring", preset, target)
    if staged is not None:
        mesh, layout = staged
        log.info("mesh layout %s for scoring: %s", target or "matching the devices", layout)
        return mesh
    if jax.device_count() == 1:
        return None
    return make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)


def _evaluate(ev, model, tasks, c: RunConfig, progress: bool) -> dict:
    from .tasks import PerplexityTask

    ppl = [t for t in tasks if isinstance(t, PerplexityTask)]
    mc = [t for t in tasks if not isinstance(t, PerplexityTask)]
    merged = None
    for group, limit in ((ppl, c.eval.ppl_windows), (mc, c.eval.limit)):
        if group:
            res = ev.evaluate(model, group, limit=limit, batch_size=c.eval.batch_size, progress=progress)
            merged = res if merged is None else {**merged, "tasks": {**merged["tasks"], **res["tasks"]}}
    return merged


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    return a == b


def _check_architecture(c: RunConfig, loaded) -> None:
    arch = c.model.architecture
    if not arch:
        return
    diff = {k: (v, getattr(loaded, k)) for k, v in arch.items()
            if k not in ("dtype", "model_type") and not _same(getattr(loaded, k), v)}
    if diff:
        log.warning("the loaded model differs from the preset's architecture in %s",
                    ", ".join(f"{k} (preset {a}, loaded {b})" for k, (a, b) in diff.items()))


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
        prog="python -m streamline_jax.run",
        description="LLM-Streamline in one command: load, score, prune, train, evaluate, save, report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(preset_names()) + "\nstages: " + ", ".join(STAGES) +
               "\nkeys: " + ", ".join(valid_keys()))
    p.add_argument("--model", help=f"preset name, local folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--config", help="a YAML file of settings, applied after the preset")
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
    args = make_parser().parse_intermixed_args(argv)
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
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
            from .plan import find_target

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
        report = run(config, out, stages, overwrite=args.overwrite, resume=args.resume, preset=preset,
                     progress=not args.quiet, target=args.target)
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
