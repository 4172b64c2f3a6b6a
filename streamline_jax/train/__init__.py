"""Stage 4, train: fit the replacement block (or any chosen parameters) with optax while the rest stays frozen.

MSE mode (the paper's): the block's input is the frozen dense model's hidden state entering the pruned span, its
target the state leaving it; both are computed inside the jitted step (no gradient through the frozen layers), so
host memory does not grow with the number of training samples. LM mode: next-token cross-entropy of the whole pruned
model. KD mode: KL divergence from the dense teacher's next-token distribution to the pruned student's (with a
temperature), optionally mixed with the cross-entropy and plus hidden-state MSE at the span's output and later
layers; the teacher runs in the same jitted step from the prefix it shares with the student, and the logits are
reduced chunk by chunk (never [tokens x vocab] for the whole batch, never on the host). What trains is a set of
parameter-path patterns (`trainable`, the block by default); optimizer state exists for those leaves only. A trained
`layer` block uses the same causal mask as at inference.

Training state (block params, optimizer state, step, data position, best block, history) is checkpointed with
Orbax every `checkpoint_every` steps, and at the step a Ctrl-C stops (it waits for the step under way: see
interrupts.py); `resume=True` continues from the latest checkpoint and ends with the same parameters as an
uninterrupted run.

The package's modules, one job each: options (TrainOptions and its checks; no JAX), params (blocks, parameter paths,
trainable / freeze), losses, optimizer, program (the one builder from options to the compiled program), span_cache
(the span's pairs on disk), offload (the dense span on disk while the steps read those pairs), checkpoints, loop
(train_replacement). Their public names are importable from here; they load on first use, so
`streamline_jax.train.options` imports without JAX.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# public name -> the module of this package that defines it
_HOMES = {
    "options": ("LR_SCHEDULES", "MODES", "MSE_WEIGHTINGS", "TrainOptions"),
    "params": ("ATTENTION_HALF", "Block", "chosen_block", "freeze_labels", "merge_params", "param_path",
               "split_params", "trainable_blocks", "trained_paths"),
    "losses": ("HEAD_KEYS", "KD_CHUNK_TOKENS", "LOSSES", "Distillation", "cached_kd_loss", "cached_mse_loss",
               "distillation_loss", "distillation_loss_by_autodiff", "kd_loss", "lm_loss", "masked_mse", "mse_loss",
               "mse_token_weights",
               "span_pairs", "span_pairs_fn", "TOP_K_ARRAYS", "teacher_top_k_fn", "top_k_distillation_loss",
               "dense_params_read"),
    "optimizer": ("lr_schedule", "make_optimizer", "scale_updates_by_path", "warmup_steps_for"),
    "program": ("TrainingProgram", "abstract_batch", "abstract_step_arguments", "bind_loss", "build_program",
                "cached_mse_eval_step",
                "distillation_settings", "make_steps", "training_program"),
    "span_cache": ("PAIR_ARRAYS", "SpanPairCache", "TeacherTopKCache"),
    "offload": ("offloaded", "own_segments_before"),
    "checkpoints": ("Checkpoints", "LoopState", "TrainingError"),
    "loop": ("VALID_PAIRS_BYTES", "train_replacement"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOMES, globals())
