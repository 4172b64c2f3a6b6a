"""Stage 4, train: fit the replacement block with optax while everything else stays frozen.

MSE mode (the paper's): the block's input is the frozen dense model's hidden state entering the pruned span, its
target the state leaving it; both are computed inside the jitted step (no gradient through the frozen layers), so
host memory does not grow with the number of training samples. LM mode: next-token cross-entropy of the whole pruned
model, with gradients only for the block. A trained `layer` block uses the same causal mask as at inference.

Training state (block params, optimizer state, step, data position, best block, history) is checkpointed with
Orbax every `checkpoint_every` steps, and at the step a Ctrl-C stops (it waits for the step under way: see
interrupts.py); `resume=True` continues from the latest checkpoint and ends with the same parameters as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .backend import jit_for
from .data import batches as batch_chunks, pad_rows
from .interrupts import deferred_interrupts
from .models import transformer
from .models.config import ModelConfig, Segment
from .models.model import Model, with_compute_dtype
from .sharding import shard_batch

MODES = ("mse", "lm")


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Block:
    """The one replacement block being trained: its segment key in the pruned model, and the dense span it replaces."""

    key: str
    segment: Segment
    start: int  # first original layer of the span
    length: int
    layer: int = 0  # its index in the pruned stack (where `layer_types` has its attention type)


def trainable_blocks(pruned: ModelConfig) -> list[Block]:
    from .pruning import original_ranges

    ranges = original_ranges(pruned)
    blocks, layer = [], 0
    for i, seg in enumerate(pruned.layout):
        if seg.kind != "layers":
            lo, hi = ranges[layer]
            blocks.append(Block(f"seg_{i}", seg, lo, hi - lo, layer))
        layer += seg.num_layers
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Losses


def _dense_span_io(config: ModelConfig, params, input_ids, mask, start, length):
    """The dense model's hidden states entering layer `start` and leaving layer `start+length-1` (no gradient)."""
    stack = params["segments"]["seg_0"]
    b, t = input_ids.shape
    positions = transformer.default_positions(mask)
    attn = transformer.attention_mask_matrix(mask, jnp.arange(t)[None], config.sliding_window)
    x = transformer.embed(config, params, input_ids, positions)

    def run(x, lo, hi):
        if hi <= lo:
            return x
        sliced = jax.tree.map(lambda a: a[lo:hi], stack)
        out, _, _ = transformer.run_segment(config, Segment("layers", hi - lo), sliced, x, attn, positions,
                                            first_layer=lo)
        return out

    x_in = run(x, 0, start)
    target = run(x_in, start, start + length)
    return jax.lax.stop_gradient(x_in), jax.lax.stop_gradient(target), attn, positions


def span_pairs_fn(config: ModelConfig, start, length):
    """A jitted (params, ids, mask) -> (input, target) in float32: the span's pairs for a pair cache or validation."""
    def span_io(params, ids, mask):
        x_in, target, _, _ = _dense_span_io(config, params, ids, mask, start, length)
        return x_in.astype(jnp.float32), target.astype(jnp.float32)

    return jit_for(transformer.compute_dtype(config), span_io)


MSE_WEIGHTINGS = ("uniform", "token")


def masked_mse(out, target, mask, weighting="uniform"):
    """Mean squared error over real tokens. `token` divides each token's error by its target's mean square (a
    relative error): in SmolLM2 the span's output at position 0 carries a massive activation (norm ~23,000 against
    ~200 elsewhere) that makes up ~98% of the plain MSE of a block that starts as the identity."""
    target = target.astype(jnp.float32)
    err = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=-1)
    if weighting == "token":
        err = err / (jnp.mean(jnp.square(target), axis=-1) + 1e-6)
    real = mask.astype(jnp.float32)
    return jnp.sum(err * real) / jnp.maximum(jnp.sum(real), 1.0)


