"""Generative tasks, scored the way lm-evaluation-harness scores `generate_until`.

A task is declared like the multiple-choice tasks in `streamline_jax.tasks`: where the items come from, a prompt
template over their fields, stop sequences, the field holding the reference, and how to pull the answer out of a
reference and out of a continuation. The model continues each prompt greedily until a stop sequence (or EOS, or
`max_new_tokens`); the score is exact match between the two extracted answers, after `normalise`.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Callable

from .generation import generate
from .models.model import Model
from .tasks import TaskFileError, read_source

# ---------------------------------------------------------------------------------------------------------------
# Normalisation and answer extractors

_TRAILING_PUNCTUATION = ".,;:!?"


def normalise(text: str) -> str:
    """Exact-match normalisation: strip whitespace, lowercase, drop trailing punctuation."""
    return text.strip().lower().rstrip(_TRAILING_PUNCTUATION).strip()


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _clean_number(s: str) -> str:
    """'$1,234.50' -> '1234.5', '72.0' -> '72': the same quantity written the same way."""
    s = s.replace("$", "").replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def first_number(text: str) -> str:
    """The first number in the text (commas, '$' and a trailing '.0' dropped), or '' if there is none."""
    m = _NUMBER.search(text)
    return _clean_number(m.group()) if m else ""


def gsm8k_answer(text: str) -> str:
    """GSM8K: the first number after the last '####' (the dataset's answer marker, which the few-shot examples teach
    the model to write); without a marker, the last number in the text (the harness's 'flexible-extract')."""
    if "####" in text:
        return first_number(text.rsplit("####", 1)[1])
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else ""


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "text": lambda s: s,
    "first_number": first_number,
    "gsm8k": gsm8k_answer,
}


# ---------------------------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass(frozen=True)
class GenerativeTask:
    """A task scored by exact match on a greedy continuation.

    source: a jsonl path (`{data}` expands to the shared data folder) or a dict of `datasets.load_dataset` arguments.
    prompt: a template over the item's fields, e.g. "Question: {question}\\nAnswer:".
    reference: the field holding the reference answer.
    stop: stop sequences; the continuation is cut before the first one.
    extract: the name of an EXTRACTORS entry, applied to the reference and to the continuation before normalising.
    fewshot_source / num_fewshot: solved examples put before each prompt, the first `num_fewshot` items of
        `fewshot_source`, each as prompt + target_delimiter + reference, separated by `fewshot_delimiter`.
    """

    name: str
    source: str | dict
    prompt: str
    reference: str
    stop: tuple[str, ...] = ()
    extract: str = "text"
    max_new_tokens: int = 256
    fewshot_source: str | dict | None = None
    num_fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"

    def __post_init__(self):
        if self.extract not in EXTRACTORS:
            raise ValueError(f"task {self.name!r}: unknown extract {self.extract!r}; known: {sorted(EXTRACTORS)}")
        if self.num_fewshot and self.fewshot_source is None:
            raise ValueError(f"task {self.name!r}: num_fewshot={self.num_fewshot} needs a fewshot_source")
        object.__setattr__(self, "stop", tuple(self.stop))

    def replace(self, **changes) -> "GenerativeTask":
        return dataclasses.replace(self, **changes)


# lm-evaluation-harness's `gsm8k` (5-shot there; here the shots come from the train split's first items).
GSM8K = GenerativeTask(
    "gsm8k", {"path": "openai/gsm8k", "name": "main", "split": "test"}, "Question: {question}\nAnswer:",
    reference="answer", stop=("Question:", "</s>", "<|im_end|>"), extract="gsm8k", max_new_tokens=256,
    fewshot_source={"path": "openai/gsm8k", "name": "main", "split": "train"}, num_fewshot=5)

GENERATIVE_TASKS: dict[str, GenerativeTask] = {t.name: t for t in (GSM8K,)}


@dataclasses.dataclass(frozen=True)
class GenerativeItem:
    prompt: str  # with the few-shot examples
    reference: str  # the extracted, normalised answer
    where: str


def _render(template: str, doc: dict, where: str, task: str) -> str:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    missing = [f for f in fields if f not in doc]
    if missing:
        raise TaskFileError(f"{where}: missing field {missing[0]!r} (task {task!r})")
    return template.format(**{f: doc[f] for f in fields})


def _reference(task: GenerativeTask, doc: dict, where: str) -> str:
    if task.reference not in doc:
        raise TaskFileError(f"{where}: missing field {task.reference!r} (task {task.name!r})")
    return str(doc[task.reference])


def load_generative_items(task: GenerativeTask, limit: int | None = None) -> list[GenerativeItem]:
    """Every item (the first `limit`), with its few-shot prefix and extracted reference; checked before any model
    work. An item whose reference yields no answer is an error naming it."""
    shots = ""
    if task.num_fewshot:
        examples = []
        for where, doc in read_source(task.fewshot_source):
            if len(examples) == task.num_fewshot:
                break
            examples.append(_render(task.prompt, doc, where, task.name) + task.target_delimiter
                            + _reference(task, doc, where))
        if len(examples) < task.num_fewshot:
            raise TaskFileError(f"task {task.name!r}: num_fewshot={task.num_fewshot} but {task.fewshot_source} "
                                f"has only {len(examples)} items")
        shots = task.fewshot_delimiter.join(examples) + task.fewshot_delimiter
    items = []
    for where, doc in read_source(task.source):
        if limit is not None and len(items) >= limit:
            break
        reference = normalise(EXTRACTORS[task.extract](_reference(task, doc, where)))
        if not reference:
            raise TaskFileError(f"{where}: the reference gives no answer with extract={task.extract!r} "
                                f"(task {task.name!r})")
        items.append(GenerativeItem(shots + _render(task.prompt, doc, where, task.name), reference, where))
    if not items:
        raise TaskFileError(f"task {task.name!r}: no items in {task.source}")
    return items


def evaluate_generative(model: Model, task: GenerativeTask | str, *, limit: int | None = None, batch_size: int = 8,
                        max_new_tokens: int | None = None, chat: bool = False, prompt_bucket: int = 64) -> dict:
    """Exact match of the greedy continuations. Returns {'exact_match', 'n', 'samples': [{prompt, continuation,
    answer, reference, correct}]}."""
    if isinstance(task, str):
        if task not in GENERATIVE_TASKS:
            raise KeyError(f"unknown generative task {task!r}; known: {sorted(GENERATIVE_TASKS)}")
        task = GENERATIVE_TASKS[task]
    if model.tokenizer is None:
        raise ValueError("generative evaluation needs a tokenizer; the model has none")
    items = load_generative_items(task, limit)
    extract = EXTRACTORS[task.extract]
    samples = []
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        prompts = [it.prompt for it in batch]
        prompts += prompts[-1:] * (batch_size - len(batch))  # a full last batch: no compile for a new batch size
        out = generate(model, prompts, max_new_tokens or task.max_new_tokens, stop=task.stop, chat=chat,
                       prompt_bucket=prompt_bucket)
        for item, text in zip(batch, out.texts):
            answer = normalise(extract(text))
            samples.append(dict(where=item.where, prompt=item.prompt, continuation=text, answer=answer,
                                reference=item.reference, correct=answer == item.reference))
    return {"exact_match": sum(s["correct"] for s in samples) / len(samples), "n": len(samples), "samples": samples}
