"""The run's settings: one frozen dataclass per section of configs/pipeline.yaml, read in layers (the pipeline's
defaults, a model preset configs/<name>.yaml, `--config FILE`, `key=value` overrides), each key and value checked
with the nearest valid key suggested, and the checks against the model's shapes."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import re
import typing
from pathlib import Path

import yaml

from .config_files import CONFIG_DIR, config_path, recipe_names
from .train.options import TrainOptions

DEFAULT_MODEL = "smollm2-135m"
STAGES = ("score", "prune", "train", "evaluate", "save")
PRUNE_INITS = ("default", "linear")
DISTILL_TEXTS = ("corpus", "self")
OFFLOAD_SPAN = ("auto", "disk", "none")  # auto: disk where the weights fill a CPU host (host_memory.weights_fill_host)
NOT_PRESETS = ("pipeline", "meshes")

log = logging.getLogger(__name__)


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
    shuffle_buffer: int = 0  # documents read in a seeded shuffled order (datasets' buffer shuffle); 0: files' order
    shuffle_seed: int = 0
    max_skipped_records: int = 0  # records without text skipped (counted, logged) before a source is refused
    seq_len: int = 2048
    calib_chunks: int = 256
    train_chunks: int = 4096
    valid_chunks: int = 64
    batch_size: int = 8
    distill_text: str = "corpus"  # what the distillation phase reads: corpus | self (the dense model's own answers)
    self_prompts: str | None = None  # self: a .txt (a prompt a line) or .jsonl file; null: cut from the corpus
    self_max_new_tokens: int = 256
    self_temperature: float = 0.7  # 0: greedy
    self_top_p: float = 0.9
    self_batch_size: int = 16  # prompts answered at once
    self_chunks: int | None = None  # seq_len chunks of self data; null: one pass of the distillation's steps
    self_mix: float = 1.0  # self: the share of each distillation batch's rows that are the model's own answers, the
    # rest training chunks (the corpus's text beside the model's own)

    @property
    def self_rows(self) -> int:
        """How many rows of each distillation batch are the model's own answers (self_mix of batch_size; check_values
        keeps it in 1..batch_size)."""
        return round(self.batch_size * self.self_mix)


@dataclasses.dataclass(frozen=True)
class ScoreSection:
    metric: str = "cosine"
    sparsity: float | None = 0.25
    num_layers: int | None = None
    protect_first: int = 0
    protect_last: int = 0
    spans: int = 1  # disjoint spans, each replaced by its own block (score.choose_spans)
    heal_candidates: int = 3  # metric heal: the top this many spans by cosine are healed and compared
    heal_steps: int = 16  # metric heal: MSE steps of each candidate's block before its validation loss


@dataclasses.dataclass(frozen=True)
class PruneSection:
    replacement: str = "layer"
    mlp_width: int | None = None
    init: str = "default"  # `linear`: fit an mlp/ffn/layer block's output projection in closed form before training
    ridge: float = 1e-4  # of the closed-form fits (`linear` blocks, init=linear), relative to trace(X^T X)/width
    fit_weighting: str = "token"  # of the closed-form fits: token (relative error per token) | uniform (ReplaceMe's)
    #                               | balanced (the MSE phase's weighting)


@dataclasses.dataclass(frozen=True)
class TrainSection(TrainOptions):
    """`train_replacement`'s own options type, so that every training option is a setting, with its default; and
    the run's own: whether to keep the span's pairs on disk and whether to offload the dense span meanwhile (the
    API takes their folders), and a distillation phase after the training (train_replacement again, in mode kd,
    from its result)."""

    pair_cache: bool = False
    offload_span: str = "auto"  # auto | disk | none: the dense span on disk while training reads its cached pairs
    distill_steps: int = 0  # then this many steps of mode kd from the result (0: none)
    distill_lr: float = 1e-3
    distill_trainable: tuple[str, ...] | None = None  # what the distillation phase trains (null: train.trainable)
    distill_freeze: tuple[str, ...] | None = None  # what stays frozen in the block there (null: train.freeze)
    distill_lr_beyond_block: float | None = None  # its lr of trained parameters outside the block (null: distill_lr)

    @property
    def distils_after(self) -> bool:
        """Whether a distillation phase follows the training (mode kd distils already: none there)."""
        return bool(self.distill_steps) and self.mode != "kd"

    def distillation(self, train_chunks: int, batch_size: int) -> "TrainSection":
        """The distillation phase's options: mode kd at distill_lr for distill_steps (the chunks read again where
        one pass has fewer batches), validated at the end, checkpointed every checkpoint_every steps (null: at its
        end, and checkpoint_minutes after the last checkpoint: it may train every layer, and a checkpoint holding
        them with their Adam state cost the default run's 2-core CPU ~16 s at 8 a phase), training
        distill_trainable less distill_freeze (null: the first phase's), those outside the block at distill_lr_beyond_block."""
        per_epoch = max(1, train_chunks // batch_size)
        return self.replace(
            mode="kd", lr=self.distill_lr, num_steps=self.distill_steps, warmup_steps=None,
            epochs=-(-self.distill_steps * self.grad_accum // per_epoch), eval_every=self.distill_steps,
            checkpoint_every=self.checkpoint_every or self.distill_steps,
            trainable=self.trainable if self.distill_trainable is None else self.distill_trainable,
            freeze=self.freeze if self.distill_freeze is None else self.distill_freeze,
            lr_beyond_block=self.distill_lr_beyond_block)


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
    gguf: bool = True  # where the family, the block and a GGUF tokenizer allow it
    gguf_type: str = "f16"


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


# Settings of which exactly one is set: a sweep over one sets the other to null.
ALTERNATIVE_SETTINGS = {"score.sparsity": "score.num_layers", "score.num_layers": "score.sparsity"}


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
        path = config_path(str(config_file))
        if not path.is_file() and Path(str(config_file)).suffix not in (".yaml", ".yml"):
            raise ConfigError(f"--config {config_file}: no such file and not a shipped recipe "
                              f"({', '.join(recipe_names())})")
        user = check_layer(read_yaml(path), str(config_file))
        settings = merge(settings, user)
    else:
        user = {}
    override_layer = check_layer(parse_overrides(list(overrides)), "override")
    settings, user = merge(settings, override_layer), merge(user, override_layer)
    classes = _section_classes()
    config = RunConfig(**{s: classes[s](**settings.get(s, {})) for s in classes})
    if (config.data.distill_text == "self" and not config.train.distils_after
            and "distill_text" not in user.get("data", {})):  # a preset's choice, for a phase these settings drop
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, distill_text="corpus"))
    check_values(config)
    return config, preset


def check_values(c: RunConfig) -> None:
    """Choices and ranges, before any work."""
    from .export_gguf import GGUF_TYPES
    from .linear_fit import WEIGHTINGS as FIT_WEIGHTINGS
    from .pruning import REPLACEMENTS
    from .score import SPAN_METRICS
    from .train.options import LR_SCHEDULES, MODES, MSE_WEIGHTINGS

    def choice(key, value, allowed):
        if value not in allowed:
            near = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}{hint}")

    choice("score.metric", c.score.metric, SPAN_METRICS)
    choice("prune.replacement", c.prune.replacement, REPLACEMENTS)
    choice("export.gguf_type", c.export.gguf_type, GGUF_TYPES)
    choice("prune.init", c.prune.init, PRUNE_INITS)
    choice("prune.fit_weighting", c.prune.fit_weighting, FIT_WEIGHTINGS)
    if c.prune.init == "linear" and c.prune.replacement not in ("mlp", "ffn", "layer"):
        raise ConfigError(f"prune.init=linear fits the output projection of an mlp, ffn or layer block, not of "
                          f"prune.replacement={c.prune.replacement!r} (a `linear` block is always fitted)")
    choice("data.distill_text", c.data.distill_text, DISTILL_TEXTS)
    if not 0 < c.data.self_mix <= 1 or c.data.batch_size * c.data.self_mix < 1:
        raise ConfigError(f"data.self_mix={c.data.self_mix!r} must be in (0, 1] and leave at least one row of each "
                          f"distillation batch (data.batch_size={c.data.batch_size}) to the model's own answers")
    if c.data.self_chunks is not None and c.data.self_chunks < c.data.self_rows:
        raise ConfigError(f"data.self_chunks={c.data.self_chunks} fills no distillation batch: each holds "
                          f"{c.data.self_rows} rows of the model's own answers (data.batch_size x data.self_mix)")
    if c.data.distill_text == "self" and not c.train.distils_after:
        raise ConfigError("data.distill_text=self is the text of the distillation phase, and there is none: set "
                          "train.distill_steps (with a train.mode other than kd), or data.distill_text=corpus")
    choice("train.mode", c.train.mode, MODES)
    choice("train.lr_schedule", c.train.lr_schedule, LR_SCHEDULES)
    choice("train.mse_weighting", c.train.mse_weighting, MSE_WEIGHTINGS)
    choice("train.offload_span", c.train.offload_span, OFFLOAD_SPAN)
    if (c.score.sparsity is None) == (c.score.num_layers is None):
        raise ConfigError("set exactly one of score.sparsity and score.num_layers (the other to null)")
    if c.score.spans > 1 and c.score.metric in ("perplexity", "last", "heal"):
        raise ConfigError(f"score.spans={c.score.spans} places spans by their similarity scores; "
                          f"score.metric={c.score.metric} chooses one span only")
    if c.score.metric == "heal" and not (c.data.valid and c.data.valid_chunks):
        raise ConfigError("score.metric=heal compares the healed candidates by their loss on the validation chunks: "
                          f"set data.valid and data.valid_chunks >= 1 (now {c.data.valid!r}, {c.data.valid_chunks})")
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
    ("data.valid_chunks", 0, True), ("data.batch_size", 1, True), ("data.shuffle_buffer", 0, True),
    ("data.max_skipped_records", 0, True), ("data.self_max_new_tokens", 1, True), ("data.self_temperature", 0, True),
    ("data.self_top_p", 0, False), ("data.self_batch_size", 1, True), ("data.self_chunks", 1, True),
    ("score.sparsity", 0, False), ("score.num_layers", 1, True), ("score.protect_first", 0, True),
    ("score.protect_last", 0, True), ("score.spans", 1, True), ("score.heal_candidates", 1, True),
    ("score.heal_steps", 1, True), ("prune.mlp_width", 1, True), ("prune.ridge", 0, True),
    ("train.num_steps", 1, True), ("train.epochs", 1, True), ("train.lr", 0, False), ("train.min_lr", 0, True),
    ("train.warmup_steps", 0, True), ("train.weight_decay", 0, True), ("train.clip_norm", 0, False),
    ("train.grad_accum", 1, True), ("train.eval_every", 1, True), ("train.checkpoint_every", 1, True),
    ("train.checkpoint_minutes", 0, False), ("train.kd_temperature", 0, False), ("train.kd_ce_weight", 0, True),
    ("train.kd_hidden_weight", 0, True),
    ("train.kd_hidden_every", 0, True), ("train.log_every", 1, True), ("train.distill_steps", 0, True),
    ("train.distill_lr", 0, False), ("train.lr_beyond_block", 0, False), ("train.distill_lr_beyond_block", 0, False),
    ("train.kd_top_k", 0, True),
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
    if c.data.self_top_p > 1:
        raise ConfigError(f"data.self_top_p must be in (0, 1] (1: off), got {c.data.self_top_p}")
    if c.mesh.fsdp != -1 and c.mesh.fsdp < 1:
        raise ConfigError(f"mesh.fsdp must be >= 1, or -1 (every device left), got {c.mesh.fsdp}")
    if c.train.min_lr > c.train.lr:
        raise ConfigError(f"train.min_lr ({c.train.min_lr}) must not exceed train.lr ({c.train.lr})")
    if c.train.distils_after and c.train.min_lr > c.train.distill_lr:
        raise ConfigError(f"train.min_lr ({c.train.min_lr}) must not exceed train.distill_lr ({c.train.distill_lr})")
    for key in ("trainable", "freeze", "distill_trainable", "distill_freeze"):
        for pattern in getattr(c.train, key) or ():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"train.{key}: {pattern!r} is not a regular expression ({e})") from None
    if c.train.kd_top_k and (c.train.mode == "kd" or c.train.distils_after) and not c.train.pair_cache:
        raise ConfigError(f"train.kd_top_k={c.train.kd_top_k} needs train.pair_cache=true: the teacher's top k are "
                          f"cached beside the span's pairs (0: the full-vocabulary KL, no cache)")
    if c.train.distill_trainable is not None and not c.train.distill_trainable:
        raise ConfigError("train.distill_trainable is empty: the distillation phase would train nothing (null: as "
                          "train.trainable)")
    try:  # the training options' own checks, as train_replacement makes them
        c.train.check(prefix="train.")
        c.train.steps_for(c.data.train_chunks // c.data.batch_size, f"data.train_chunks={c.data.train_chunks}",
                          prefix="train.")
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
            from .loading import gguf_hf_config, open_gguf
            from .models.config import from_hf_config

            return from_hf_config(gguf_hf_config(open_gguf(path)))
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
    if c.train.kd_top_k > config.vocab_size:
        raise ConfigError(f"train.kd_top_k={c.train.kd_top_k} must be at most the model's vocabulary size "
                          f"({config.vocab_size})")
    if config.family == "opt" and c.data.seq_len > config.max_position_embeddings:
        raise ConfigError(f"data.seq_len={c.data.seq_len} is longer than the {config.max_position_embeddings} "
                          f"positions OPT learned (max_position_embeddings of {c.model.source})")
    if c.data.seq_len > config.max_position_embeddings:  # refused before the chunks' memory is allocated
        raise ConfigError(f"data.seq_len={c.data.seq_len} is longer than the model's context of "
                          f"{config.max_position_embeddings} tokens (max_position_embeddings of {c.model.source})")


def preset_model_config(name: str):
    """The abstract ModelConfig of a YAML preset (shapes only), for eval_shape planning and parameter counts."""
    from .models.config import ModelConfig

    layer = check_layer(read_yaml(CONFIG_DIR / f"{name}.yaml"), f"configs/{name}.yaml")
    model = layer.get("model", {})
    if not model.get("architecture"):
        raise ConfigError(f"preset {name!r} gives no model.architecture")
    return ModelConfig(**model["architecture"], dtype=model.get("dtype") or "float32")