def mse_loss(block_params, frozen, batch, *, dense_config, pruned_config, block: Block, weighting="uniform"):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    x_in, target, attn, positions = _dense_span_io(dense_config, frozen["dense"], ids, mask, block.start,
                                                   block.length)
    out, _, _ = transformer.run_segment(pruned_config, block.segment, block_params, x_in, attn, positions,
                                        first_layer=block.layer)
    return masked_mse(out, target, mask, weighting)


def lm_loss(block_params, frozen, batch, *, dense_config, pruned_config, block: Block):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    params = dict(frozen["pruned"])
    params["segments"] = dict(params["segments"])
    params["segments"][block.key] = block_params
    logits = transformer.apply(pruned_config, params, ids, mask)["logits"]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    real = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * real) / jnp.maximum(jnp.sum(real), 1.0)


def cached_mse_loss(block_params, frozen, batch, *, dense_config, pruned_config, block: Block, weighting="uniform"):
    """MSE on (input, target) pairs read from a `SpanPairCache` instead of recomputed by the frozen model."""
    mask = batch["attention_mask"]
    t = mask.shape[1]
    positions = transformer.default_positions(mask)
    attn = transformer.attention_mask_matrix(mask, jnp.arange(t)[None], pruned_config.sliding_window)
    out, _, _ = transformer.run_segment(pruned_config, block.segment, block_params, batch["x_in"], attn, positions,
                                        first_layer=block.layer)
    return masked_mse(out, batch["target"], mask, weighting)


LOSSES = {"mse": mse_loss, "lm": lm_loss, "mse_cached": cached_mse_loss}


# ----------------------------------------------------------------------------------------------------------------
# On-disk (input, target) pairs for several epochs or several blocks over the same span


