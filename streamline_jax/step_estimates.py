"""Expected step times from a compiled step's FLOPs and bytes at a chip's peak (a roofline), and what a whole run
would take at those times.

`compiled.cost_analysis()` gives FLOPs and HBM bytes accessed for one chip (its shards; checked on a known matmul in
tests/test_step_estimates.py), but it counts the body of a scanned layer stack once. So the FLOPs are the planner's
count from the shapes (`plan.step_flops`, the whole step, over the chips), and XLA's bytes are scaled by the factor its
FLOPs fall short by. That scaling is rough: the one-off parts (embeddings, head, optimizer update, scoring's
cosine sums over every pair of hidden states) scale with it too. Against the same tiny steps compiled with every
layer unrolled (which XLA counts in full) it gave 2.0x the bytes for scoring, 1.8x for MSE, 1.0x for the LM step and
1.3x for evaluation; compiling the unrolled steps instead is exact but slow at scale (three unrolled layers of
llama2-13b's LM step took 513 s for v5e-16 here). Hence a lower bound too: the step's FLOPs at peak, or the bytes
XLA counted at full bandwidth, whichever takes longer. Collectives (FSDP all-gathers and reduce-scatters over ICI or
NVLink) are in neither: a step that waits for them takes longer.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    source: str


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
    # dense (no 2:4 sparsity) bf16 tensor-core peak of the SXM parts
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3.35e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/"),
}


GPU_CHIPS = ("h100", "h200")


def target_chips(target_name: str) -> tuple[str, ...]:
    """The chips a target's steps are estimated for: its own (`v5e-16` -> v5e, `8xH200` -> h200), or H100 and
    H200 for a GPU count (`gpu:8`)."""
    name = target_name.lower()
    own = tuple(c for c in CHIPS if c in name)
    if own:
        return own[:1]
    if name.startswith("gpu:"):
        return GPU_CHIPS
    raise ValueError(f"no peak figures for target {target_name!r}; known chips: {', '.join(CHIPS)}")


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """One step on one chip at the chip's peak: the larger of compute time and HBM time (the roofline), and a lower
    bound from the bytes XLA counted (a scan body once)."""
    chip: str
    flops: float  # per chip
    bytes: float  # per chip, scaled for the scans
    counted_bytes: float  # per chip, as XLA counted them

    @property
    def compute_s(self) -> float:
        return self.flops / CHIPS[self.chip].bf16_flops

    @property
    def memory_s(self) -> float:
        return self.bytes / CHIPS[self.chip].hbm_bandwidth

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def at_least_s(self) -> float:
        """The step moves at least the bytes XLA counted and does all its FLOPs."""
        counted = self.counted_bytes / CHIPS[self.chip].hbm_bandwidth
        return max(self.compute_s, 0.0 if math.isnan(counted) else counted)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(chip: str, flops: float, hbm_bytes: float, counted_bytes: float | None = None) -> StepEstimate:
    """Step time at `chip`'s peak for `flops` and `hbm_bytes` on one chip (`counted_bytes`: XLA's count, if less)."""
    return StepEstimate(chip, flops, hbm_bytes, hbm_bytes if counted_bytes is None else counted_bytes)


def scan_corrected_bytes(xla_bytes: float, xla_flops: float, flops: float) -> float:
    """XLA's per-chip bytes scaled by how far its FLOPs (a scanned stack's body once) fall short of the full count
    `flops`; unscaled where XLA counted more or gave nothing."""
    if not (xla_flops > 0 and flops > xla_flops) or math.isnan(xla_bytes):
        return xla_bytes
    return xla_bytes * flops / xla_flops


def step_estimate(chip: str, flops_per_chip: float, xla_flops: float, xla_bytes: float) -> StepEstimate:
    return roofline(chip, flops_per_chip, scan_corrected_bytes(xla_bytes, xla_flops, flops_per_chip), xla_bytes)


# --------------------------------------------------------------------------------------------------------------
# A whole run: each stage's tokens at its planned step's time per token

# Items and tokens an item of each default evaluation task (configs/pipeline.yaml's `tasks`): WikiText-2's test
# text is ~1.29 M characters, ~0.34 M Llama-2 tokens (~3.8 characters a token), in windows of 1024; PIQA's 1838
# validation items are a ~40-token question and two ~25-token answers, packed with the question once.
EVAL_ITEMS = {"wikitext2": (332, 1024), "piqa": (1838, 90)}
PERPLEXITY_TASKS = ("wikitext2",)
# Validations of a training run: train_replacement validates every num_steps // 5 steps (`eval_every` unset).
VALIDATIONS = 5


@dataclasses.dataclass(frozen=True)
class StageWork:
    stage: str  # the planned step it runs at (scoring, mse, lm, evaluate)
    what: str
    tokens: int


def eval_tokens(tasks, limit: int | None = None, ppl_windows: int | None = None) -> int:
    """Tokens the evaluation reads: each task's items (at most `limit` multiple-choice items, `ppl_windows`
    perplexity windows) times its tokens an item."""
    unknown = [k for k in tasks if k not in EVAL_ITEMS]
    if unknown:
        raise ValueError(f"no token count for evaluation task(s) {unknown}; known: {sorted(EVAL_ITEMS)}")
    total = 0
    for name in tasks:
        items, per_item = EVAL_ITEMS[name]
        cap = ppl_windows if name in PERPLEXITY_TASKS else limit
        total += min(items, cap or items) * per_item
    return total


def run_work(run_config) -> list[StageWork]:
    """The tokens each planned step processes in a run with these settings (a `settings.RunConfig`): the
    calibration chunks scored, the training chunks of every epoch (or num_steps batches), the distillation phase's
    steps, the validations (a forward, at the scoring step's rate), the evaluation of dense and pruned."""
    d, t, e = run_config.data, run_config.train, run_config.eval
    train_tokens = (t.num_steps * d.batch_size if t.num_steps else d.train_chunks * t.epochs) * d.seq_len
    distil = bool(t.distill_steps) and t.mode != "kd"
    validations = (VALIDATIONS + distil) if d.valid_chunks and run_config.data.valid else 0
    work = [StageWork("scoring", f"score {d.calib_chunks} calibration chunks", d.calib_chunks * d.seq_len),
            StageWork("mse" if t.mode == "mse" else "lm", f"train ({t.mode}, {train_tokens // d.seq_len} chunks)",
                      train_tokens)]
    if distil:
        work.append(StageWork("lm", f"distil ({t.distill_steps} kd steps of {d.batch_size})",
                              t.distill_steps * d.batch_size * d.seq_len))
    if validations:
        work.append(StageWork("scoring", f"validate ({validations} x {d.valid_chunks} chunks)",
                              validations * d.valid_chunks * d.seq_len))
    work.append(StageWork("evaluate", f"evaluate dense + pruned ({', '.join(e.tasks)})",
                          eval_tokens(e.tasks, e.limit, e.ppl_windows)))
    return work


@dataclasses.dataclass(frozen=True)
class RunEstimate:
    work: StageWork
    step: StepEstimate
    step_tokens: int  # tokens in one planned step (batch × seq_len)

    @property
    def steps(self) -> float:
        return self.work.tokens / self.step_tokens

    @property
    def seconds(self) -> float:
        return self.steps * self.step.seconds


def run_estimate(work: list[StageWork], steps: dict[str, tuple[StepEstimate, int]]) -> list[RunEstimate]:
    """Each stage's work at its planned step (`steps`: stage -> (estimate, tokens per step)); stages not planned
    are left out."""
    return [RunEstimate(w, *steps[w.stage]) for w in work if w.stage in steps]


def format_seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
