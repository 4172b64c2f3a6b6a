"""The pipeline: one function per stage (load, score, prune, train, evaluate, harness, save), each returning its
part of the report, and `run`, which runs the chosen stages into an output folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .files import write_atomic
from .host_memory import fit_allocator_to, release_host_memory, weights_fill_host
from .run_folder import (DISTILL_CHECKPOINT, DONE, FAILED, OFFLOADED_SPAN, PAIR_CACHE, SPAN_HEAL, TRAIN_CHECKPOINT,
                         check_trained_spans, finish_out, folder_lock, mark_holder, prepare_out,
                         staging_folder)
from .run_inputs import Inputs, check_inputs, data_path
from .settings import STAGES, ConfigError, RunConfig, check_against_model
from .stage_batches import (SELF_PAIR_CACHE, distillation_batches, model_stamp, training_batches,
                            validation_batches)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The run


class StageTimes(dict):
    """Seconds per stage, and the stage running now (what FAILED names when the run fails)."""

    current = "setup"


@contextlib.contextmanager
def stage(name: str, times: StageTimes):
    log.info("[%s] started", name)
    times.current = name
    start = time.perf_counter()
    yield
    release_host_memory()  # what the stage freed goes back to the system before the next one allocates
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    log.info("[%s] done in %.1f s", name, times[name])


def _strip(results: dict) -> dict:
    """Evaluation results without per-item lists (they stay out of report.json)."""
    drop = ("labels", "predictions", "loglikelihoods")
    return {**results, "tasks": {n: {k: v for k, v in t.items() if k not in drop}
                                 for n, t in results["tasks"].items()}}


def run(config: RunConfig, out: Path, stages: tuple[str, ...] = STAGES, *, overwrite: bool = False,
        resume: bool = False, preset: str | None = None, progress: bool = True, target: str | None = None,
        shared: SharedWork | None = None, command: str | None = None) -> dict:
    """Run `stages` of the pipeline into `out`; return the report (`command`, the command line that ran it, goes
    into the model card). KeyboardInterrupt propagates (the caller logs)."""
    from .distributed import is_main_process

    out = Path(out).absolute()
    total_start = time.perf_counter()
    times = StageTimes()
    # every check that needs no model first, before the folder is touched; then one run at a time per folder
    inputs = check_inputs(config, stages)
    with folder_lock(out) if is_main_process() else contextlib.nullcontext():
        work, resume = _prepare_all_processes(out, config, overwrite, resume)
        with folder_lock(work) if work != out and is_main_process() else contextlib.nullcontext():
            if is_main_process():
                mark_holder(out)
                mark_holder(work)
            handler = logging.FileHandler(work / "run.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            package_log = logging.getLogger(__package__)  # every module's logger is its child
            package_log.addHandler(handler)
            try:
                with _library_errors_to(handler):
                    report = _run(RunContext(config, work, stages, inputs, times, total_start, resume=resume,
                                             preset=preset, target=target, progress=progress, shared=shared,
                                             command=command))
                if is_main_process():
                    (work / FAILED).unlink(missing_ok=True)
                    finish_out(work, out)
            except BaseException as e:
                if is_main_process():  # the next run says what failed, and resumes
                    _record_failure(work, e, times.current)
                kept = f"; the finished run in {out} is kept as it was" if work != out else ""
                e.add_note(f"{work} is not marked finished{kept}: once the cause is fixed, the same command "
                           f"continues it; other settings need --overwrite")
                raise
            finally:
                package_log.removeHandler(handler)
                handler.close()
        return report


LIBRARY_LOGGERS = ("absl", "asyncio")  # Orbax's writer threads and their event loops


@contextlib.contextmanager
def _library_errors_to(handler: logging.Handler):
    """The libraries' own error reports go to run.log only (Orbax's threads logging each failed write; tensorstore's
    callbacks into a closed event loop, reported as unraisable): a full disk is then the one line of the error that
    stops the run, not dozens of tracebacks."""
    import sys
    import threading

    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    kept = [(lg, lg.propagate) for lg in loggers]
    hooks = threading.excepthook, sys.excepthook, sys.unraisablehook

    def to_log(exc_type, value, tb, where="a library callback"):
        handler.handle(logging.LogRecord("library", logging.ERROR, __file__, 0, "exception in %s", (where,),
                                         (exc_type, value, tb)))

    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    threading.excepthook = lambda a: to_log(a.exc_type, a.exc_value, a.exc_traceback, f"thread {a.thread}")
    sys.excepthook = to_log
    sys.unraisablehook = lambda u: to_log(u.exc_type, u.exc_value, u.exc_traceback, f"{u.object!r}")
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
        # after a failure the loggers stay on run.log: a failed write's asyncio task reports its unread exception
        # whenever it is collected, often after the run has returned its one line
        for lg, propagate in [] if failed else kept:
            lg.removeHandler(handler)
            lg.propagate = propagate


def _prepare_all_processes(out: Path, config: RunConfig, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """prepare_out on process 0; every process learns where the run is written and whether it resumes."""
    import jax

    from .distributed import barrier, is_main_process

    if jax.process_count() == 1:
        return prepare_out(out, config, overwrite, resume)
    from jax.experimental import multihost_utils

    import numpy as np

    decided = np.zeros(2, np.int32)
    if is_main_process():
        work, resume = prepare_out(out, config, overwrite, resume)
        decided[:] = (work != out, resume)
    barrier("prepare_out")
    staged, resume = (bool(v) for v in multihost_utils.broadcast_one_to_all(decided))
    return (staging_folder(out) if staged else out), resume


def _record_failure(work: Path, error: BaseException, stage_name: str) -> None:
    """FAILED (stage and error) for the next run; the traceback of an unexpected error goes to run.log only."""
    import traceback

    what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    write_atomic(work / FAILED, f"stage {stage_name}: {what}\n")
    if not isinstance(error, (KeyboardInterrupt, ConfigError)):
        with open(work / "run.log", "a") as f:
            traceback.print_exception(error, file=f)
        error.add_note(f"the traceback is in {work / 'run.log'}")


@dataclasses.dataclass
class SharedWork:
    """Work that runs in one process share when their settings agree (a sweep's points): the loaded dense model,
    keyed by the model and mesh settings, and span scores, keyed by those and the calibration settings."""

    models: dict = dataclasses.field(default_factory=dict)
    scores: dict = dataclasses.field(default_factory=dict)
    dense_evaluations: dict = dataclasses.field(default_factory=dict)  # for when the disk cache is off
    calibration: dict = dataclasses.field(default_factory=dict)  # tokenized calibration batches


def _load_key(c: RunConfig, preset, target) -> str:
    return json.dumps([dataclasses.asdict(c.model), dataclasses.asdict(c.mesh), preset, target], sort_keys=True)


def _score_key(c: RunConfig, load_key: str, metric: str) -> str:
    d = c.data
    return json.dumps([load_key, d.calibration, d.text_field, d.seq_len, d.calib_chunks, d.batch_size, metric])


def calibration_batches(c: RunConfig, dense, calib_source, shared: SharedWork | None = None) -> list:
    """The calibration chunks in batches (token ids only: small), tokenized once per `shared`: scoring, the
    perplexity span choice and closed-form fits all read them."""
    from . import data

    d = c.data
    key = json.dumps([c.model.source, dense.config.vocab_size, d.calibration, d.text_field, d.seq_len,
                      d.calib_chunks, d.batch_size])
    if shared is not None and key in shared.calibration:
        return shared.calibration[key]
    chunks = data.token_chunks(calib_source, dense.tokenizer, d.seq_len)
    batches = list(data.batches(data.split_chunks(chunks, d.calib_chunks).calib, d.batch_size))
    if shared is not None:
        shared.calibration = {key: batches}  # one calibration set at a time
    return batches


def load_stage(c: RunConfig, preset, target, shared: SharedWork | None):
    """The dense model on its mesh, with the compute dtype resolved; (model, its part of the report)."""
    import jax

    from .backend import resolve_compute_dtype, schedule_for_memory
    from .loading import load
    from .models.model import with_compute_dtype

    key = _load_key(c, preset, target)
    if shared is not None and key in shared.models:
        dense, why = shared.models[key]
        log.info("%s: loaded already (%s products)", c.model.source, dense.config.compute_dtype)
    else:
        mesh = scoring_mesh(c, preset, target)
        dense = load(c.model.source, c.model.dtype or "float32", mesh=mesh)
        if dense.tokenizer is None:
            raise ConfigError(f"{c.model.source}: the model has no tokenizer; calibration, training and evaluation "
                              f"need one")
        _check_architecture(c, dense.config)
        check_against_model(c, dense.config)
        compute, why = resolve_compute_dtype(c.model.compute_dtype)
        dense = with_compute_dtype(dense, compute)
        log.info("%s: %d layers, %s parameters, %s weights, %s products (%s)", c.model.source, dense.config.depth,
                 f"{dense.num_params:,}", dense.config.dtype, compute, why)
        fit_allocator_to(dense.weight_bytes, jax.default_backend())
        schedule_for_memory(weights_fill_host(dense.weight_bytes, jax.default_backend()))
        if shared is not None:
            shared.models = {key: (dense, why)}  # one model at a time: a sweep over models frees the last
    compute = dense.config.compute_dtype
    return dense, {"source": c.model.source, "layers": dense.config.depth, "params": dense.num_params,
                   "dtype": dense.config.dtype, "compute_dtype": compute, "compute_dtype_why": why,
                   "config": dense.config.to_dict()}


def score_stage(c: RunConfig, dense, calib_source, progress: bool, shared: SharedWork | None, load_key: str,
                inputs: Inputs | None = None, out: Path | None = None, resume: bool = False):
    """Span scores on the calibration chunks (reused from `shared` when their settings agree) and the spans they
    choose: (scores, choices, report parts). `perplexity`, `last` and `heal` (on the training and validation chunks
    of `inputs`; its record in `out`, which a resume reads) choose otherwise; the cosine tables still go in the
    report."""
    from . import score as score_mod

    by_similarity = c.score.metric in score_mod.METRICS
    metric = c.score.metric if by_similarity else "cosine"
    key = _score_key(c, load_key, metric)
    scores = shared.scores.get(key) if shared is not None else None
    if scores is None:
        scores = score_mod.score_spans(dense, calibration_batches(c, dense, calib_source, shared), metric,
                                       progress=progress)
        if shared is not None:
            shared.scores[key] = scores
    else:
        log.info("span scores: computed already for these calibration settings")
    span_args = dict(length=c.score.num_layers, sparsity=c.score.sparsity, replacement=c.prune.replacement,
                     protect_first=c.score.protect_first, protect_last=c.score.protect_last,
                     mlp_width=c.prune.mlp_width)
    parts = {"scores": {"metric": scores.metric, "num_tokens": scores.num_tokens, "cosine": scores.cosine,
                        "angular": scores.angular, "block_influence": scores.block_influence}}
    if c.score.metric == "perplexity":
        choice, costs = score_mod.choose_span_by_loss(dense, calibration_batches(c, dense, calib_source, shared),
                                                      **span_args, progress=progress)
        log.info("%s", costs)
        parts["span_costs"] = costs.to_dict()
        choices = [choice]
    elif c.score.metric == "heal":
        choice, heal = heal_choice(c, dense, scores, inputs, shared, out, resume)
        log.info("%s", heal)
        parts["span_heal"] = heal.to_dict()
        choices = [choice]
    elif c.score.metric == "last":
        choices = [score_mod.choose_last_span(dense.config, **span_args)]
    else:
        choices = score_mod.choose_spans(scores, c.score.spans, **span_args)
    for choice in choices:
        log.info("chosen span: %s", choice)
    described = [{"start": ch.start, "length": ch.length, "end": ch.end, "replacement": ch.replacement,
                  "metric": scores.span_metric if by_similarity else c.score.metric, "score": ch.score,
                  "params_removed": ch.params_removed, "params_total": ch.params_total, "sparsity": ch.sparsity}
                 for ch in choices]
    parts.update({"span": described[0]} if len(choices) == 1 else {"spans": described})
    return scores, choices, parts


def heal_choice(c: RunConfig, dense, scores, inputs: Inputs, shared: SharedWork | None, out: Path | None,
                resume: bool):
    """`score.metric=heal`: the top score.heal_candidates spans by cosine, each pruned as the prune stage does,
    healed score.heal_steps MSE steps on the first training chunks and scored on the validation chunks; (the
    lowest's SpanChoice, the SpanHeal). Recorded in `out`; a resume of the run reads the record back."""
    from . import span_heal
    from .distributed import main_only

    path = out / SPAN_HEAL if out is not None else None
    if resume and path is not None and path.is_file():
        heal = span_heal.SpanHeal.from_dict(json.loads(path.read_text()))
        log.info("span heal: read back from %s (not healed again)", path)
        return span_heal.chosen_from(heal, dense.config, c.prune.replacement, c.prune.mlp_width), heal
    steps = c.score.heal_steps * c.data.batch_size * c.train.grad_accum  # the chunks of one pass; fewer: repeated
    heal_batches = list(training_batches(c, dense.tokenizer, inputs, min(steps, c.data.train_chunks)))
    choice, heal = span_heal.choose_span_by_heal(
        dense, scores, lambda ch: prune_stage(c, dense, [ch], inputs.calib_source, shared)[1], heal_batches,
        validation_batches(c, dense.tokenizer, inputs.valid_source), c.train, count=c.score.heal_candidates,
        steps=c.score.heal_steps, length=c.score.num_layers, sparsity=c.score.sparsity,
        replacement=c.prune.replacement, protect_first=c.score.protect_first, protect_last=c.score.protect_last,
        mlp_width=c.prune.mlp_width)
    if path is not None:
        main_only(write_atomic)(path, json.dumps(heal.to_dict()))
    return choice, heal


def prune_stage(c: RunConfig, dense, choices, calib_source, shared: SharedWork | None = None,
                share_layers: bool = False):
    """The spans cut out and their blocks put in (a `linear` block, or `prune.init=linear`, fitted in closed form
    on the calibration chunks): (dense model, pruned model, report parts). With `share_layers`, the dense model
    comes back with its stack split at the spans' ends, and the pruned model holds the kept layers' arrays of that
    split instead of copies: one model's memory for both (`dense` is unusable after)."""
    from . import pruning as prune_mod

    if share_layers:
        dense = prune_mod.split_stack(dense, [e for ch in choices for e in (ch.start, ch.end)])
    pruned = dense
    for choice in sorted(choices, key=lambda ch: -ch.start):  # later spans first: earlier starts stay valid
        pruned = prune_mod.prune(pruned, choice.start, choice.length, c.prune.replacement, c.prune.mlp_width)
    parts = {}
    if c.prune.replacement == "linear" or c.prune.init == "linear":
        from .linear_fit import fit_linear

        pruned, fits = fit_linear(dense, pruned, calibration_batches(c, dense, calib_source, shared), c.prune.ridge,
                                  c.prune.fit_weighting)
        parts["linear_fit"] = [dataclasses.asdict(f) for f in fits]
        for f in fits:
            log.info("closed-form fit on %d calibration tokens: relative error %.4f, %.4f before it (1 = the `none` "
                     "replacement)", f.tokens, f.relative_error, f.start_error)
    parts.update(params={"dense": dense.num_params, "pruned": pruned.num_params,
                         "dense_layers": dense.config.depth, "pruned_layers": pruned.config.depth},
                 pruned_config=pruned.config.to_dict())
    return dense, pruned, parts


def train_stage(c: RunConfig, dense, pruned, inputs: Inputs, out: Path, resume: bool, progress: bool,
                preset: str | None = None, target: str | None = None):
    """The replacement block trained on the training stage's layout (configs/meshes.yaml: `mse` for mode mse, `lm`
    for lm and kd; its mesh and remat policy); (pruned model on the mesh it came on, training history). Where that
    mesh differs from the models' one, the models are re-sharded onto it for training (the dense model is then on
    the devices twice while it trains) and the trained model back. With `train.distill_steps`, a distillation phase
    (mode kd, on the `lm` layout) follows from the trained blocks; its history is the block's `distill`."""
    from .loading import place_on_mesh
    from .train import train_replacement, trainable_blocks

    check_trained_spans(c, pruned, out, resume)
    home = pruned.mesh
    dense, pruned, remat, layout_name = _on_training_layout(c, "mse" if c.train.mode == "mse" else "lm", dense,
                                                            pruned, preset, target)
    batch = c.data.batch_size
    train_batches = training_batches(c, dense.tokenizer, inputs)
    if c.train.shuffle:  # a permutation per epoch needs the batches listed (token ids only: small)
        train_batches = list(train_batches)
    valid_batches = validation_batches(c, dense.tokenizer, inputs.valid_source)
    t = c.train
    offload = out / OFFLOADED_SPAN if offloads_span(c, dense) else None
    blocks = trainable_blocks(pruned.config)
    histories = []
    subfolders = {b.key: "" if len(blocks) == 1 else b.key for b in blocks}  # one block: a single-span run's folders
    for block in blocks:  # one at a time: each learns its own dense span, the others' weights do not enter
        sub = subfolders[block.key]
        pruned, history = train_replacement(
            dense, pruned, train_batches, t, valid_batches=valid_batches, checkpoint_dir=out / TRAIN_CHECKPOINT / sub,
            resume=resume, block_key=block.key, progress=progress, return_history=True, remat=remat,
            pair_cache=out / PAIR_CACHE / sub if t.pair_cache and t.mode != "lm" else None,  # LM runs no span
            offload_span=offload)
        histories.append({**history, "mode": t.mode, "block": block.key, "span": [block.start, block.length]})
    ran_on = {"layout": layout_name, "remat": remat}  # layout None: no meshes.yaml target (mesh.* settings)
    if t.distill_steps and not t.distils_after:
        log.info("train.mode=kd already distils: no separate train.distill_steps phase")
    elif t.distils_after:  # after every block's own training, so that each distils inside the finished model
        dense, pruned, remat, layout_name = _on_training_layout(c, "lm", dense, pruned, preset, target)
        ran_on["distill_layout"] = layout_name
        distill_batches, distill_chunks, self_made = distillation_batches(c, dense, inputs, out, train_batches)
        kd = t.distillation(distill_chunks, batch)
        pairs = out / PAIR_CACHE / (SELF_PAIR_CACHE if self_made else "")  # other chunks: pairs of their own
        for block, history in zip(blocks, histories):
            pruned, distilled = train_replacement(
                dense, pruned, distill_batches, kd, valid_batches=valid_batches, block_key=block.key, remat=remat,
                checkpoint_dir=out / DISTILL_CHECKPOINT / subfolders[block.key], resume=resume, progress=progress,
                return_history=True, pair_cache=pairs / subfolders[block.key] if t.pair_cache else None,
                offload_span=offload, reuse_pairs=out / PAIR_CACHE / subfolders[block.key] if self_made else None)
            history["distill"] = {**distilled, "mode": "kd", "lr": t.distill_lr, "trainable": list(kd.trainable),
                                  "freeze": list(kd.freeze), "lr_beyond_block": kd.lr_beyond_block,
                                  "text": c.data.distill_text, **({"self_data": self_made} if self_made else {})}
    if home is not None and pruned.mesh != home:
        pruned = place_on_mesh(pruned, home)
    if len(histories) == 1:
        return pruned, {**histories[0], **ran_on}
    return pruned, {"mode": t.mode, "blocks": histories, "wall_s": sum(h.get("wall_s", 0) for h in histories),
                    **ran_on}


def offloads_span(c: RunConfig, dense) -> bool:
    """Whether training offloads the dense span while its steps read cached pairs (train.offload_span; auto:
    where the weights fill a CPU host, `host_memory.weights_fill_host`)."""
    import jax

    if c.train.offload_span == "none" or not c.train.pair_cache:
        return False
    return c.train.offload_span == "disk" or weights_fill_host(dense.weight_bytes, jax.default_backend())


def _on_training_layout(c: RunConfig, stage: str, dense, pruned, preset: str | None, target: str | None):
    """(dense, pruned, remat policy, layout name) for training on `stage`'s layout ("mse" or "lm"): the models
    re-sharded onto its mesh where that differs from theirs; as they are without a meshes.yaml target."""
    from .loading import place_on_mesh

    staged = stage_layout(stage, preset, target)
    if staged is None:
        return dense, pruned, "none", None
    mesh, layout = staged
    if c.data.batch_size != layout.batch:  # the memory plan (scripts/plan_memory.py) was for the layout's batch
        log.warning("training batch data.batch_size=%d is not the batch %d its layout was planned for (%s); "
                    "plan it with scripts/plan_memory.py --batch %d", c.data.batch_size, layout.batch, layout,
                    c.data.batch_size)
    if dense.mesh is not None and mesh != dense.mesh:
        log.info("training re-shards the models onto its layout: %s", layout)
        dense, pruned = place_on_mesh(dense, mesh), place_on_mesh(pruned, mesh)
    return dense, pruned, layout.remat, str(layout)


def dense_evaluation_key(c: RunConfig, dense, tasks) -> str:
    """What the dense model's evaluation depends on: the model's files and settings, the tasks and their files."""
    from . import cache

    task_files = [cache.path_stamp(data_path(v)) for t in tasks for v in dataclasses.asdict(t).values()
                  if isinstance(v, str) and Path(data_path(v)).exists()]
    e = c.eval
    return cache.content_key(model=model_stamp(c), dtype=dense.config.dtype,
                             compute_dtype=dense.config.compute_dtype, tasks=tasks, task_files=task_files,
                             limit=e.limit, ppl_windows=e.ppl_windows, batch_size=e.batch_size,
                             devices=_device_kind())


def _device_kind() -> str:
    import jax

    return f"{jax.default_backend()} x{jax.device_count()}"


def _cached_dense_evaluation(key: str, shared: SharedWork | None) -> dict | None:
    from . import cache

    found = cache.read("dense_eval", key) or (shared.dense_evaluations.get(key) if shared is not None else None)
    if found is not None:
        log.info("dense evaluation: reused from the cache (%s)", key)
    return found


def _keep_dense_evaluation(key: str, results: dict, shared: SharedWork | None) -> None:
    from . import cache
    from .distributed import main_only

    main_only(cache.write)("dense_eval", key, results)
    if shared is not None:
        shared.dense_evaluations[key] = results


def evaluate_stage(c: RunConfig, dense, pruned, tasks, progress: bool, shared: SharedWork | None = None) -> dict:
    """Dense and pruned evaluated, and the retention report. The dense results come from the cache where these
    settings were evaluated before; otherwise the two models run together, call by call, and the layers before the
    pruned span (the same in both, unless they trained) run once for both (`evaluation.model_group`)."""
    from . import evaluation as ev
    from .report import jsonable
    from .retention import compare

    start = time.perf_counter()
    key = dense_evaluation_key(c, dense, tasks)
    dense_results = _cached_dense_evaluation(key, shared)
    group = ev.model_group([dense, pruned]) if pruned is not None and dense_results is None else None
    if group is not None and group.shared is not None:
        dense_results, pruned_results = map(jsonable, _evaluate(ev, group, tasks, c, progress))
        _keep_dense_evaluation(key, dense_results, shared)
        log.info("dense and pruned evaluated together: embeddings and %d layers run once for both", group.shared)
        parts = {"evaluation_s": {"together": time.perf_counter() - start}, "evaluation_shared_layers": group.shared}
    else:
        if dense_results is None:
            dense_results = jsonable(_evaluate(ev, dense, tasks, c, progress))
            _keep_dense_evaluation(key, dense_results, shared)
        parts = {"evaluation_s": {"dense": time.perf_counter() - start}}  # ~0 when the cache had it
        if pruned is not None:
            start = time.perf_counter()
            pruned_results = _evaluate(ev, pruned, tasks, c, progress)
            parts["evaluation_s"]["pruned"] = time.perf_counter() - start
    results = {"dense": dense_results}
    if pruned is not None:
        results["pruned"] = pruned_results
        retention = compare(results["dense"], results["pruned"])
        parts["retention"] = retention.to_dict()
        log.info("evaluation:\n%s", retention.to_markdown())
    parts["evaluation"] = {k: _strip(v) for k, v in results.items()}
    return parts


def harness_stage(c: RunConfig, dense, pruned, harness) -> dict:
    from .lm_eval import evaluate_harness

    return {name: evaluate_harness(m, c.eval.harness_tasks, limit=c.eval.limit, batch_size=c.eval.batch_size,
                                   manager=harness)["tasks"]
            for name, m in (("dense", dense), ("pruned", pruned)) if m is not None}


def save_stage(c: RunConfig, pruned, out: Path, inputs: Inputs, params_before: int | None = None) -> dict:
    """The pruned model as an Orbax checkpoint, a Hugging Face folder and a GGUF; what was written where."""
    from . import export
    from .distributed import main_only
    from .interrupts import deferred_interrupts
    from .models.model import with_compute_dtype

    outputs = {}
    with deferred_interrupts():  # Ctrl-C waits for the files to be whole
        pruned = with_compute_dtype(pruned, None)  # the checkpoint leaves the choice to whoever loads it
        if c.export.orbax:
            export.save_orbax_model(pruned, out / "model", overwrite=True)
            outputs["orbax"] = "model/ (streamline_jax.load)"
        gguf_ok = inputs.tokenizer_source is not None and not inputs.no_gguf
        if inputs.hf_ok or gguf_ok:  # gathered on every process (a collective); one process: read tensor by tensor
            from .distributed import host_readable

            host = pruned.replace(params=host_readable(pruned.params))
        if inputs.hf_ok:  # written by process 0
            main_only(export.export_hf)(host, out / "hf", overwrite=True)
            outputs["hf"] = "hf/ (transformers.AutoModelForCausalLM.from_pretrained)"
        elif c.export.hf:
            outputs["hf"] = f"not written: an `{c.prune.replacement}` block has no stock Hugging Face form"
        if gguf_ok:
            outputs["gguf"] = _save_gguf(c, host, out, inputs.tokenizer_source, params_before)
        elif c.export.gguf:  # said when the save stage would write it, not before the run (it may fail first)
            outputs["gguf"] = f"not written: {inputs.no_gguf}"
            log.warning("no GGUF export: %s", inputs.no_gguf)
    return outputs


def _save_gguf(c: RunConfig, host, out: Path, source: Path, params_before: int | None) -> str:
    from .distributed import main_only
    from .export_gguf import export_gguf, gguf_path

    path = gguf_path(out, c.model.source, c.export.gguf_type)
    facts = {"base_model": c.model.hub_id or c.model.source, "params_before": params_before}
    main_only(export_gguf)(host, path, c.export.gguf_type, tokenizer_source=source, facts=facts)
    return f"{path.relative_to(out)} (llama-cli -m {path.relative_to(out)}; ollama: FROM ./{path.name})"


@dataclasses.dataclass(frozen=True)
class RunContext:
    """One run as `run` starts it: its settings, the folder it writes and how it runs."""

    config: RunConfig
    out: Path  # the folder written: `--out`, or the staging folder beside it under --overwrite
    stages: tuple[str, ...]
    inputs: Inputs
    times: StageTimes  # filled in as the stages finish
    started: float  # time.perf_counter() when `run` began
    resume: bool = False
    preset: str | None = None
    target: str | None = None  # the meshes.yaml target named on the command line
    progress: bool = True
    shared: SharedWork | None = None  # a sweep's work shared between its points
    command: str | None = None  # the command line, for the model card


def _run(ctx: RunContext) -> dict:
    import jax

    from .distributed import main_only
    from .report import write_report

    c, out, stages, times, inputs = ctx.config, ctx.out, ctx.stages, ctx.times, ctx.inputs
    resume, preset, target, progress, shared = ctx.resume, ctx.preset, ctx.target, ctx.progress, ctx.shared
    log.info("output folder %s; stages %s", out, ", ".join(stages))
    owns_dense = shared is None  # a sweep's points share the dense model: each prunes it whole
    shared = shared if shared is not None else SharedWork()  # this run's own: calibration tokenized once
    report: dict[str, Any] = {"stages": list(stages), "config": c.to_dict(), "preset": preset,
                              "devices": [str(d) for d in jax.devices()], "finished": None, "command": ctx.command}
    with stage("load", times):
        dense, report["model"] = load_stage(c, preset, target, shared)
    staged = stage_layout("scoring", preset, target)
    # the layout (configs/meshes.yaml) each stage ran on; None: the mesh.* settings, or one device
    report["layouts"] = {"load, score, evaluate": str(staged[1]) if staged else None}
    scores = choices = pruned = history = None
    if "score" in stages:
        with stage("score", times):
            scores, choices, parts = score_stage(c, dense, inputs.calib_source, progress, shared,
                                                _load_key(c, preset, target), inputs, out, resume)
        report.update(parts)
    if "prune" in stages:
        with stage("prune", times):
            dense, pruned, parts = prune_stage(c, dense, choices, inputs.calib_source, shared, owns_dense)
        report.update(parts)
    if "train" in stages and c.prune.replacement not in ("none", "linear"):  # `linear` is fitted, not trained
        with stage("train", times):
            pruned, history = train_stage(c, dense, pruned, inputs, out, resume, progress, preset, target)
        report["training"] = history
        report["layouts"]["train"] = history.get("layout")
        if "distill_layout" in history:
            report["layouts"]["distill"] = history["distill_layout"]
    if "evaluate" in stages and inputs.tasks:
        with stage("evaluate", times):
            report.update(evaluate_stage(c, dense, pruned, inputs.tasks, progress, shared))
    if inputs.harness is not None:
        with stage("harness", times):
            report["harness"] = harness_stage(c, dense, pruned, inputs.harness)
    if pruned is not None and c.samples.prompts and "evaluate" in stages:
        with stage("samples", times):
            from .generation import side_by_side

            report["samples"] = side_by_side({"dense": dense, "pruned": pruned}, list(c.samples.prompts),
                                             c.samples.max_new_tokens)
    outputs = {}
    if "save" in stages:
        params_before = dense.num_params
        if owns_dense:  # the dense model's own layers (the cut span's) are not written: freed before the save
            shared.models, dense = {}, None
            release_host_memory()
        with stage("save", times):
            outputs = save_stage(c, pruned, out, inputs, params_before)
    report["outputs"] = outputs
    report["skipped_records"] = inputs.skipped_records()
    times["total"] = time.perf_counter() - ctx.started
    report["stage_times"] = times
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    chosen = (choices[0].start, choices[0].length) if choices else None
    report = main_only(write_report)(report, out, scores, chosen, history) or report
    if (out / "hf" / "config.json").exists() and "save" in stages:
        from .export_gguf import gguf_license
        from .model_card import write_model_card

        main_only(write_model_card)(report, out / "hf", gguf_license(inputs.tokenizer_source))
    main_only(write_atomic)(out / DONE, report["finished"] + "\n")  # last: the folder is finished
    main_only(shutil.rmtree)(out / PAIR_CACHE, ignore_errors=True)  # only a resume of this run needed it
    log.info("report: %s", out / "report.md")
    return report


def stage_layout(stage: str, preset: str | None, target: str | None):
    """(mesh, layout) configs/meshes.yaml gives a stage (scoring, mse, lm) on the named target, else on the target
    matching the devices found; None when there is neither (one device, or the mesh.* settings)."""
    import jax

    from . import mesh_layouts

    if target is None and (jax.device_count() == 1 or mesh_layouts.pick_target() is None):
        return None
    return mesh_layouts.stage_mesh(stage, target=target, model=preset)


def scoring_mesh(c: RunConfig, preset: str | None, target: str | None):
    """The mesh the model loads onto (and scores and evaluates on): the scoring stage's layout from
    configs/meshes.yaml (see `stage_layout`), else the mesh.* settings. One device: no mesh. Training runs on its
    own stage's layout (`train_stage`)."""
    import jax

    from .sharding import make_mesh

    staged = stage_layout("scoring", preset, target)
    if staged is not None:
        mesh, layout = staged
        log.info("mesh layout %s for scoring: %s", target or "matching the devices", layout)
        return mesh
    if jax.device_count() == 1:
        return None
    return make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)


def _evaluate(ev, model, tasks, c: RunConfig, progress: bool) -> dict | list[dict]:
    """`ev.evaluate` with the run's limits (perplexity windows, multiple-choice items); a list for a ModelGroup."""
    from .tasks import PerplexityTask

    ppl = [t for t in tasks if isinstance(t, PerplexityTask)]
    mc = [t for t in tasks if not isinstance(t, PerplexityTask)]
    merged = None
    for kind, limit in ((ppl, c.eval.ppl_windows), (mc, c.eval.limit)):
        if kind:
            res = ev.evaluate(model, kind, limit=limit, batch_size=c.eval.batch_size, progress=progress)
            res = res if isinstance(res, list) else [res]
            merged = res if merged is None else [{**m, "tasks": {**m["tasks"], **r["tasks"]}}
                                                 for m, r in zip(merged, res)]
    return merged if isinstance(model, ev.ModelGroup) else merged[0]


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    return a == b


def _check_architecture(c: RunConfig, loaded) -> None:
    arch = c.model.architecture
    if not arch:
        return
    diff = {k: (v, getattr(loaded, k)) for k, v in arch.items()
            if k not in ("dtype", "model_type") and not _same(getattr(loaded, k), v)}
    if diff:
        log.warning("the loaded model differs from the preset's architecture in %s",
                    ", ".join(f"{k} (preset {a}, loaded {b})" for k, (a, b) in diff.items()))