class SpanPairCache:
    """The dense model's hidden states entering and leaving a span, for every training batch, in tensorstore arrays
    on disk ([N, T, D] each, plus the [N, T] mask). Written one batch at a time, so host memory stays at one batch;
    a `complete.json` written last marks a finished cache, which later runs reuse."""

    def __init__(self, path, start, length):
        self.path, self.start, self.length = Path(path), start, length

    def _spec(self, name):
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}

    def open(self, name):
        """One of the cache's arrays ("x_in", "target", "attention_mask") as an open TensorStore."""
        import tensorstore as ts

        return ts.open(self._spec(name)).result()

    def complete(self, rows: int | None = None) -> bool:
        """Whether a finished cache for this span (and, if given, this many rows) is there."""
        marker = self.path / "complete.json"
        if not marker.exists():
            return False
        meta = json.loads(marker.read_text())
        return (meta["start"], meta["length"]) == (self.start, self.length) and rows in (None, meta["rows"])

    def build(self, dense_model: Model, batches: Iterable[dict], progress=True):
        import tensorstore as ts

        if self.path.exists():
            import shutil

            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        config, params = dense_model.config, dense_model.params
        span_io = span_pairs_fn(config, self.start, self.length)
        batch_list = iter(batches)
        first = next(batch_list)
        b, t = np.asarray(first["input_ids"]).shape
        count = 1 + sum(1 for _ in batch_list)
        n, d = count * b, config.hidden_size
        arrays = {}
        for name, shape, dtype in (("x_in", (n, t, d), ts.float32), ("target", (n, t, d), ts.float32),
                                   ("attention_mask", (n, t), ts.int32)):
            chunk = [b, t, d][:len(shape)]
            arrays[name] = ts.open(self._spec(name), create=True, dtype=dtype, shape=shape,
                                   chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()
        bar = _progress(progress, count, 0, "cache span pairs", "batch")
        for i, batch in enumerate(batches):
            ids = np.asarray(batch["input_ids"], np.int32)
            mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
            ids, mask = pad_rows(ids, mask, b)  # a short last batch
            x_in, target = span_io(params, jnp.asarray(ids), jnp.asarray(mask))
            rows = slice(i * b, (i + 1) * b)
            writes = [arrays["x_in"][rows].write(np.asarray(x_in)), arrays["target"][rows].write(np.asarray(target)),
                      arrays["attention_mask"][rows].write(mask)]
            for w in writes:
                w.result()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        (self.path / "complete.json").write_text(json.dumps(
            {"start": self.start, "length": self.length, "rows": n, "batch": b, "seq": t}))

    def batches(self, batch_size=None):
        """Re-iterable batches {"x_in", "target", "attention_mask"} read from disk: rows in order, or in epoch e's
        permutation under a seed (`.epoch(e, shuffle_seed)`)."""
        cache = self

        class _Reader:
            def epoch(self, e, shuffle_seed=None):
                meta = json.loads((cache.path / "complete.json").read_text())
                b = batch_size or meta["batch"]
                arrays = {k: cache.open(k) for k in ("x_in", "target", "attention_mask")}
                order = _epoch_order(meta["rows"], shuffle_seed, e)
                for i in range(meta["rows"] // b):
                    rows = order[i * b:(i + 1) * b]
                    yield {k: a[rows].read().result() for k, a in arrays.items()}

            def __iter__(self):
                return self.epoch(0)

        return _Reader()


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and steps


LR_SCHEDULES = ("cosine", "cosine-cycle")


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


def make_optimizer(lr, min_lr, warmup_steps, total_steps, weight_decay, clip_norm, grad_accum, schedule="cosine",
                   labels=None):
    """AdamW with clipping, the schedule and accumulation. `labels` (a tree like the parameters, "train" or
    "frozen" per leaf) keeps the frozen leaves as they are: their updates are zeros that do not depend on the
    gradient, so jit drops their gradient computation, and clipping and weight decay see the trained leaves only."""
    schedule = lr_schedule(schedule, lr, min_lr, warmup_steps, total_steps)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    if labels is not None:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx, schedule


# What `freeze=("attention",)` stands for: the attention projections and the norm before them (Llama's
# input_layernorm; OPT's self_attn_layer_norm matches self_attn).
ATTENTION_HALF = ("self_attn", "input_layernorm")


def freeze_labels(block_params, freeze: Sequence[str]):
    """"train" / "frozen" for each of the block's parameters: frozen where a `freeze` regex matches its path
    ("self_attn/q_proj/kernel"). `attention` stands for the block's attention half, and for nothing in a block that
    has no attention (`ffn`, `mlp`), so one setting serves every replacement. None when nothing is frozen. Every
    other pattern must match, and something must train."""
    if isinstance(freeze, str):
        freeze = (freeze,)
    path_of = lambda key_path: jax.tree_util.keystr(key_path, simple=True, separator="/")  # noqa: E731
    paths = [path_of(k) for k, _ in jax.tree_util.tree_leaves_with_path(block_params)]
    freeze = [pattern for name in freeze for pattern in (
        [r for r in ATTENTION_HALF if any(re.search(r, p) for p in paths)] if name == "attention" else [name])]
    if not freeze:
        return None
    regexes = []
    for pattern in freeze:
        try:
            regexes.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"freeze pattern {pattern!r} is not a regular expression: {e}") from None
    for regex in regexes:
        if not any(regex.search(p) for p in paths):
            raise ValueError(f"freeze pattern {regex.pattern!r} matches none of the block's parameters: "
                             f"{sorted(paths)}")
    labels = jax.tree_util.tree_map_with_path(
        lambda k, _: "frozen" if any(r.search(path_of(k)) for r in regexes) else "train", block_params)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError(f"freeze {list(freeze)} freezes every parameter of the block; nothing would train")
    return labels


def make_steps(loss_fn, tx, compute_dtype=jnp.float32):
    """Jitted (train_step, eval_step) for `loss_fn`, compiled for `compute_dtype` dot products."""
    def train_step(block_params, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(block_params, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, block_params)
        return optax.apply_updates(block_params, updates), opt_state, loss

    def eval_step(block_params, frozen, batch):
        mask = batch["attention_mask"]
        return loss_fn(block_params, frozen, batch), jnp.sum(mask)

    return jit_for(compute_dtype, train_step), jit_for(compute_dtype, eval_step)


def _as_batch(batch, mesh):
    if "x_in" in batch:  # cached span pairs
        out = {"x_in": jnp.asarray(batch["x_in"]), "target": jnp.asarray(batch["target"]),
               "attention_mask": jnp.asarray(batch["attention_mask"], jnp.int32)}
    else:
        ids = np.asarray(batch["input_ids"])
        out = {"input_ids": jnp.asarray(ids, jnp.int32),
               "attention_mask": jnp.asarray(np.asarray(batch.get("attention_mask", np.ones_like(ids))), jnp.int32)}
    if mesh is not None:
        out = dict(zip(out, shard_batch(mesh, tuple(out.values()))))
    return out


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
    total, weight = 0.0, 0.0
    for batch in batches:
        loss, n = eval_step(block_params, frozen, _as_batch(batch, mesh))
        total += float(loss) * float(n)
        weight += float(n)
    return total / max(weight, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_manager(directory, keep=2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def _save(manager, step, state, history):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               history=ocp.args.JsonSave(history)))
    manager.wait_until_finished()


def _restore(manager, target):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        history=ocp.args.JsonRestore()))
    return out["state"], out["history"]


