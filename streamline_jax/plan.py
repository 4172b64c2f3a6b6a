"""Pod-scale planning: the run's sharded steps (scoring, MSE training, LM-loss training, evaluation) on the mesh
layouts of configs/meshes.yaml (mesh_layouts.py), and ahead-of-time compiles for real TPU topologies with per-chip
memory.

The AOT path needs no TPU and no weights: libtpu (the `tpu` extra) describes the topology, parameters are
`ShapeDtypeStruct`s carrying their `NamedSharding`, and `jit(...).lower(...).compile()` gives XLA's own
`memory_analysis()` and `cost_analysis()` for one chip.

The steps planned are the run's own jitted functions: scoring lowers `score.score_sums` as `score_spans` calls it,
training lowers the train step of `train.training_program`, the builder `train_replacement` runs (same loss, optax
chain, remat, shardings and donation of the trained parameters and optimizer state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from . import train
from .models import transformer
from .models.config import ModelConfig
from .models.model import Model, with_compute_dtype
from .pruning import prune_config
from .evaluation import heads_once, shared_prefix_logprobs
from .score import score_sums
from .mesh_layouts import STEP_LAYOUTS, StageLayout, Target, TopologyError, check_layout, layout_mesh
from .sharding import ShardingError, param_shardings, shard_bytes

# Compile-only use of libtpu touches no chip, so several planning processes may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

PLANNED_STEPS = tuple(STEP_LAYOUTS)  # the steps a plan compiles, each on its layout
GIB = 1024 ** 3
# XLA keeps a little HBM for itself; a plan must fit in this share of the chip.
USABLE_HBM = 0.95


# --------------------------------------------------------------------------------------------------------------
# Topologies (libtpu, compile only)


LIBTPU_PATH_ENV = "LIBTPU_PATH"
# `scripts/setup.sh --test` installs libtpu into this folder of the venv, beside its packages rather than among them:
# there, every JAX process would try to start a TPU.
LIBTPU_SITE = "libtpu-site"


def libtpu_places() -> list[tuple[Path, str]]:
    """(folder, why it is looked in) for the `libtpu` package, in order: $LIBTPU_PATH, then libtpu-site/ in the
    running venv and in this checkout's .venv."""
    env = os.environ.get(LIBTPU_PATH_ENV)
    places = [(Path(env).expanduser().absolute(), f"${LIBTPU_PATH_ENV}")] if env else []
    for venv, why in ((Path(sys.prefix), "the running venv"),
                      (Path(__file__).resolve().parents[1] / ".venv", "this checkout's venv")):
        if all(venv / LIBTPU_SITE != p for p, _ in places):
            places.append((venv / LIBTPU_SITE, why))
    return places


def libtpu_folder() -> Path | None:
    """The first of `libtpu_places()` that holds the `libtpu` package, or None."""
    return next((p for p, _ in libtpu_places() if (p / "libtpu" / "__init__.py").is_file()), None)


def libtpu_available() -> bool:
    return libtpu_folder() is not None or importlib.util.find_spec("libtpu") is not None


def libtpu_missing_message() -> str:
    looked = [f"{p} ({why})" for p, why in libtpu_places()]
    if not os.environ.get(LIBTPU_PATH_ENV):
        looked.insert(0, f"${LIBTPU_PATH_ENV} (not set)")
    return (f"ahead-of-time compiles for TPU need libtpu (no TPU is needed), and none was found. Looked for the "
            f"libtpu package in: {', '.join(looked)}, and the Python path. Install it with `bash scripts/setup.sh "
            f"--test` (into .venv/{LIBTPU_SITE}), or pip install 'jax[tpu]=={jax.__version__}' (the `tpu` extra), or "
            f"set {LIBTPU_PATH_ENV} to a folder holding the libtpu package")


@contextlib.contextmanager
def _libtpu_importable():
    """The found libtpu folder on sys.path while JAX loads the TPU plugin (it imports `libtpu` to find
    libtpu.so); $LIBTPU_PATH comes before an installed libtpu."""
    folder = libtpu_folder()
    if folder is None:
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


_TOPOLOGY_RE = re.compile(r"v(4|5e|5p|6e):\d+(x\d+){1,2}")


