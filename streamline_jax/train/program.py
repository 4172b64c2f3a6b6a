"""What a training run compiles (`TrainingProgram`: loss, optimizer, jitted steps, abstract sharded arguments), built
from `TrainOptions` by one builder, `build_program`, which both `train_replacement` and the planner (plan.py) call: a
memory plan is for the program the run executes."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ..backend import jit_for
from ..models import transformer
from ..models.config import ModelConfig
from ..sharding import batch_sharding, param_shardings
from .losses import LOSSES, Distillation, cached_mse_loss, dense_params_read
from .optimizer import make_optimizer, warmup_steps_for
from .options import TrainOptions
from .params import Block, split_params, trained_paths


def distillation_settings(dense_config: ModelConfig, pruned_config: ModelConfig, block: Block, paths, temperature,
                          ce_weight, hidden_layers, hidden_weight, hidden_every: int = 0,
                          top_k: int = 0) -> Distillation:
    """KD mode's settings, checked against the models (the options' own ranges: `TrainOptions.check`), with the
    (teacher, student) layer pairs of the hidden-state terms: the span's output, each of `hidden_layers`, and every
    `hidden_every`-th original layer after the span's output that the student still has (none where hidden_weight
    is 0). `top_k` > 0: the teacher's logits come as its top k (the cached loss reads them from the batch)."""
    from ..pruning import original_ranges

    if not temperature > 0:
        raise ValueError(f"kd_temperature must be positive, got {temperature}")
    if top_k and not top_k <= dense_config.vocab_size:
        raise ValueError(f"kd_top_k={top_k} must be at most the vocabulary's size ({dense_config.vocab_size})")
    if top_k and any(p.split("/")[0] in transformer.HEAD_KEYS for p in paths):
        raise ValueError(f"kd_top_k={top_k} needs a frozen head (the top-k loss makes no gradient for it): take "
                         f"{sorted(p for p in paths if p.split('/')[0] in transformer.HEAD_KEYS)} out of the trained "
                         f"parameters, or set kd_top_k=0")
    if not hidden_weight >= 0:
        raise ValueError(f"kd_hidden_weight must be >= 0, got {hidden_weight}")
    depth, end = dense_config.depth, block.start + block.length
    current = {span: i for i, span in enumerate(original_ranges(pruned_config))}  # original [lo, hi) -> layer
    pairs = {(end - 1, current[(block.start, end)])} if hidden_weight else set()
    for h in hidden_layers:
        if not isinstance(h, numbers.Integral):
            raise ValueError(f"kd_hidden_layers must be layer numbers, got {h!r}")
        layer = int(h) + depth if h < 0 else int(h)
        if not end - 1 <= layer < depth:
            raise ValueError(f"kd_hidden_layers: layer {h} is not after the span [{block.start}, {end}) of the "
                             f"{depth}-layer model (the span's output is matched anyway)")
        if layer >= end and (layer, layer + 1) not in current:
            raise ValueError(f"kd_hidden_layers: layer {h} was pruned; the student has no copy of it")
        pairs.add((layer, current[(block.start, end)] if layer == end - 1 else current[(layer, layer + 1)]))
    if not (isinstance(hidden_every, numbers.Integral) and hidden_every >= 0):
        raise ValueError(f"kd_hidden_every must be a whole number of layers >= 0, got {hidden_every!r}")
    if hidden_weight and hidden_every:  # a layer that another span pruned has no copy to match: skipped
        pairs |= {(layer, current[(layer, layer + 1)]) for layer in range(end - 1 + hidden_every, depth, hidden_every)
                  if (layer, layer + 1) in current}
    index = transformer.segment_index(block.key)
    before = pruned_config.layout[:index]
    prefix = {f"segments/{transformer.segment_key(i)}" for i in range(index)} | set(transformer.EMBED_KEYS)
    trained_prefix = any(p.split("/")[0] in prefix or "/".join(p.split("/")[:2]) in prefix for p in paths)
    shared = (all(seg.kind == "layers" for seg in before) and sum(seg.num_layers for seg in before) == block.start
              and not trained_prefix)
    return Distillation(float(temperature), float(ce_weight), float(hidden_weight), tuple(sorted(pairs)), shared,
                        int(top_k))