# ----------------------------------------------------------------------------------------------------------------
# Public API


def train_replacement(dense_model: Model, pruned_model: Model, train_batches: Iterable[dict], *, mode: str = "mse",
                      valid_batches: Iterable[dict] | None = None, num_steps: int | None = None, lr: float = 2e-4,
                      min_lr: float = 5e-5, warmup_steps: int | None = None, weight_decay: float = 1e-3,
                      clip_norm: float = 5.0, grad_accum: int = 1, epochs: int = 1, eval_every: int | None = None,
                      checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                      resume: bool = False, seed: int = 0, compute_dtype: str | None = None, progress: bool = True,
                      block_key: str | None = None, on_step=None, batch_size: int | None = None,
                      pair_cache: str | Path | None = None, mse_weighting: str = "uniform", shuffle: bool = False,
                      lr_schedule: str = "cosine", freeze: Sequence[str] = (), return_history: bool = False):
    """Train the pruned model's replacement block; return the pruned model with the trained (best) block.

    `train_batches` / `valid_batches`: re-iterable collections of {"input_ids", "attention_mask"} [B, T] arrays
    (e.g. a list, or `data.batches` over a chunk source), read in order; one epoch is one pass. With
    `return_history`, also return {"train": [(step, loss, lr)], "valid": [(step, loss)], "best_step", "wall_s"}.
    `on_step(step, loss)` is called after every optimizer step. With `batch_size`, the data are token chunks
    ([T] arrays, or a callable returning a fresh iterator of them) that are batched here. With `pair_cache` (MSE
    mode), the frozen model's (input, target) pairs are computed once into tensorstore arrays at that path (or
    reused if a finished cache for the same span is there) and every epoch reads them from disk.
    `mse_weighting="token"` makes the MSE relative per token (see `masked_mse`). `shuffle`: each epoch reads the
    training chunks (with `batch_size`), the batches of a list, or the cached rows in a fresh permutation drawn from
    `seed`; validation keeps its order. Validation chunks are never dropped: a short last batch is padded with
    masked rows. `lr_schedule`: "cosine" or "cosine-cycle" (see `lr_schedule`). `freeze`: regexes over the block's
    parameter paths (e.g. ("self_attn", "input_layernorm")) whose parameters stay as initialised.
    """
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; expected one of {MODES}")
    if mse_weighting not in MSE_WEIGHTINGS:
        raise ValueError(f"unknown mse_weighting {mse_weighting!r}; expected one of {MSE_WEIGHTINGS}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; expected one of {LR_SCHEDULES}")
    if not lr > 0 or not min_lr >= 0:
        raise ValueError(f"learning rates must be positive: lr={lr}, min_lr={min_lr}")
    if grad_accum < 1 or epochs < 1:
        raise ValueError(f"grad_accum and epochs must be >= 1, got {grad_accum}, {epochs}")
    if not dense_model.config.is_dense:
        raise ValueError("dense_model must be the unpruned model (its layers are the MSE teacher)")
    blocks = trainable_blocks(pruned_model.config)
    if block_key is not None:
        blocks = [b for b in blocks if b.key == block_key]
    if not blocks:
        raise ValueError("the pruned model has no replacement block to train (replacement 'none'?)")
    if len(blocks) > 1:
        raise ValueError(f"the pruned model has {len(blocks)} replacement blocks ({[b.key for b in blocks]}); "
                         f"pass block_key= to train one at a time")
    block = blocks[0]
    labels = freeze_labels(pruned_model.params["segments"][block.key], freeze)
    train_batches = _reiterable(train_batches, batch_size, "training")
    if valid_batches is not None:
        valid_batches = _reiterable(valid_batches, batch_size, "validation", pad_last=True)
    shuffle_seed = seed if shuffle else None
    if shuffle and pair_cache is None and not hasattr(train_batches, "epoch"):
        raise ValueError("shuffle=True needs the training data as a sequence (a list of batches, or of chunks with "
                         "batch_size), or a pair_cache; a callable stream cannot be permuted")
    first = next(iter(train_batches), None)
    if first is None:
        raise ValueError("no training data: the training batches are empty")
    batches_per_epoch = sum(1 for _ in train_batches)
    total_batches = batches_per_epoch * epochs
    if num_steps is None:
        num_steps = total_batches // grad_accum
    if num_steps < 1:
        raise ValueError(f"not enough data for one optimizer step: {batches_per_epoch} batches per epoch x {epochs} "
                         f"epoch(s) with grad_accum={grad_accum}; the batch may be larger than the data")
    if num_steps * grad_accum > total_batches:
        raise ValueError(f"num_steps={num_steps} x grad_accum={grad_accum} needs {num_steps * grad_accum} batches, "
                         f"but the data gives {total_batches}")
    warmup_steps = max(1, num_steps // 20) if warmup_steps is None else warmup_steps
    eval_every = eval_every or max(1, num_steps // 5)
    checkpoint_every = checkpoint_every or eval_every

    result_config = pruned_model.config
    if compute_dtype is not None:  # the products' input dtype for this training only (the models' own otherwise)
        dense_model = with_compute_dtype(dense_model, compute_dtype)
        pruned_model = with_compute_dtype(pruned_model, compute_dtype)
    mesh = pruned_model.mesh
    loss_name = mode
    if pair_cache is not None:
        if mode != "mse":
            raise ValueError("pair_cache is for mode='mse' only")
        rows = batches_per_epoch * len(np.asarray(first["input_ids"]))
        cache = SpanPairCache(pair_cache, block.start, block.length)
        if not cache.complete(rows):
            cache.build(dense_model, train_batches, progress)
        train_batches = cache.batches()
        if valid_batches is not None:
            valid_rows = sum(len(np.asarray(b["input_ids"])) for b in valid_batches)
            valid_cache = SpanPairCache(Path(pair_cache) / "valid", block.start, block.length)
            if not valid_cache.complete(valid_rows):
                valid_cache.build(dense_model, valid_batches, progress=False)
            valid_batches = valid_cache.batches()
        loss_name = "mse_cached"
    # float32 master weights for the block, whatever the compute dtype
    block_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pruned_model.params["segments"][block.key])
    frozen = {"dense": dense_model.params} if mode == "mse" else {"pruned": pruned_model.params}
    if loss_name == "mse_cached":
        frozen = {}
    loss_fn = _partial(LOSSES[loss_name], dense_config=dense_model.config, pruned_config=pruned_model.config,
                       block=block, **({} if mode == "lm" else {"weighting": mse_weighting}))
    tx, schedule = make_optimizer(lr, min_lr, warmup_steps, num_steps, weight_decay, clip_norm, grad_accum,
                                  lr_schedule, labels)
    train_step, eval_step = make_steps(loss_fn, tx, transformer.compute_dtype(pruned_model.config))

    valid = list(valid_batches) if valid_batches is not None else None
    if valid and loss_name == "mse":  # the frozen span's validation pairs once, not on every pass
        pairs = _validation_pairs(dense_model, block, valid, mesh)
        if pairs is not None:
            cached_loss = _partial(cached_mse_loss, dense_config=dense_model.config, pruned_config=pruned_model.config,
                                   block=block, weighting=mse_weighting)
            valid, eval_step = pairs, make_steps(cached_loss, tx, transformer.compute_dtype(pruned_model.config))[1]

    opt_state = tx.init(block_params)
    history = {"train": [], "valid": [], "best_step": 0, "best_valid": None, "wall_s": 0.0}
    best = block_params
    micro = 0  # batches consumed: the data position
    manager = _checkpoint_manager(checkpoint_dir) if checkpoint_dir else None
    if manager is not None and resume:
        restored = _restore(manager, {"block": block_params, "opt_state": opt_state, "best": best,
                                      "micro": np.zeros((), np.int64)})
        if restored is not None:
            state, history = restored
            block_params, opt_state, best = state["block"], state["opt_state"], state["best"]
            micro = int(state["micro"])
    elif manager is not None and manager.latest_step() is not None:
        raise TrainingError(f"{checkpoint_dir} already holds a training checkpoint (step {manager.latest_step()}); "
                            f"pass resume=True to continue it, or use an empty directory")

    def save(step):
        if manager is not None and manager.latest_step() != step:
            _save(manager, step, {"block": block_params, "opt_state": opt_state, "best": best,
                                  "micro": np.asarray(micro, np.int64)}, history)

    def data_from(position):
        epoch_iters = (train_batches.epoch(e, shuffle_seed) if shuffle else iter(train_batches) for e in itertools.count())
        stream = itertools.chain.from_iterable(epoch_iters)
        return itertools.islice(stream, position, total_batches)

    tokens_per_batch = int(np.sum(np.asarray(first.get("attention_mask", np.ones_like(first["input_ids"])))))
    step = micro // grad_accum
    bar = _progress(progress, num_steps, step)
    start_time, start_micro = time.perf_counter(), micro
    last_good = manager.latest_step() if manager is not None else None
    if valid is not None and not history["valid"] and step == 0:
        loss0 = _evaluate(eval_step, block_params, frozen, valid, mesh)
        history["valid"].append((0, loss0))
        history["best_valid"], history["best_step"] = loss0, 0
    # Ctrl-C stops only between steps, after a checkpoint of that step: whatever the moment it comes, the checkpoint
    # is one consistent (step, data position, block, optimizer state, history) and a resume ends bitwise as an
    # uninterrupted run would.
    try:
        with deferred_interrupts() as interrupt:
            for batch in data_from(micro):
                _loop_point("batch")
                if step >= num_steps:
                    break
                block_params, opt_state, loss = train_step(block_params, opt_state, frozen, _as_batch(batch, mesh))
                _loop_point("stepped")
                loss = float(loss)
                micro += 1
                if not math.isfinite(loss):
                    where = f"the last good checkpoint is step {last_good} in {checkpoint_dir}" \
                        if last_good is not None else "no checkpoint was saved"
                    raise TrainingError(f"{mode} loss is {loss} at step {step + 1} (batch {micro}); {where}")
                if micro % grad_accum:
                    continue
                step += 1
                history["train"].append((step, loss, float(schedule(step - 1))))
                _loop_point("logged")
                if bar is not None:
                    elapsed = time.perf_counter() - start_time
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}",
                                    tok_s=f"{(micro - start_micro) * tokens_per_batch / elapsed:.0f}")
                if valid is not None and (step % eval_every == 0 or step == num_steps):
                    vloss = _evaluate(eval_step, block_params, frozen, valid, mesh)
                    history["valid"].append((step, vloss))
                    if history["best_valid"] is None or vloss < history["best_valid"]:
                        history["best_valid"], history["best_step"] = vloss, step
                        best = block_params
                    _loop_point("validated")
                elif valid is None:
                    best = block_params
                if manager is not None and (step % checkpoint_every == 0 or step == num_steps):
                    save(step)
                    last_good = step
                    _loop_point("saved")
                if on_step is not None:
                    on_step(step, loss)
                if interrupt.pending:
                    save(step)
                    break  # the guard raises KeyboardInterrupt
    finally:
        if bar is not None:
            bar.close()
    history["wall_s"] += time.perf_counter() - start_time
    if valid is None:
        best = block_params
    params = dict(pruned_model.params)
    params["segments"] = dict(params["segments"])
    target_dtype = jnp.dtype(pruned_model.config.dtype)
    params["segments"][block.key] = jax.tree.map(lambda a: a.astype(target_dtype), best)
    trained = pruned_model.replace(config=result_config, params=params)
    if checkpoint_dir:
        (Path(checkpoint_dir) / "loss_curve.json").write_text(json.dumps(history, indent=1))
    return (trained, history) if return_history else trained


