"""The run's mesh layouts (configs/meshes.yaml): for each target (a chip and a device count) the (data, fsdp,
tensor) split, batch and remat policy of each stage's step, and the mesh a stage runs on. The pipeline reads them
for its stages; plan.py compiles the steps on them ahead of time."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from .config_files import CONFIG_DIR
from .models.config import ModelConfig
from .models.transformer import REMAT_POLICIES
from .sharding import MESH_AXES, ShardingError

MESHES_YAML = CONFIG_DIR / "meshes.yaml"
LAYOUT_STAGES = ("scoring", "mse", "lm")  # each target in configs/meshes.yaml gives these
# the steps a layout is asked for, each with the layout it runs on: evaluation runs on the scoring one, as the run does
STEP_LAYOUTS = {"scoring": "scoring", "mse": "mse", "lm": "lm", "evaluate": "scoring"}


class TopologyError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class StageLayout:
    data: int
    fsdp: int
    tensor: int
    batch: int
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {REMAT_POLICIES}")

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    def replace(self, **changes) -> "StageLayout":
        return dataclasses.replace(self, **changes)

    def __str__(self):
        return f"data={self.data} fsdp={self.fsdp} tensor={self.tensor} batch={self.batch} remat={self.remat}"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str
    device_kind: str
    devices: int
    hbm_gib: float
    stages: dict
    topology: str | None = None
    chip_config: str = "default"

    def layout(self, stage: str, model: str | None = None, overrides: dict | None = None) -> StageLayout:
        if stage not in STEP_LAYOUTS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {tuple(STEP_LAYOUTS)}")
        stage = STEP_LAYOUTS[stage]
        d = dict(self.stages[stage])
        d.update(((overrides or {}).get(self.name, {}).get(model, {}) or {}).get(stage, {}))
        return StageLayout(**d)


def load_targets(path: str | Path = MESHES_YAML) -> tuple[dict[str, Target], dict, int]:
    """(targets by name, overrides, default seq_len) from the mesh layouts file, checked."""
    raw = yaml.safe_load(Path(path).read_text())
    targets = {}
    for name, t in raw["targets"].items():
        t = dict(t)
        stages = t.pop("stages")
        missing = [s for s in LAYOUT_STAGES if s not in stages]
        if missing:
            raise ValueError(f"{path}: target {name!r} has no layout for stage(s) {missing}")
        target = Target(name=name, stages=stages, **t)
        for stage in LAYOUT_STAGES:
            layout = target.layout(stage)
            if layout.devices != target.devices:
                raise ValueError(f"{path}: {name}/{stage} splits {layout.devices} devices, the target has "
                                 f"{target.devices}")
        targets[name] = target
    return targets, raw.get("overrides") or {}, int(raw.get("seq_len", 2048))


def find_target(name: str, targets: dict[str, Target] | None = None) -> Target:
    """A target by its name (`v5e-16`) or its topology (`v5e:4x4`); a clear error otherwise."""
    targets = targets or load_targets()[0]
    if name in targets:
        return targets[name]
    for t in targets.values():
        if t.topology == name:
            return t
    known = list(targets) + [t.topology for t in targets.values() if t.topology]
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise TopologyError(f"unknown target or topology {name!r}{hint} (known: {', '.join(known)})")


def _chip(kind: str) -> str:
    """A device kind as the chip family meshes.yaml names (`TPU v5 lite`/`TPU v5e` → v5e, `TPU v5`/`TPU v5p` → v5p)."""
    k = kind.lower()
    for chip, marks in (("v5e", ("v5 lite", "v5e", "v5litepod")), ("v6e", ("v6 lite", "v6e")), ("v5p", ("v5p", "tpu v5")),
                        ("v4", ("tpu v4",)), ("h100", ("h100",)), ("h200", ("h200",))):
        if any(m in k for m in marks):
            return chip
    return k


def pick_target(devices=None, targets: dict[str, Target] | None = None) -> Target | None:
    """The target matching the devices JAX sees (chip and count), or None."""
    devices = list(devices if devices is not None else jax.devices())
    targets = targets or load_targets()[0]
    chip = _chip(devices[0].device_kind)
    for t in targets.values():
        if len(devices) == t.devices and _chip(t.device_kind) == chip:
            return t
    return None


def stage_mesh(stage: str, target: str | None = None, model: str | None = None, devices=None) -> tuple[Mesh, StageLayout]:
    """The mesh (and layout) for a stage on the devices JAX sees: the named target's layout, else the target that
    matches the devices, else every device on fsdp."""
    devices = list(devices if devices is not None else jax.devices())
    targets, overrides, _ = load_targets()
    t = find_target(target, targets) if target else pick_target(devices, targets)
    if t is None:
        layout = StageLayout(1, len(devices), 1, len(devices), "full" if stage == "lm" else "none")
    else:
        layout = t.layout(stage, model, overrides)
    return layout_mesh(layout, devices), layout


def check_layout(config: ModelConfig, layout: StageLayout, batch: int | None = None) -> None:
    """A clear error when the mesh cannot split the heads, the MLP, the vocabulary or the batch."""
    batch = layout.batch if batch is None else batch
    t = layout.tensor
    for what, size in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads),
                       ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if size % t:
            raise ShardingError(f"tensor={t} does not divide {what}={size}; pick a tensor size that divides it "
                                f"(divisors: {_divisors(size, up_to=64)})")
    shards = layout.data * layout.fsdp
    if batch % shards:
        raise ShardingError(f"batch {batch} cannot be split over data×fsdp = {layout.data}×{layout.fsdp} = {shards} "
                            f"shards; use a multiple of {shards}")
    if config.hidden_size % layout.fsdp:
        raise ShardingError(f"fsdp={layout.fsdp} does not divide hidden_size={config.hidden_size}")


def _divisors(n, up_to):
    return [d for d in range(1, up_to + 1) if n % d == 0]


def layout_mesh(layout: StageLayout, devices) -> Mesh:
    devices = list(devices)
    if layout.devices != len(devices):
        raise ShardingError(f"layout {layout} needs {layout.devices} devices, found {len(devices)}")
    shape = (layout.data, layout.fsdp, layout.tensor)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # not a shape the physical mesh helper knows: plain order
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
