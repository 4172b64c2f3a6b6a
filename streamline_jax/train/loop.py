"""The training loop and `train_replacement`, the train stage's public function."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ..files import write_atomic
from ..host_memory import release_host_memory
from ..interrupts import deferred_interrupts
from ..models.model import Model, with_compute_dtype
from ..sharding import place_batch
from ..data import progress_bar, reiterable
from .checkpoints import Checkpoints, LoopState, TrainingError
from .losses import TOP_K_ARRAYS, dense_params_read, span_pairs_fn
from .offload import offloaded
from .options import TrainOptions
from .params import Block, chosen_block, merge_params, split_params
from .program import TrainingProgram, build_program, cached_mse_eval_step
from .span_cache import SpanPairCache, TeacherTopKCache


def _placed(tree, abstract):
    """`tree` on the shardings of its abstract twin, or committed to the default device where it has none: the step
    is compiled for those, and its outputs, which the next step takes, are committed (uncommitted inputs to the
    first step compiled it a second time)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a, s: jax.device_put(a, s.sharding or device), tree, abstract)


def _kept(tree):
    """A copy the train step does not donate (it donates the trained parameters it is given)."""
    return jax.tree.map(jnp.copy, tree)


def _as_batch(batch, mesh):
    if "x_in" in batch:  # cached span pairs
        out = {"x_in": jnp.asarray(batch["x_in"]), "target": jnp.asarray(batch["target"]),
               "attention_mask": jnp.asarray(batch["attention_mask"], jnp.int32)}
        if "input_ids" in batch:  # KD's (the MSE validation pairs kept in memory have none)
            out["input_ids"] = jnp.asarray(batch["input_ids"], jnp.int32)
        out |= {k: jnp.asarray(batch[k]) for k in TOP_K_ARRAYS if k in batch}  # the teacher's top k (kd_top_k)
    else:
        ids = np.asarray(batch["input_ids"])
        out = {"input_ids": jnp.asarray(ids, jnp.int32),
               "attention_mask": jnp.asarray(np.asarray(batch.get("attention_mask", np.ones_like(ids))), jnp.int32)}
    return place_batch(mesh, out)


# Validation pairs up to this size are computed once and kept (on the device, sharded like the batch): every later
# validation pass then runs only the block instead of the frozen prefix and span again.
VALID_PAIRS_BYTES = 1 << 30


def _validation_pairs(dense_model: Model, block: Block, batches: list, mesh) -> list[dict] | None:
    """The validation batches as (input, target) span pairs, or None where they would exceed VALID_PAIRS_BYTES."""
    first = np.asarray(batches[0]["input_ids"])
    if 2 * len(batches) * first.size * dense_model.config.hidden_size * 4 > VALID_PAIRS_BYTES:
        return None
    span_io = span_pairs_fn(dense_model.config, block.start, block.length)
    pairs = []
    for batch in batches:
        batch = _as_batch(batch, mesh)
        x_in, target = span_io(dense_model.params, batch["input_ids"], batch["attention_mask"])
        pairs.append({"x_in": x_in, "target": target, "attention_mask": batch["attention_mask"]})
    return pairs


def _evaluate(eval_step, block_params, frozen, batches, mesh):
    """The mean loss over real tokens; every batch is dispatched before the first result is read."""
    results = jax.device_get([eval_step(block_params, frozen, _as_batch(batch, mesh)) for batch in batches])
    total, weight = 0.0, 0.0
    for loss, n in results:
        total += float(loss) * float(n)
        weight += float(n)
    return total / max(weight, 1.0)


def _validate(state: "LoopState", step, eval_step, frozen, valid, mesh):
    """Validate the trained parameters at `step`; keep them as the best if their loss is the lowest yet."""
    loss = _evaluate(eval_step, state.trained, frozen, valid, mesh)
    history = state.history
    history["valid"].append((step, loss))
    if history["best_valid"] is None or loss < history["best_valid"]:
        history["best_valid"], history["best_step"] = loss, step
        state.best = _kept(state.trained)  # the next step donates state.trained