# Tests set this to a function of a point name ("batch", "stepped", "logged", "validated", "saved") to interrupt the
# training loop exactly there.
LOOP_HOOK = None


def _loop_point(name):
    if LOOP_HOOK is not None:
        LOOP_HOOK(name)


def _epoch_order(n, shuffle_seed, epoch):
    """Indices 0..n-1 in order, or in epoch `epoch`'s permutation under `shuffle_seed` (the same on a resume)."""
    if shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


class _Batched:
    """Re-iterable batches over re-iterable chunks (a sequence, or a callable returning a fresh iterator). Training
    drops a short last batch; validation pads it (`pad_last`) so that no chunk is left out."""

    def __init__(self, chunks, batch_size, pad_last=False):
        self.chunks, self.batch_size, self.pad_last = chunks, batch_size, pad_last
        if _indexable(chunks):
            self.epoch = self._epoch

    def _epoch(self, e, shuffle_seed=None):
        return self._stack(self.chunks[i] for i in _epoch_order(len(self.chunks), shuffle_seed, e))

    def __iter__(self):
        return self._stack(self.chunks() if callable(self.chunks) else self.chunks)

    def _stack(self, chunks):
        return batch_chunks(chunks, self.batch_size, drop_last=not self.pad_last, pad_last=self.pad_last)


