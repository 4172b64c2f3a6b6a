"""The training options (`TrainOptions`, the run's `train.*` settings) and their checks, in one place. Imports no
JAX: settings.py subclasses TrainOptions and checks a run's settings with these before anything loads."""

from __future__ import annotations

import dataclasses
import numbers

MODES = ("mse", "lm", "kd")
LR_SCHEDULES = ("cosine", "cosine-cycle")
MSE_WEIGHTINGS = ("uniform", "token", "balanced")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How `train_replacement` trains: the run's `train.*` settings are this type (settings.TrainSection adds only
    whether to keep a pair cache). See `train_replacement` for what each option does."""

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
    checkpoint_minutes: float | None = None  # also at the first step this long after the last checkpoint
    compute_dtype: str | None = None
    seed: int = 0
    freeze: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ("block",)
    shuffle: bool = False
    lr_schedule: str = "cosine"
    mse_weighting: str = "uniform"
    kd_temperature: float = 1.0
    kd_ce_weight: float = 0.0
    kd_hidden_layers: tuple[int, ...] = ()
    kd_hidden_weight: float = 0.0
    kd_hidden_every: int = 0  # also every this many original layers after the span's output (kd_hidden_weight > 0)
    lr_beyond_block: float | None = None  # peak lr of the trained parameters outside the block (None: lr)
    log_every: int = 10  # steps between reads of the losses (see train_replacement)
    kd_top_k: int = 0  # kd from a pair cache: the teacher's top k log-probabilities cached once (0: the full KL)

    def replace(self, **changes) -> "TrainOptions":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainOptions)})
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; the options are the fields of TrainOptions")
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def check(self, prefix: str = "") -> None:
        """Raise a ValueError naming the first option out of its choices or range (`prefix` before each name: the
        run's settings say "train.")."""
        def name(option):
            return prefix + option

        for option, allowed in (("mode", MODES), ("mse_weighting", MSE_WEIGHTINGS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, option) not in allowed:
                what = f"training {name(option)}" if option == "mode" else name(option)
                raise ValueError(f"unknown {what} {getattr(self, option)!r}; expected one of {allowed}")
        if not self.lr > 0 or not self.min_lr >= 0:
            raise ValueError(f"learning rates must be positive: {name('lr')}={self.lr}, "
                             f"{name('min_lr')}={self.min_lr}")
        if self.lr_beyond_block is not None and not self.lr_beyond_block > 0:
            raise ValueError(f"{name('lr_beyond_block')} must be > 0 (or None: lr), got {self.lr_beyond_block}")
        if self.grad_accum < 1 or self.epochs < 1:
            raise ValueError(f"{name('grad_accum')} and {name('epochs')} must be >= 1, got {self.grad_accum}, "
                             f"{self.epochs}")
        if not isinstance(self.log_every, numbers.Integral) or self.log_every < 1:
            raise ValueError(f"{name('log_every')} must be a whole number >= 1, got {self.log_every!r}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"{name('checkpoint_minutes')} must be > 0 (or None: by steps only), got "
                             f"{self.checkpoint_minutes}")
        if not isinstance(self.kd_top_k, numbers.Integral) or self.kd_top_k < 0:
            raise ValueError(f"{name('kd_top_k')} must be a whole number >= 0 (0: the full-vocabulary KL), got "
                             f"{self.kd_top_k!r}")
        if not 0 <= self.kd_ce_weight <= 1:
            raise ValueError(f"{name('kd_ce_weight')} is the cross-entropy's share of the KD loss: it must be in "
                             f"[0, 1], got {self.kd_ce_weight}")
        if self.kd_hidden_layers and not self.kd_hidden_weight:
            raise ValueError(f"{name('kd_hidden_layers')}={list(self.kd_hidden_layers)} needs "
                             f"{name('kd_hidden_weight')} > 0")
        if not self.trainable:
            raise ValueError(f"{name('trainable')} is empty: nothing would train ([block] trains the replacement "
                             f"block)")
        if self.mode == "mse" and tuple(self.trainable) != ("block",):
            raise ValueError(f"{name('mode')}=mse trains the block only (its loss depends on nothing else); "
                             f"{name('trainable')}={list(self.trainable)} needs {name('mode')}=lm or kd")

    def steps_for(self, batches_per_epoch: int, data: str = "the data", prefix: str = "") -> int:
        """The optimizer steps of a training over `batches_per_epoch` batches an epoch (`data` says where they come
        from, for the error): `num_steps`, checked to fit, or as many as the batches give."""
        total = batches_per_epoch * self.epochs
        steps = total // self.grad_accum if self.num_steps is None else self.num_steps
        if steps < 1:
            raise ValueError(f"{data} gives no optimizer step: {batches_per_epoch} batches per epoch x {self.epochs} "
                             f"epoch(s) with {prefix}grad_accum={self.grad_accum} (the batch may be larger than the "
                             f"data)")
        if steps * self.grad_accum > total:
            raise ValueError(f"{prefix}num_steps={steps} x {prefix}grad_accum={self.grad_accum} needs "
                             f"{steps * self.grad_accum} batches, but {data} gives {batches_per_epoch} per epoch x "
                             f"{prefix}epochs={self.epochs}: {total}")
        return steps