class _LossLog:
    """The training losses, held on the device until a logging point: every `log_every` steps, and before each
    validation, checkpoint, interrupt and the end. Reading each micro-step's loss as it comes would make the host
    wait for the device at every step with nothing queued behind it; held, the host prepares and dispatches the
    next batches while the device runs. At a logging point every held loss is read at once: each step's goes into
    the history (with its learning rate) and to `on_step`, and a non-finite one stops the run naming its step."""

    def __init__(self, history, schedule, grad_accum, mode, on_step, bar, tokens_per_batch, micro):
        self.history, self.schedule, self.grad_accum, self.mode = history, schedule, grad_accum, mode
        self.on_step, self.bar, self.tokens_per_batch = on_step, bar, tokens_per_batch
        self.start_time, self.start_micro = time.perf_counter(), micro
        self.held = []  # (batches consumed, the last batch's loss on the device)

    def add(self, micro, loss):
        self.held.append((micro, loss))

    def flush(self, where):
        """Read every held loss; `where()` says where the last good checkpoint is (for a non-finite loss's error)."""
        held, self.held = self.held, []
        if not held:
            return
        losses = [float(loss) for loss in jax.device_get([loss for _, loss in held])]
        ends = [micro // self.grad_accum for micro, _ in held if micro % self.grad_accum == 0]
        lrs = iter(float(lr) for lr in jax.device_get([self.schedule(step - 1) for step in ends]))
        for (micro, _), loss in zip(held, losses):
            if not math.isfinite(loss):
                raise TrainingError(f"{self.mode} loss is {loss} at step {(micro - 1) // self.grad_accum + 1} "
                                    f"(batch {micro}); {where()}")
            if micro % self.grad_accum == 0:
                step = micro // self.grad_accum
                self.history["train"].append((step, loss, next(lrs)))
                if self.on_step is not None:
                    self.on_step(step, loss)
        if self.bar is not None and ends:
            elapsed = time.perf_counter() - self.start_time
            self.bar.update(len(ends))
            self.bar.set_postfix(loss=f"{self.history['train'][-1][1]:.4g}",
                                 tok_s=f"{(held[-1][0] - self.start_micro) * self.tokens_per_batch / elapsed:.0f}")


@dataclasses.dataclass
class _TrainingData:
    """The re-iterable training and validation batches, and how many optimizer steps they give."""

    train: object
    valid: object | None
    first: dict  # the first training batch
    batches_per_epoch: int
    total_batches: int  # over every epoch
    num_steps: int
    shuffle_seed: int | None  # None: in order

    def batches_from(self, position):
        """The training batches from batch `position` (counted over epochs) to the last, each epoch in its order."""
        epochs = (self.train.epoch(e, self.shuffle_seed) if self.shuffle_seed is not None else iter(self.train)
                  for e in itertools.count())
        return itertools.islice(itertools.chain.from_iterable(epochs), position, self.total_batches)


def _training_data(train_batches, valid_batches, batch_size, options: TrainOptions, pair_cache) -> _TrainingData:
    train_batches = reiterable(train_batches, batch_size, "training")
    if valid_batches is not None:
        valid_batches = reiterable(valid_batches, batch_size, "validation", pad_last=True)
    if options.shuffle and pair_cache is None and not hasattr(train_batches, "epoch"):
        raise ValueError("shuffle=True needs the training data as a sequence (a list of batches, or of chunks with "
                         "batch_size), or a pair_cache; a callable stream cannot be permuted")
    first = next(iter(train_batches), None)
    if first is None:
        raise ValueError("no training data: the training batches are empty")
    batches_per_epoch = sum(1 for _ in train_batches)
    num_steps = options.steps_for(batches_per_epoch)
    return _TrainingData(train_batches, valid_batches, first, batches_per_epoch, batches_per_epoch * options.epochs,
                         num_steps, options.seed if options.shuffle else None)


def _read_from_pair_cache(data: _TrainingData, pair_cache, dense_model: Model, block: Block, progress,
                          top_k: tuple | None = None, grad_accum: int = 1, reuse_pairs=None) -> None:
    """Switch `data` to the span's (input, target) pairs in tensorstore arrays at `pair_cache` (built first unless a
    finished cache of the same span and size is there, copying the rows that the one at `reuse_pairs` holds);
    validation's go in its `valid` folder. `top_k`: (k, temperature): the teacher's top k too, in a
    `TeacherTopKCache` beside each (built once, likewise; for training, of the rows its `grad_accum` x num_steps
    batches read)."""
    def reusable(sub=""):
        return [] if reuse_pairs is None else [SpanPairCache(Path(reuse_pairs) / sub, block.start, block.length)]

    rows = data.batches_per_epoch * len(np.asarray(data.first["input_ids"]))
    cache = SpanPairCache(pair_cache, block.start, block.length)
    if not cache.complete(rows):
        cache.build(dense_model, data.train, progress, reuse=reusable())
    reads = min(data.num_steps * grad_accum, data.total_batches)  # a short distillation reads only some rows
    rows = cache.rows_read(reads, data.shuffle_seed) if top_k and reads < data.batches_per_epoch else None
    data.train = cache.batches(teacher=_teacher_top_k(cache, dense_model, top_k, progress, rows))
    if data.valid is not None:
        valid_rows = sum(len(np.asarray(b["input_ids"])) for b in data.valid)
        valid_cache = SpanPairCache(Path(pair_cache) / "valid", block.start, block.length)
        if not valid_cache.complete(valid_rows):
            valid_cache.build(dense_model, data.valid, progress=False, reuse=reusable("valid"))
        data.valid = valid_cache.batches(teacher=_teacher_top_k(valid_cache, dense_model, top_k, False))


def _teacher_top_k(pairs: SpanPairCache, dense_model: Model, top_k, progress, rows=None) -> TeacherTopKCache | None:
    """The finished teacher's top-k cache beside `pairs` for `rows` (None: all; built unless there), or None without
    `top_k`."""
    if top_k is None:
        return None
    teacher = TeacherTopKCache(pairs, *top_k, rows)
    if not teacher.complete():
        teacher.build(dense_model, progress)
    return teacher


def _train_loop(state: LoopState, data: _TrainingData, train_step, eval_step, frozen, valid, mesh, log: _LossLog,
                checkpoints: Checkpoints, *, grad_accum, eval_every, checkpoint_every, log_every,
                checkpoint_minutes=None):
    """Optimizer steps from `state` to the last, validating, checkpointing (every `checkpoint_every` steps, at the
    first step `checkpoint_minutes` after the last checkpoint, and at the last) and logging on the way."""
    num_steps = data.num_steps
    step = state.micro // grad_accum
    saved_at = time.perf_counter()
    # Ctrl-C stops only between steps, after a checkpoint of that step: whatever the moment it comes, the checkpoint
    # is one consistent (step, data position, block, optimizer state, history) and a resume ends bitwise as an
    # uninterrupted run would.
    with deferred_interrupts() as interrupt:
        for batch in data.batches_from(state.micro):
            _loop_point("batch")
            if step >= num_steps:
                break
            state.trained, state.opt_state, loss = train_step(state.trained, state.opt_state, frozen,
                                                              _as_batch(batch, mesh))
            _loop_point("stepped")
            state.micro += 1
            log.add(state.micro, loss)
            if state.micro % grad_accum:
                continue
            step += 1
            _loop_point("logged")
            last = step == num_steps
            validate = valid is not None and (step % eval_every == 0 or last)
            due = checkpoint_minutes is not None and time.perf_counter() - saved_at >= 60 * checkpoint_minutes
            save = checkpoints.manager is not None and (step % checkpoint_every == 0 or last or due)
            if validate or save or last or interrupt.pending or step % log_every == 0:
                log.flush(checkpoints.where)  # a checkpoint never holds a step past a non-finite loss
            if validate:
                _validate(state, step, eval_step, frozen, valid, mesh)
                _loop_point("validated")
            elif valid is None:
                state.best = state.trained
            if save:
                checkpoints.save(step, state)
                saved_at = time.perf_counter()
                _loop_point("saved")
            if interrupt.pending:
                checkpoints.save(step, state)
                break  # the guard raises KeyboardInterrupt
        log.flush(checkpoints.where)


def train_replacement(dense_model: Model, pruned_model: Model, train_batches: Iterable[dict],
                      options: TrainOptions | None = None, *, valid_batches: Iterable[dict] | None = None,
                      checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                      block_key: str | None = None, on_step=None, batch_size: int | None = None,
                      pair_cache: str | Path | None = None, remat: str = "none", return_history: bool = False,
                      offload_span: str | Path | None = None, reuse_pairs: str | Path | None = None,
                      **option_changes):
    """Train the pruned model's replacement block (or the `trainable` parameters); return the pruned model with the
    trained (best) parameters. The training options are `options` (a TrainOptions; default: its defaults) with
    `option_changes` (TrainOptions fields by name, e.g. lr=1e-3) over them.

    `train_batches` / `valid_batches`: re-iterable collections of {"input_ids", "attention_mask"} [B, T] arrays
    (e.g. a list, or `data.batches` over a chunk source), read in order; one epoch is one pass. With
    `return_history`, also return {"train": [(step, loss, lr)], "valid": [(step, loss)], "best_step", "wall_s"}.
    `log_every`: the losses stay on the device and are read every this many steps (and before each validation,
    checkpoint and the end), so that the host never waits for the device between steps; then every step's loss goes
    into the history and to `on_step(step, loss)`, called once per optimizer step in order, and the progress bar
    moves. A non-finite loss stops the run with a TrainingError naming the step it came at, at the next logging
    point (before any checkpoint of a later step); `log_every=1` reads each step's loss as it comes (the slowest).
    With `batch_size`, the data are token chunks ([T] arrays, or a callable returning a fresh iterator of them) that
    are batched here. With `pair_cache` (modes mse and kd), the dense span's (input, target) pairs are computed once
    into tensorstore arrays at that path (or reused if a finished cache for the same span is there) and every epoch
    reads them from disk (rows that a finished cache of the same span at `reuse_pairs` holds, such as the MSE
    phase's for the distillation, are copied from it, its `valid` folder's likewise); in KD mode the teacher then
    runs from the span's output and a student whose prefix is the teacher's from its input; with `kd_top_k` > 0 as
    well, the teacher's top k log-probabilities and its tail's mass are computed once per cached row (a
    `TeacherTopKCache` inside `pair_cache`, reused likewise; a repeated row copied) and the KL is taken over them
    (`top_k_distillation_loss`): the teacher's layers after the span and its head no longer run at every step,
    except the layers the hidden-state terms need. With `offload_span` as well, the dense model's own layers
    that the cached steps do not read (the span's; see `offload.offloaded`) are written to that folder and freed
    while the steps run, then read back into `dense_model.params` in place.
    `mse_weighting="token"` makes the MSE relative per token (see `masked_mse`). `shuffle`: each epoch reads the
    training chunks (with `batch_size`), the batches of a list, or the cached rows in a fresh permutation drawn from
    `seed`; validation keeps its order. Validation chunks are never dropped: a short last batch is padded with
    masked rows. `lr_schedule`: "cosine" or "cosine-cycle" (see `lr_schedule`). `freeze`: regexes over the block's
    parameter paths (e.g. ("self_attn", "input_layernorm")) whose parameters stay as initialised. `trainable`:
    regexes matched in full over the pruned model's parameter paths ("segments/seg_2/.*mlp.*", "lm_head/.*"; `block`
    stands for the block's, `before_block` / `after_block` for the decoder layers on either side), whole leaves
    only (a stacked segment's layers train together); see `trained_paths`.
    MSE mode trains the block only. Everything else stays bitwise as it was, and has no optimizer state.
    `lr_beyond_block`: the peak lr of the trained parameters outside the block, on the same schedule (None: lr).

    `mode="kd"`: (1 - kd_ce_weight) x kd_temperature^2 x KL(teacher || student) at temperature kd_temperature over
    real tokens, + kd_ce_weight x the next-token cross-entropy, + kd_hidden_weight x the mean MSE (`mse_weighting`)
    between the teacher's and the student's hidden states leaving the span and leaving each original layer in
    `kd_hidden_layers` (after the span; negative numbers count from the last layer) and every `kd_hidden_every`-th
    original layer after the span's output (those another span pruned skipped).
    `remat`: a `transformer.remat_policy` name for the layers the gradient runs through (the run takes it from its
    stage layout in configs/meshes.yaml). The train step donates the trained parameters and the optimizer state.
    """
    options = (options or TrainOptions()).replace(**option_changes)
    options.check()
    if not dense_model.config.is_dense:
        raise ValueError("dense_model must be the unpruned model (its layers are the MSE teacher)")
    if pair_cache is not None and options.mode == "lm":
        raise ValueError("pair_cache is for modes 'mse' and 'kd' (the LM loss runs no dense span)")
    top_k = (options.kd_top_k, options.kd_temperature) if options.mode == "kd" and options.kd_top_k else None
    if top_k and pair_cache is None:
        raise ValueError(f"kd_top_k={options.kd_top_k} needs a pair_cache (train.pair_cache=true): the teacher's top "
                         f"k are cached beside the span's pairs")
    block = chosen_block(pruned_model.config, block_key)
    data = _training_data(train_batches, valid_batches, batch_size, options, pair_cache)
    result_config = pruned_model.config
    if options.compute_dtype is not None:  # the products' input dtype for this training only (else the models')
        dense_model = with_compute_dtype(dense_model, options.compute_dtype)
        pruned_model = with_compute_dtype(pruned_model, options.compute_dtype)
    loss_name = options.mode if pair_cache is None else f"{options.mode}_cached"
    program = build_program(options, dense_model.config, pruned_model.config, block, data.num_steps,
                            loss_name=loss_name, params=pruned_model.params, remat=remat, mesh=pruned_model.mesh)
    checkpoints = Checkpoints(checkpoint_dir, resume, state=program.arguments[:2])
    if pair_cache is not None and not (resume and (checkpoints.last_good or 0) >= data.num_steps):
        _read_from_pair_cache(data, pair_cache, dense_model, block, progress, top_k, options.grad_accum,
                              reuse_pairs)  # a finished training reads no pairs
    offload = offload_span if pair_cache is not None and options.mode in ("mse", "kd") else None
    with offloaded(dense_model, pruned_model, block.start + block.length, offload) as moved:
        best, frozen_params, history = _run_program(program, dense_model, pruned_model, block, data, checkpoints,
                                                    options, on_step=on_step, progress=progress)
    if moved is not None:  # what the report says training held
        history["offloaded"] = moved
    release_host_memory()  # the optimizer state, gradients and step buffers, before the next phase allocates
    trained = pruned_model.replace(config=result_config, params=merge_params(best, frozen_params))
    if top_k:  # what the run's report says the distillation read
        history["teacher"] = {"top_k": top_k[0], "temperature": top_k[1], "cache": str(
            TeacherTopKCache(SpanPairCache(pair_cache, block.start, block.length), *top_k).path)}
    if checkpoint_dir:
        write_atomic(Path(checkpoint_dir) / "loss_curve.json", json.dumps(history, indent=1))
    return (trained, history) if return_history else trained


def _run_program(program: TrainingProgram, dense_model: Model, pruned_model: Model, block: Block,
                 data: _TrainingData, checkpoints: Checkpoints, options: TrainOptions, *, on_step, progress):
    """Run `program` from the pruned model's parameters, or from the checkpoint it resumes: (the best trained
    parameters in their own dtypes, the frozen ones, the history)."""
    initial, frozen_params = split_params(pruned_model.params, set(program.paths).__contains__)
    # float32 master weights for what trains, whatever the compute dtype (a copy: the train step donates it)
    trained = _placed(jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), initial), program.arguments[0])
    frozen = {"pruned": frozen_params}
    dense = dense_params_read(program.loss_name, dense_model.config, dense_model.params, block)
    if dense is not None:
        frozen["dense"] = dense
    mesh, grad_accum, num_steps = pruned_model.mesh, options.grad_accum, data.num_steps
    eval_step, valid = program.eval_step, list(data.valid) if data.valid is not None else None
    if valid and program.loss_name == "mse":  # the frozen span's validation pairs once, not on every pass
        pairs = _validation_pairs(dense_model, block, valid, mesh)
        if pairs is not None:
            valid = pairs
            eval_step = cached_mse_eval_step(program, dense_model.config, pruned_model.config, block,
                                             options.mse_weighting)
    # the best parameters are a copy (the train step donates the trained ones); without validation they are the
    # trained ones, set after each step: a copy would hold a second float32 block through the first step
    best = _kept(trained) if valid is not None else trained
    state = LoopState(trained, _placed(program.tx.init(trained), program.arguments[1]), best)
    checkpoints.restore(state)
    first = data.first
    tokens_per_batch = int(np.sum(np.asarray(first.get("attention_mask", np.ones_like(first["input_ids"])))))
    bar = progress_bar(progress, num_steps, state.micro // grad_accum)
    log = _LossLog(state.history, program.schedule, grad_accum, options.mode, on_step, bar, tokens_per_batch,
                   state.micro)
    start_time = time.perf_counter()
    if valid is not None and not state.history["valid"] and state.micro // grad_accum == 0:
        _validate(state, 0, eval_step, frozen, valid, mesh)
    eval_every = options.eval_every or max(1, num_steps // 5)
    try:
        _train_loop(state, data, program.train_step, eval_step, frozen, valid, mesh, log, checkpoints,
                    grad_accum=grad_accum, eval_every=eval_every,
                    checkpoint_every=options.checkpoint_every or eval_every, log_every=options.log_every,
                    checkpoint_minutes=options.checkpoint_minutes)
    finally:
        if bar is not None:
            bar.close()
    state.history["wall_s"] += time.perf_counter() - start_time
    best = state.trained if valid is None else state.best
    return jax.tree.map(lambda a, like: a.astype(like.dtype), best, initial), frozen_params, state.history


# Tests set this to a function of a point name ("batch", "stepped", "logged": a step counted, "validated", "saved")
# to interrupt the training loop exactly there.
LOOP_HOOK = None


def _loop_point(name):
    if LOOP_HOOK is not None:
        LOOP_HOOK(name)