class _BatchList:
    """A list of ready batches, read in order or (`epoch`) in a permutation of the batches."""

    def __init__(self, batch_list):
        self.batch_list = batch_list

    def epoch(self, e, shuffle_seed=None):
        return (self.batch_list[i] for i in _epoch_order(len(self.batch_list), shuffle_seed, e))

    def __iter__(self):
        return iter(self.batch_list)


def _reiterable(data, batch_size, what, pad_last=False):
    if batch_size is None:
        if callable(data):
            return _Fresh(data)
        if iter(data) is data:
            raise ValueError(f"the {what} batches must be re-iterable (a list, or a callable returning an iterator), "
                             f"not a one-shot iterator")
        return _BatchList(data) if _indexable(data) else data
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not callable(data) and iter(data) is data:
        raise ValueError(f"the {what} chunks must be re-iterable (a list, or a callable returning an iterator)")
    count = sum(1 for _ in itertools.islice(data() if callable(data) else data, batch_size))
    if count < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {what} data ({count} chunks)")
    return _Batched(data, batch_size, pad_last)


def _indexable(data):
    return not callable(data) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


class _Fresh:
    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return iter(self.factory())


def _partial(fn, **kwargs):
    def bound(block_params, frozen, batch):
        return fn(block_params, frozen, batch, **kwargs)
    return bound


def _progress(enabled, total, initial, desc="train block", unit="step"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit)