@functools.lru_cache(maxsize=16)
def topology_devices(topology: str, chip_config: str = "default") -> tuple:
    """Compile-only TPU devices for a topology such as `v5e:4x4` (no TPU needed, libtpu is)."""
    if not _TOPOLOGY_RE.fullmatch(topology):
        raise TopologyError(f"topology {topology!r} is not of the form v5e:4x4, v5p:2x2x4 or v4:2x2x4")
    if not libtpu_available():
        raise TopologyError(libtpu_missing_message())
    from jax.experimental import topologies

    kwargs = {}
    dims = [int(x) for x in topology.split(":")[1].split("x")]
    if topology.startswith("v5e") or topology.startswith("v6e"):
        kwargs["chips_per_host_bounds"] = (min(dims[0], 2), min(dims[1], 2), 1)
    try:
        with _libtpu_importable():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                chip_config_name=chip_config, num_slices=1, **kwargs)
    except Exception as e:  # libtpu rejects the shape
        raise TopologyError(f"libtpu rejects topology {topology!r}: {e}") from None
    return tuple(desc.devices)


def target_devices(target: Target) -> tuple:
    if target.platform != "tpu" or not target.topology:
        raise TopologyError(f"target {target.name} ({target.platform}) has no topology to compile for ahead of "
                            f"time; only TPU targets do")
    devices = topology_devices(target.topology, target.chip_config)
    if len(devices) != target.devices:
        raise TopologyError(f"topology {target.topology} has {len(devices)} devices, target {target.name} says "
                            f"{target.devices}")
    return devices


# --------------------------------------------------------------------------------------------------------------
# Model shapes for each stage