def make_steps(loss_fn, tx, compute_dtype=jnp.float32, *, out_shardings=None, platform=None):
    """Jitted (train_step, eval_step) for `loss_fn`, compiled for `compute_dtype` dot products on `platform`
    (default: this backend). The train step donates the trained parameters and the optimizer state (arguments 0 and
    1): the new values take their buffers, so a step holds one copy of each, not two. `out_shardings`: the train
    step's (trained, opt_state, loss) shardings, or None to let XLA choose."""
    def train_step(trained, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss

    def eval_step(trained, frozen, batch):
        mask = batch["attention_mask"]
        return loss_fn(trained, frozen, batch), jnp.sum(mask)

    return (jit_for(compute_dtype, train_step, platform, donate_argnums=(0, 1), out_shardings=out_shardings),
            jit_for(compute_dtype, eval_step, platform))


@dataclasses.dataclass(frozen=True)
class TrainingProgram:
    """What a training run compiles: its loss, optax chain and jitted steps, with the shardings of the step's
    arguments on the mesh. `train_replacement` runs it and plan.py compiles it ahead of time: one builder
    (`training_program`), so a memory plan is for the program the run executes."""

    loss_name: str  # a key of LOSSES
    loss_fn: Callable  # (trained, frozen, batch) -> loss
    tx: optax.GradientTransformation
    schedule: Callable  # step -> learning rate
    train_step: Callable  # jitted (trained, opt_state, frozen, batch) -> (trained, opt_state, loss); donates 0 and 1
    eval_step: Callable  # jitted (trained, frozen, batch) -> (loss, tokens)
    arguments: tuple  # (trained, opt_state, frozen) as ShapeDtypeStructs carrying their shardings (None: no mesh)
    paths: tuple = ()  # the trained parameters' paths


def training_program(dense_config: ModelConfig, pruned_config: ModelConfig, block: Block, paths, loss_name: str, *,
                     lr, min_lr, warmup_steps, num_steps, weight_decay, clip_norm, grad_accum, lr_schedule="cosine",
                     kd: Distillation | None = None, mse_weighting="uniform", remat="none", mesh=None,
                     platform=None, lr_beyond_block=None) -> TrainingProgram:
    """The training program for one block: `paths` are the trained parameters (`trained_paths`), `remat` a
    `transformer.remat_policy` name for the layers the gradient runs through, `mesh` the mesh the step's arguments
    live on (None: one device), `platform` the one it compiles for (default: this backend), `lr_beyond_block` the
    peak lr of the trained parameters outside the block (None: lr)."""
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; expected one of {list(LOSSES)}")
    extra = {"weighting": mse_weighting} if loss_name != "lm" else {}
    loss_fn = bind_loss(LOSSES[loss_name], dense_config=dense_config, pruned_config=pruned_config, block=block,
                       remat=remat, **extra, **({"kd": kd, "mesh": mesh} if loss_name.startswith("kd") else {}))
    scale_of = None
    if lr_beyond_block is not None and lr_beyond_block != lr:
        in_block, beyond = f"segments/{block.key}/", lr_beyond_block / lr

        def scale_of(path):
            return 1.0 if path.startswith(in_block) else beyond
    tx, schedule = make_optimizer(lr, min_lr, warmup_steps, num_steps, weight_decay, clip_norm, grad_accum,
                                  lr_schedule, scale_of)
    arguments = abstract_step_arguments(dense_config, pruned_config, block, paths, loss_name, tx, mesh)
    out_shardings = None
    if mesh is not None:
        trained, opt_state, _ = jax.tree.map(lambda a: a.sharding, arguments)
        out_shardings = (trained, opt_state, NamedSharding(mesh, P()))
    train_step, eval_step = make_steps(loss_fn, tx, transformer.compute_dtype(pruned_config),
                                       out_shardings=out_shardings, platform=platform)
    return TrainingProgram(loss_name, loss_fn, tx, schedule, train_step, eval_step, arguments, tuple(sorted(paths)))


def build_program(options: TrainOptions, dense_config: ModelConfig, pruned_config: ModelConfig, block: Block,
                  num_steps: int, *, loss_name: str | None = None, params=None, remat: str = "none", mesh=None,
                  platform=None) -> TrainingProgram:
    """The training program `options` give for `block` over `num_steps` optimizer steps: the one mapping from
    options to program, for `train_replacement` and the planner. `loss_name`: a key of LOSSES (default: the options'
    mode); `params`: the pruned model's parameters whose paths `trainable` and `freeze` select (default: its abstract
    ones); `remat`, `mesh`, `platform`: see `training_program`."""
    options.check()
    loss_name = loss_name or options.mode
    if params is None:
        params = transformer.abstract_params(pruned_config)
    paths = trained_paths(params, block, options.trainable, options.freeze)
    kd = None
    if loss_name.startswith("kd"):
        kd = distillation_settings(dense_config, pruned_config, block, paths, options.kd_temperature,
                                   options.kd_ce_weight, options.kd_hidden_layers, options.kd_hidden_weight,
                                   options.kd_hidden_every, options.kd_top_k if loss_name == "kd_cached" else 0)
    return training_program(
        dense_config, pruned_config, block, paths, loss_name, lr=options.lr, min_lr=options.min_lr,
        warmup_steps=warmup_steps_for(num_steps, options.warmup_steps), num_steps=num_steps,
        weight_decay=options.weight_decay, clip_norm=options.clip_norm, grad_accum=options.grad_accum,
        lr_schedule=options.lr_schedule, kd=kd, mse_weighting=options.mse_weighting, remat=remat, mesh=mesh,
        platform=platform, lr_beyond_block=options.lr_beyond_block)


def cached_mse_eval_step(program: TrainingProgram, dense_config: ModelConfig, pruned_config: ModelConfig,
                         block: Block, weighting: str):
    """`program`'s eval step on (input, target) span pairs instead of token batches: MSE validation from pairs
    computed once."""
    loss = bind_loss(cached_mse_loss, dense_config=dense_config, pruned_config=pruned_config, block=block,
                     weighting=weighting)
    return make_steps(loss, program.tx, transformer.compute_dtype(pruned_config))[1]


def abstract_step_arguments(dense_config: ModelConfig, pruned_config: ModelConfig, block: Block, paths,
                            loss_name: str, tx, mesh=None):
    """(trained, opt_state, frozen) of the train step as ShapeDtypeStructs: float32 master weights for the
    parameters in `paths`, the optimizer state for those only, the rest of the pruned model (and what the loss
    reads of the dense model: `dense_params_read`) as they are; on `mesh`, each with its logical-axis sharding
    (optimizer state like its parameter, its counters replicated)."""
    def model(config):
        abstract = transformer.abstract_params(config)
        if mesh is None:
            return abstract
        shardings = param_shardings(abstract, transformer.param_axes(config), mesh)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    paths = set(paths)
    trained, frozen_pruned = split_params(model(pruned_config), paths.__contains__)
    trained = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), trained)
    frozen = {"pruned": frozen_pruned}
    dense = dense_params_read(loss_name, dense_config, model(dense_config), block)
    if dense is not None:
        frozen["dense"] = dense
    opt_state = jax.eval_shape(tx.init, trained)
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        shardings = optax.tree_map_params(tx, lambda _, a: a.sharding, opt_state, trained,
                                          transform_non_params=lambda _: replicated)
        opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_state, shardings)
    return trained, opt_state, frozen


def abstract_batch(batch_size: int, seq_len: int, mesh=None) -> dict:
    """The train step's token batch as ShapeDtypeStructs, sharded as `_as_batch` places it."""
    sharding = None if mesh is None else batch_sharding(mesh, 2, batch_size)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
            for k in ("input_ids", "attention_mask")}


def bind_loss(fn, **kwargs):
    def bound(block_params, frozen, batch):
        return fn(block_params, frozen, batch, **kwargs)
    return bound
