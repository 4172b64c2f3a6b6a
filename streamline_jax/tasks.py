"""Declarative zero-shot tasks: where the items come from, how to build contexts and choices, where the label is.

The descriptions follow lm-evaluation-harness's task configs (same prompts, choices and labels), so our accuracies
are comparable to its figures. A task reads a local jsonl file (1-based line numbers in every error) or a `datasets`
source; hub tasks can be pointed at a local file in the hub format with `task.replace(source=path)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Callable, Iterator


class TaskFileError(ValueError):
    """A task's items or labels are malformed; the message names the file and the 1-based line."""


def shared_data_dir() -> Path:
    """The `{data}` folder: $STREAMLINE_JAX_DATA, ../shared/data beside a checkout, else the hub's copy in the cache
    (streamline_jax.data_sources; `data_sources.provide` fills that copy before a run)."""
    from .data_sources import data_folder

    return data_folder()[0]


@dataclasses.dataclass(frozen=True)
class Task:
    """A multiple-choice task scored by log-likelihood.

    source: a jsonl path (`{data}` expands to the shared data folder) or a dict of `datasets.load_dataset` arguments.
    context: a template over the item's fields, e.g. "Question: {goal}\\nAnswer:".
    choices: templates, one per choice (("{sol1}", "{sol2}")), or the (dotted) name of a field holding the list.
    label: the (dotted) field holding the gold index; ignored when `labels_file` gives one integer a line.
    preprocess: the name of a function in PREPROCESSORS that rewrites each raw item first.
    fill_blank: WinoGrande-style partial scoring: each choice completes the context, and the scored continuation is
        the shared `continuation` template.
    target_delimiter: put between context and continuation (the harness's default " ").
    """

    name: str
    source: str | dict
    context: str
    choices: tuple[str, ...] | str
    label: str = "label"
    labels_file: str | None = None
    preprocess: str | None = None
    fill_blank: bool = False
    continuation: str | None = None
    target_delimiter: str = " "

    def __post_init__(self):
        if self.preprocess is not None and self.preprocess not in PREPROCESSORS:
            raise ValueError(f"task {self.name!r}: unknown preprocess {self.preprocess!r}; "
                             f"known: {sorted(PREPROCESSORS)}")
        if self.fill_blank and self.continuation is None:
            raise ValueError(f"task {self.name!r}: fill_blank needs a continuation template")
        if isinstance(self.choices, list):
            object.__setattr__(self, "choices", tuple(self.choices))

    @property
    def metrics(self) -> tuple[str, ...]:
        # with fill_blank every choice scores the same continuation, so length normalisation changes nothing
        return ("acc",) if self.fill_blank else ("acc", "acc_norm")

    def replace(self, **changes) -> "Task":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class PerplexityTask:
    """Perplexity of a text (see `evaluate.perplexity`) as one entry of `evaluate(model, tasks)`."""

    name: str
    source: Any
    window: int = 1024
    stride: int | None = None


