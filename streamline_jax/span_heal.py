"""The span chosen after a short heal (`score.metric=heal`): span rankings by cosine can flip once the replacement
block has trained a little (NVIDIA Model-Optimizer's Minitron guide), so the top few spans by cosine are each pruned,
their block trained for a few MSE steps, and compared by the healed pruned model's next-token loss on the
validation chunks; the lowest loss wins.

The MSE at a span's output does not compare spans (each span's output has its own scale; a late span's is larger);
the next-token loss of the whole pruned model does. The healed blocks are thrown away: the run prunes the winner
afresh and trains it as for any other metric, so that a run by heal and one by cosine train alike.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Iterable

import jax.numpy as jnp

from .backend import jit_by_config
from .models.model import Model, prepare_inputs
from .score import SpanChoice, SpanScores, candidate_starts, span_choice

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HealedSpan:
    """One candidate: its span, its cosine, and after the heal its validation loss and the heal's cost."""

    start: int
    length: int
    cosine: float
    loss: float  # mean next-token NLL (nats per token) of the healed pruned model on the validation chunks
    heal_mse: float | None  # the last heal step's MSE (None: the block does not train)
    seconds: float  # pruning, healing and validating it


@dataclasses.dataclass(frozen=True)
class SpanHeal:
    """Every candidate of a heal, in cosine order (the cosine's choice first)."""

    steps: int
    candidates: tuple[HealedSpan, ...]
    num_tokens: int  # validation tokens each loss is over

    def best(self) -> HealedSpan:
        """The lowest validation loss; on a tie, the higher cosine."""
        return min(self.candidates, key=lambda h: h.loss)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "num_tokens": self.num_tokens, "chosen": self.best().start,
                "cosine_choice": self.candidates[0].start, "kept_block": False,
                "candidates": [dataclasses.asdict(h) for h in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "SpanHeal":
        return cls(int(d["steps"]), tuple(HealedSpan(**h) for h in d["candidates"]), int(d["num_tokens"]))

    def __str__(self) -> str:
        best = self.best()
        lines = [f"spans after a heal of {self.steps} MSE steps, by next-token loss over {self.num_tokens} "
                 f"validation tokens; '*' the lowest",
                 "  start  length  cosine     loss  perplexity  heal MSE  seconds"]
        lines += [f"{h.start:>7d} {h.length:>7d} {h.cosine:7.4f} {h.loss:8.4f} {math.exp(min(h.loss, 700)):11.2f} "
                  f"{'-' if h.heal_mse is None else format(h.heal_mse, '.4g'):>9s} {h.seconds:8.1f}"
                  + (" *" if h is best else "") for h in self.candidates]
        return "\n".join(lines)


def top_cosine_starts(scores: SpanScores, length: int, starts: Iterable[int], count: int) -> list[int]:
    """The `count` starts among `starts` whose spans of `length` layers have the highest cosine, highest first (on a
    tie, the earlier start: as `choose_span` breaks it)."""
    cosine = scores.cosine[:, length]
    return sorted(starts, key=lambda s: (-cosine[s], s))[:count]


@jit_by_config(static_argnames=("config",))
def next_token_loss_sum(config, params, input_ids, attention_mask):
    """(summed next-token NLL over real token pairs, their count) of one batch: the training's LM loss (its head run
    a chunk of tokens at a time, never [B, T, vocab] at once) times its count."""
    from .train import lm_loss

    count = jnp.sum((attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0), dtype=jnp.int32)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    mean = lm_loss({}, {"pruned": params}, batch, dense_config=config, pruned_config=config, block=None)
    return mean * count, count


def validation_loss(model: Model, batches: Iterable[dict]) -> tuple[float, int]:
    """(mean next-token NLL over the real tokens of `batches`, their count) of `model`."""
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = prepare_inputs(model, batch["input_ids"], batch.get("attention_mask"))
        loss, n = next_token_loss_sum(model.config, model.params, ids, mask)
        total, count = total + float(loss), count + int(n)
    if count == 0:
        raise ValueError("the validation chunks hold no real next-token pairs")
    return total / count, count


def heal_options(options, steps: int, batches_per_epoch: int):
    """The run's training options (block, lr, freeze, weighting, shuffle, seed) as a heal: `steps` MSE steps of the
    block, warmup as for null, no validation or checkpoints; epochs enough for the steps."""
    return options.replace(mode="mse", num_steps=steps, trainable=("block",), lr_beyond_block=None,
                           epochs=-(-steps * options.grad_accum // max(batches_per_epoch, 1)), warmup_steps=None,
                           eval_every=None, checkpoint_every=None)


def heal(dense: Model, pruned: Model, batches: list, options, steps: int) -> tuple[Model, float | None]:
    """`pruned` with its block trained `steps` MSE steps on `batches`, and the last step's loss (as it was, and
    None, where the replacement has no block to train)."""
    from .train import train_replacement, trainable_blocks

    if not trainable_blocks(pruned.config) or any(s.kind == "linear" for s in pruned.config.layout):
        return pruned, None
    healed, history = train_replacement(dense, pruned, batches, heal_options(options, steps, len(batches)),
                                        progress=False, return_history=True)
    return healed, history["train"][-1][1]


def choose_span_by_heal(dense: Model, scores: SpanScores, prune_candidate: Callable[[SpanChoice], Model],
                        heal_batches: list, valid_batches: list, options, *, count: int, steps: int,
                        length: int | None = None, sparsity: float | None = None, replacement: str = "layer",
                        protect_first: int = 0, protect_last: int = 0,
                        mlp_width: int | None = None) -> tuple[SpanChoice, SpanHeal]:
    """The span with the lowest validation loss after a heal, among the `count` spans of highest cosine (of `length`
    layers, or of the smallest length reaching `sparsity`); and every candidate's figures.

    `prune_candidate(choice)` prunes `dense` as the run would (the block's init, a closed-form fit); its block then
    trains `steps` MSE steps on `heal_batches` with the training `options`; `valid_batches` score it.
    """
    if count < 1 or steps < 1:
        raise ValueError(f"a heal needs at least one candidate and one step, got {count} and {steps}")
    if not heal_batches:
        raise ValueError("no batches to heal the candidates on")
    length, starts = candidate_starts(dense.config, length, sparsity, replacement, protect_first, protect_last,
                                      mlp_width)
    healed = []
    for start in top_cosine_starts(scores, length, starts, count):
        began = time.perf_counter()
        choice = span_choice(dense.config, start, length, replacement, mlp_width, None)
        model, mse = heal(dense, prune_candidate(choice), heal_batches, options, steps)
        loss, tokens = validation_loss(model, valid_batches)
        del model
        healed.append(HealedSpan(start, length, float(scores.cosine[start, length]), loss, mse,
                                 time.perf_counter() - began))
        log.info("heal candidate layers [%d, %d): cosine %.4f, validation loss %.4f after %d steps (%.1f s)",
                 start, start + length, healed[-1].cosine, loss, steps, healed[-1].seconds)
    result = SpanHeal(steps, tuple(healed), tokens)
    best = result.best()
    return span_choice(dense.config, best.start, length, replacement, mlp_width, best.loss), result


def chosen_from(heal_result: SpanHeal, config, replacement: str, mlp_width: int | None) -> SpanChoice:
    """The SpanChoice a recorded heal made (a resume reads it back instead of healing again)."""
    best = heal_result.best()
    return span_choice(config, best.start, best.length, replacement, mlp_width, best.loss)
