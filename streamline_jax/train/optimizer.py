"""The optimizer: AdamW with clipping, the learning-rate schedule, per-path lr scales and gradient accumulation."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from .options import LR_SCHEDULES
from .params import param_path


def lr_schedule(name, lr, min_lr, warmup_steps, total_steps):
    """Linear warm-up from 0, then `cosine`: half a cosine from lr down to min_lr at the last step; or
    `cosine-cycle`: a whole cosine period, down to min_lr half-way and back up to lr at the end. The second is what
    the authors' code runs when it asks for the first: it sets the scheduler's length to half the steps, and its
    cosine keeps going past that length."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; expected one of {LR_SCHEDULES}")
    warmup_steps = max(warmup_steps, 1)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
                                                  decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)
    half = max(total_steps / 2 - warmup_steps, 1.0)

    def schedule(step):
        warm = lr * step / warmup_steps
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * (step - warmup_steps) / half))
        return jnp.where(step < warmup_steps, warm, min_lr + cosine * (lr - min_lr))

    return schedule


def warmup_steps_for(num_steps, warmup_steps=None):
    """The warm-up length: as given, else a twentieth of the steps (at least one)."""
    return max(1, num_steps // 20) if warmup_steps is None else warmup_steps


def scale_updates_by_path(scale_of: Callable[[str], float]) -> optax.GradientTransformation:
    """Each update times `scale_of` its parameter's path: learning rates per group of parameters on one schedule
    (weight decay scales with them, as it does with the lr in AdamW). No state."""
    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(lambda k, u: u * scale_of(param_path(k)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(lr, min_lr, warmup_steps, total_steps, weight_decay, clip_norm, grad_accum, schedule="cosine",
                   scale_of: Callable[[str], float] | None = None):
    """AdamW with clipping, the schedule and accumulation, for the trained parameters only (frozen ones are not in
    the tree it sees: they have no optimizer state, and clipping and weight decay never see them). `scale_of`: a
    parameter path's multiplier of the learning rate (see `scale_updates_by_path`)."""
    schedule = lr_schedule(schedule, lr, min_lr, warmup_steps, total_steps)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    if scale_of is not None:
        tx = optax.chain(tx, scale_updates_by_path(scale_of))
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx, schedule
