"""The checks before a run's work: data files, tasks, the tokenizer and the model's shape against the settings,
everything that needs no model weights, so that bad input fails before the output folder is touched."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .settings import ConfigError, RunConfig, check_against_model, peek_model_config

log = logging.getLogger(__name__)


def data_path(spec: str | None) -> str | None:
    """A data setting with `{data}` filled in where it names a file (or the data folder); else as given (a hub
    dataset's name)."""
    if spec is None:
        return None
    from .tasks import resolve_path

    path = resolve_path(spec)
    return str(path) if path.exists() or "{data}" in spec else spec


def _check_tokenizer_before_load(source: str):
    from .checkpoint import TOKENIZER_FILES, has_tokenizer

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "streamline_model.json").exists() and not has_tokenizer(path):
        raise ConfigError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}); "
                          f"calibration, training and evaluation need one: add it to the folder")


@dataclasses.dataclass
class Inputs:
    """What the checks before any work found: the data sources and tasks."""

    calib_source: Any
    train_source: Any
    valid_source: Any
    tasks: list
    hf_ok: bool
    harness: Any = None  # lm-eval's task manager, when eval.harness_tasks names tasks
    tokenizer_source: Path | None = None  # the GGUF (or HF folder) the GGUF export takes the tokenizer from
    no_gguf: str | None = None  # why no GGUF is written (export.gguf on)

    def skipped_records(self) -> dict:
        """{source: records without text skipped} for the data sources that skipped any (data.max_skipped_records)."""
        sources = {"calibration": self.calib_source, "valid": self.valid_source}
        if self.train_source is not self.calib_source:  # else training reads on in the calibration source
            sources["train"] = self.train_source
        return {name: s.skipped for name, s in sources.items() if getattr(s, "skipped", 0)}


def check_inputs(c: RunConfig, stages) -> Inputs:
    """Data files, tasks, the tokenizer and the model's shape against the settings: everything that needs no
    model weights, so that bad input fails before the output folder is touched."""
    from . import data
    from .data_sources import provide
    from .tasks import PerplexityTask, get_task, load_items

    d = c.data
    tasks = [get_task(t) for t in c.eval.tasks]
    self_prompts = d.self_prompts if d.distill_text == "self" else None
    # the `{data}` folder, before the model
    provide([d.calibration, d.train, d.valid, c.eval.perplexity_text, self_prompts] +
            [v for t in (tasks if "evaluate" in stages else ()) for v in dataclasses.asdict(t).values()])
    try:
        order = {"shuffle_buffer": d.shuffle_buffer, "shuffle_seed": d.shuffle_seed,
                 "max_skipped": d.max_skipped_records}
        calib_source = data.text_source(data_path(d.calibration), d.text_field, **order)
        train_spec = data_path(d.train)
        train_source = data.text_source(train_spec, d.text_field, **order) if train_spec else calib_source
        valid_source = data.text_source(data_path(d.valid), d.text_field, **order) if d.valid else None
        if d.distill_text == "self" and d.self_prompts:  # a missing or empty prompts file fails here
            from .self_data import read_prompts

            read_prompts(data_path(d.self_prompts))
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    if c.eval.perplexity_text:
        path = data_path(c.eval.perplexity_text)
        if not Path(path).is_file():
            raise ConfigError(f"eval.perplexity_text: file not found: {path}")
        tasks.append(PerplexityTask("text", path, window=c.eval.window))
    if "evaluate" in stages:
        for t in tasks:
            if not isinstance(t, PerplexityTask):
                load_items(t, c.eval.limit)  # a missing or malformed task file fails here
    harness = None
    if "evaluate" in stages and c.eval.harness_tasks:
        from .lm_eval import check_tasks

        harness = check_tasks(c.eval.harness_tasks)  # lm-eval's task index; an unknown name fails here
    hf_ok = c.export.hf and "save" in stages
    if hf_ok and c.prune.replacement in ("mlp", "linear"):
        log.warning("an `%s` block cannot be exported to a stock Hugging Face architecture: writing the Orbax "
                    "checkpoint only", c.prune.replacement)
        hf_ok = False
    _check_tokenizer_before_load(c.model.source)
    model_config = peek_model_config(c)
    if model_config is not None:
        check_against_model(c, model_config)
        for t in tasks:
            if isinstance(t, PerplexityTask) and "evaluate" in stages and t.window > model_config.max_position_embeddings:
                raise ConfigError(f"the {t.name} perplexity window of {t.window} tokens (eval.window) is longer than "
                                  f"the model's context of {model_config.max_position_embeddings} tokens")
    gguf_tokenizer, no_gguf = _gguf_plan(c, stages, model_config)
    return Inputs(calib_source, train_source, valid_source, tasks, hf_ok, harness, gguf_tokenizer, no_gguf)


def _gguf_plan(c: RunConfig, stages, model_config) -> tuple[Path | None, str | None]:
    """(the GGUF to copy the tokenizer from, why no GGUF is written) for export.gguf."""
    from .export_gguf import gguf_unavailable
    from .loading import tokenizer_source

    if not (c.export.gguf and "save" in stages):
        return None, None
    try:
        source = tokenizer_source(c.model.source)
    except FileNotFoundError:  # an embedded model whose package is missing: the load stage says so
        source = None
    return source, gguf_unavailable(model_config, c.prune.replacement, c.export.gguf_type, source)