@dataclasses.dataclass(frozen=True)
class Item:
    """One question, ready to score: a context and a continuation per choice."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]  # the choice texts whose lengths normalise acc_norm (characters) and acc_bytes
    label: int
    where: str  # "file:line" or "dataset[index]", for errors


# ---------------------------------------------------------------------------------------------------------------
# Preprocessors (the harness's utils.py for each task)


def _hellaswag_text(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": _hellaswag_text(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_text(e) for e in doc["endings"]], "label": int(doc["label"])}


def _lettered(doc: dict) -> dict:
    # ARC, OpenBookQA: the answer is a choice label ("A", "1"); the gold index is its position
    labels = list(doc["choices"]["label"])
    answer = str(doc["answerKey"]).strip()
    if answer not in labels:
        raise ValueError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return {**doc, "label": labels.index(answer)}


def _winogrande(doc: dict) -> dict:
    sentence = doc["sentence"]
    if "_" not in sentence:
        raise ValueError("sentence has no blank '_'")
    if str(doc["answer"]) not in ("1", "2"):
        raise ValueError(f"answer {doc['answer']!r} is not '1' or '2'")
    idx = sentence.index("_")
    return {**doc, "before": sentence[:idx], "after": sentence[idx + 1:].strip(), "label": int(doc["answer"]) - 1}


PREPROCESSORS: dict[str, Callable[[dict], dict]] = {
    "hellaswag": _hellaswag,
    "arc": _lettered,
    "openbookqa": _lettered,
    "winogrande": _winogrande,
}


# ---------------------------------------------------------------------------------------------------------------
# The tasks

PIQA = Task("piqa", "{data}/piqa/valid.jsonl", "Question: {goal}\nAnswer:", ("{sol1}", "{sol2}"),
            labels_file="{data}/piqa/valid-labels.lst")
HELLASWAG = Task("hellaswag", {"path": "Rowan/hellaswag", "split": "validation"}, "{query}", "choices",
                 preprocess="hellaswag")
ARC_EASY = Task("arc_easy", {"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "test"},
                "Question: {question}\nAnswer:", "choices.text", preprocess="arc")
ARC_CHALLENGE = ARC_EASY.replace(name="arc_challenge",
                                 source={"path": "allenai/ai2_arc", "name": "ARC-Challenge", "split": "test"})
BOOLQ = Task("boolq", {"path": "aps/super_glue", "name": "boolq", "split": "validation"},
             "{passage}\nQuestion: {question}?\nAnswer:", ("no", "yes"))
WINOGRANDE = Task("winogrande", {"path": "allenai/winogrande", "name": "winogrande_xl", "split": "validation"},
                  "{before}", ("{option1}", "{option2}"), preprocess="winogrande", fill_blank=True,
                  continuation="{after}")
OPENBOOKQA = Task("openbookqa", {"path": "allenai/openbookqa", "name": "main", "split": "test"}, "{question_stem}",
                  "choices.text", preprocess="openbookqa")
WIKITEXT2 = PerplexityTask("wikitext2", "{data}/wikitext-2-raw/wiki.test.raw", window=1024)

TASKS: dict[str, Task | PerplexityTask] = {t.name: t for t in (
    PIQA, HELLASWAG, ARC_EASY, ARC_CHALLENGE, BOOLQ, WINOGRANDE, OPENBOOKQA, WIKITEXT2)}


def get_task(task) -> Task | PerplexityTask:
    if isinstance(task, (Task, PerplexityTask)):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]


# ---------------------------------------------------------------------------------------------------------------
# Reading items


def resolve_path(path: str | os.PathLike) -> Path:
    return Path(str(path).replace("{data}", str(shared_data_dir())))


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, item) for every non-blank line; a line that is not a JSON object is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(doc, dict):
                raise TaskFileError(f"{path}:{n}: expected a JSON object, got {type(doc).__name__}")
            yield f"{path}:{n}", doc


def read_source(source) -> Iterator[tuple[str, dict]]:
    if isinstance(source, dict):
        import datasets

        ds = datasets.load_dataset(**source)
        name = "/".join(str(source[k]) for k in ("path", "name", "split") if source.get(k))
        for i, doc in enumerate(ds, 1):
            yield f"{name} item {i}", doc
    else:
        yield from read_jsonl(resolve_path(source))


def read_labels(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found")
    labels = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                labels.append((f"{path}:{n}", int(line)))
            except ValueError:
                raise TaskFileError(f"{path}:{n}: label {line.strip()!r} is not an integer") from None
    return labels


def _field(doc: dict, dotted: str):
    value = doc
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _render(template: str, doc: dict) -> str:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return template.format_map(_Fields({n: _field(doc, n) for n in names}))


def make_item(task: Task, doc: dict, where: str, label: int | None = None) -> Item:
    """Build one Item; any problem (missing field, bad label) is a TaskFileError naming `where`."""
    try:
        if task.preprocess:
            doc = PREPROCESSORS[task.preprocess](doc)
        context = _render(task.context, doc)
        if isinstance(task.choices, str):
            choices = _field(doc, task.choices)
            if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
                raise TaskFileError(f"{where}: field {task.choices!r} must be a list of strings")
            choices = tuple(choices)
        else:
            choices = tuple(_render(t, doc) for t in task.choices)
        if label is None:
            label = _field(doc, task.label)
    except KeyError as e:
        raise TaskFileError(f"{where}: missing field {e.args[0]!r} (task {task.name!r})") from None
    except (ValueError, TypeError) as e:
        if isinstance(e, TaskFileError):
            raise
        raise TaskFileError(f"{where}: {e} (task {task.name!r})") from None
    if len(choices) < 2:
        raise TaskFileError(f"{where}: task {task.name!r} needs at least two choices, got {len(choices)}")
    if isinstance(label, bool) or not isinstance(label, int) and not (isinstance(label, str) and label.isdigit()):
        raise TaskFileError(f"{where}: label {label!r} is not an integer")
    label = int(label)
    if not 0 <= label < len(choices):
        raise TaskFileError(f"{where}: label {label} is out of range for {len(choices)} choices")
    if task.fill_blank:
        continuation = task.target_delimiter + _render(task.continuation, doc)
        contexts, continuations = tuple(context + c for c in choices), (continuation,) * len(choices)
    else:
        contexts, continuations = (context,) * len(choices), tuple(task.target_delimiter + c for c in choices)
    return Item(contexts, continuations, choices, label, where)


def load_items(task: Task, limit: int | None = None) -> list[Item]:
    """Every item of `task` (the first `limit`), validated before any model work."""
    docs = read_source(task.source)
    labels = None
    if task.labels_file:
        labels = read_labels(resolve_path(task.labels_file))
    items = []
    for i, (where, doc) in enumerate(docs):
        if limit is not None and i >= limit:
            break
        label = None
        if labels is not None:
            if i >= len(labels):
                raise TaskFileError(f"{where}: no label for this item: {task.labels_file} has only "
                                    f"{len(labels)} labels")
            label_where, label = labels[i]
            where = f"{where} (label at {label_where})"
        items.append(make_item(task, doc, where, label))
    if labels is not None and limit is None and len(labels) != len(items):
        raise TaskFileError(f"{resolve_path(task.labels_file)}: {len(labels)} labels for {len(items)} items")
    if not items:
        raise TaskFileError(f"task {task.name!r}: no items in {task.source}")
    return items