def default_span(config: ModelConfig) -> tuple[int, int]:
    """A quarter of the layers starting a quarter of the way in: the backward pass of the LM step then runs
    through half the model, more than for the late spans LLM-Streamline usually picks."""
    n = max(1, config.num_layers // 4)
    return max(1, config.num_layers // 4), n


# Training settings a plan uses where it is given none: train_replacement's own defaults, and a step count for the
# schedule (its constants are part of the compiled program, not of its memory).
PLAN_NUM_STEPS = 1000


def training_defaults() -> dict:
    """train_replacement's option defaults (the settings the run trains with unless told otherwise)."""
    return dataclasses.asdict(train.TrainOptions())


def training_program(stage: str, config: ModelConfig, span: tuple[int, int], mesh: Mesh | None, *,
                     remat: str = "none", training: dict | None = None,
                     platform: str | None = None) -> tuple[train.TrainingProgram, ModelConfig]:
    """(the program `train_replacement` compiles for this stage, the pruned config): `training` holds
    train_replacement keyword arguments (mode, lr, num_steps, grad_accum, compute_dtype, trainable, freeze, kd_*, ...;
    the rest its defaults, and the run's `distill_*` settings); the `lm` stage trains with mode `lm` unless
    `training` says `kd` or has a distillation phase (`distill_steps`, which runs on the `lm` layout and trains
    `distill_trainable` less `distill_freeze` where they are set)."""
    options = {**training_defaults(), "num_steps": PLAN_NUM_STEPS, **(training or {})}
    if platform is not None:  # the target's attention, not this host's
        config = config.replace(attention_platform=platform)
    mode = "mse" if stage == "mse" else ("kd" if options["mode"] == "kd" or options.get("distill_steps") else "lm")
    if mode == "kd" and options["mode"] != "kd":  # the distillation phase's: what it trains, as the run picks it
        from .settings import TrainSection

        names = {f.name for f in dataclasses.fields(TrainSection)}
        phase = TrainSection(**{k: v for k, v in options.items() if k in names}).distillation(1, 1)
        options = {**options, "mode": phase.mode, "trainable": phase.trainable, "freeze": phase.freeze,
                   "lr_beyond_block": phase.lr_beyond_block}
    if options["compute_dtype"] is not None:  # as train_replacement resolves it
        config = with_compute_dtype(Model(config, None), options["compute_dtype"]).config
    start, length = span
    pruned = prune_config(config, start, length, "layer")
    names = {f.name for f in dataclasses.fields(train.TrainOptions)}
    train_options = train.TrainOptions().replace(**{k: v for k, v in options.items() if k in names})
    num_steps = options["num_steps"] or PLAN_NUM_STEPS  # a run's null: every batch, for the schedule only
    program = train.build_program(train_options, config, pruned, train.trainable_blocks(pruned)[0], num_steps,
                                  loss_name=mode, remat=remat, mesh=mesh, platform=platform)
    return program, pruned


# --------------------------------------------------------------------------------------------------------------
# The steps: the jitted functions the run executes, with abstract, sharded arguments


@dataclasses.dataclass
class StepPlan:
    """A step ready to lower: the run's own jitted function and abstract sharded arguments for it."""
    stage: str
    jitted: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)

    def lower(self):
        return self.jitted.lower(*self.args, **self.kwargs)


def _mesh_platform(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


def _abstract_sharded_params(config: ModelConfig, mesh: Mesh):
    abstract = transformer.abstract_params(config)
    shard = param_shardings(abstract, transformer.param_axes(config), mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)


def build_step(stage: str, config: ModelConfig, layout: StageLayout, mesh: Mesh, seq_len: int, *,
               span: tuple[int, int] | None = None, training: dict | None = None) -> StepPlan:
    """The stage's step as the run executes it (score.score_sums, evaluation.shared_prefix_logprobs of the dense
    and the pruned model on packed rows, or train.training_program's train step) with abstract arguments sharded on
    `mesh`; `span`: the pruned span (default `default_span`); `training`: train_replacement keyword arguments (see
    `training_program`)."""
    check_layout(config, layout)
    platform = _mesh_platform(mesh)
    config = config.replace(attention_platform=platform)  # the target's attention, not this host's
    batch = train.abstract_batch(layout.batch, seq_len, mesh)
    if stage in ("scoring", "evaluate"):
        params = _abstract_sharded_params(config, mesh)
        if stage == "evaluate":
            # a run's first evaluation: dense and pruned together, the layers before the span once
            # (`evaluation.model_group`), on packed rows with shared prefixes (the larger of its two row kinds)
            start, length = span or default_span(config)
            pruned = prune_config(config, start, length, "layer")
            configs, ids = (config, pruned), batch["input_ids"]
            both = heads_once([params, _abstract_sharded_params(pruned, mesh)], same=lambda a, b: True)  # one head
            return StepPlan(stage, shared_prefix_logprobs.jitted(configs, platform), (configs, both),
                            dict(input_ids=ids, targets=ids, segment_ids=ids, positions=ids, shared_prefix_ids=ids,
                                 shared=start, with_greedy=False))
        return StepPlan(stage, score_sums.jitted(config, platform),
                        (config, params, batch["input_ids"], batch["attention_mask"]))
    if stage not in PLANNED_STEPS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {PLANNED_STEPS}")
    program, _ = training_program(stage, config, span or default_span(config), mesh, remat=layout.remat,
                                  training=training, platform=platform)
    return StepPlan(stage, program.train_step, program.arguments + (batch,))


# --------------------------------------------------------------------------------------------------------------
# Compile and report


@dataclasses.dataclass
class MemoryPlan:
    stage: str
    layout: StageLayout
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # XLA's count for one chip; it counts a scanned layer stack's body once
    hbm_bytes: float
    model_flops: float = float("nan")  # per step, all chips, counted by `step_flops`
    xla_bytes: float = float("nan")  # HBM bytes accessed, XLA's count for one chip (a scan body once, as `flops`)

    @property
    def total_bytes(self) -> int:
        """Peak per-chip need: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= USABLE_HBM * self.hbm_bytes

    def row(self) -> dict:
        g = lambda b: round(b / GIB, 2)
        return dict(stage=self.stage, layout=str(self.layout), args_gib=g(self.argument_bytes),
                    out_gib=g(self.output_bytes - self.alias_bytes), temp_gib=g(self.temp_bytes),
                    total_gib=g(self.total_bytes), hbm_gib=g(self.hbm_bytes),
                    tflops_per_chip=round(self.model_flops / self.layout.devices / 1e12, 1),
                    xla_tflops_per_chip=round(self.flops / 1e12, 2), fits=self.fits)


def argument_bytes(args) -> int:
    """Bytes of one device's shards of abstract sharded arguments."""
    return sum(shard_bytes(a) for a in jax.tree.leaves(args) if isinstance(a, jax.ShapeDtypeStruct))  # not the config


def compile_plan(plan: StepPlan):
    return plan.lower().compile()


def layer_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one decoder layer per token: 2 per matmul weight, plus attention scores and mixing over
    all `seq_len` key slots (the masked einsum computes them all)."""
    d, h, kv, hd, f = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    weights = d * hd * (2 * h + 2 * kv) + d * f * (3 if config.family == "llama" else 2)
    return 2 * weights + 4 * seq_len * h * hd


def step_flops(config: ModelConfig, stage: str, batch: int, seq_len: int, span=None, remat: str = "none") -> float:
    """FLOPs of one step on the whole mesh. XLA's cost analysis counts the body of a scanned layer stack once,
    so the per-step total is counted here from the shapes: backward = 2× forward for trained weights, 1× for
    frozen layers the gradient only passes through, plus one more forward where remat recomputes."""
    tokens = batch * seq_len
    layer = layer_flops(config, seq_len)
    head = 2 * config.embed_dim * config.vocab_size
    L = config.num_layers
    start, length = span or default_span(config)
    if stage == "scoring":
        return tokens * (L * layer + 2 * (L + 1) ** 2 * config.hidden_size)
    if stage == "evaluate":  # dense and pruned together: the layers before the span once, then each its own
        return tokens * ((2 * L - start - length + 1) * layer + 2 * head)
    if stage == "mse":
        return tokens * ((start + length) * layer + 3 * layer)
    after = L - start - length
    recompute = 0 if remat == "none" else 1
    return tokens * (start * layer + (3 + recompute) * layer + (2 + recompute) * after * layer + 2 * head)


def memory_plan(compiled, stage: str, layout: StageLayout, seq_len: int, hbm_gib: float) -> MemoryPlan:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return MemoryPlan(stage, layout, seq_len, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                      int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes),
                      int(mem.generated_code_size_in_bytes), float((cost or {}).get("flops", float("nan"))),
                      hbm_gib * GIB, xla_bytes=float((cost or {}).get("bytes accessed", float("nan"))))


def plan_stage(config: ModelConfig, target: Target, stage: str, layout: StageLayout, seq_len: int, *,
               span=None, training: dict | None = None, devices=None) -> MemoryPlan:
    devices = devices if devices is not None else target_devices(target)
    mesh = layout_mesh(layout, devices)
    plan = build_step(stage, config, layout, mesh, seq_len, span=span, training=training)
    try:
        result = memory_plan(compile_plan(plan), stage, layout, seq_len, target.hbm_gib)
    except jax.errors.JaxRuntimeError as e:
        # the TPU compiler refuses a program whose temporaries exceed HBM: that is a plan that does not fit
        m = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        result = MemoryPlan(stage, layout, seq_len, argument_bytes((plan.args, plan.kwargs)), 0, 0, int(float(m.group(1)) * GIB), 0,
                            float("nan"), target.hbm_gib * GIB)
    result.model_flops = step_flops(config, stage, layout.batch, seq_len, span, layout.remat)
    return result


def candidate_layouts(config: ModelConfig, layout: StageLayout, devices: int):
    """Layouts to try when `layout` does not fit, nearest first: a smaller batch, then more remat, then
    tensor parallelism (which also splits activations), each at the largest batch the mesh can split."""
    out = []
    b = layout.batch // 2
    while b >= layout.data * layout.fsdp and b % (layout.data * layout.fsdp) == 0:
        out.append(layout.replace(batch=b))
        b //= 2
    if layout.remat != "full":
        out.append(layout.replace(remat="full"))
    for t in (2, 4, 8):
        if devices % t or config.num_kv_heads % t or config.num_heads % t:
            continue
        f = devices // t
        for batch in (layout.batch, max(f, layout.batch // t)):
            cand = StageLayout(1, f, t, batch, "full" if layout.remat != "none" else "none")
            try:
                check_layout(config, cand)
            except ShardingError:
                continue
            if cand not in out:
                out.append(cand)
    return [c for c in out if c != layout]


def nearest_fitting(config: ModelConfig, target: Target, stage: str, layout: StageLayout, seq_len: int, *,
                    span=None, training: dict | None = None, max_tries: int = 6):
    """The first candidate layout that fits, with its plan, or (None, tried plans)."""
    tried = []
    for cand in candidate_layouts(config, layout, target.devices)[:max_tries]:
        plan = plan_stage(config, target, stage, cand, seq_len, span=span, training=training)
        tried.append(plan)
        if plan.fits:
            return plan, tried
    return None, tried
