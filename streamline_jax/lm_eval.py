"""lm-evaluation-harness (EleutherAI's `lm-eval`) on any model streamline-jax loads or prunes.

`StreamlineLM` is registered in lm-eval as `streamline-jax`: it scores `loglikelihood` (with is_greedy) and
`loglikelihood_rolling` requests with the jitted, length-bucketed scorer of `evaluation.py` (the same code as our own
evaluator), and answers `generate_until` with the KV-cache generation of `generation.py`. Tokenization, BOS and
truncation follow lm-eval's `hf` model, so the two give the same numbers on the same weights.

    python -m streamline_jax.lm_eval --model streamline-jax --model_args pretrained=smollm2-135m
        --tasks piqa_local --limit 50

takes lm-eval's own command line. `piqa_local` and `wikitext_local` are offline task files over the shared data
(`write_offline_tasks`), added when no --include_path is given. lm-eval is an optional extra: `pip install lm-eval`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

try:
    import lm_eval.models  # noqa: F401  the built-in models first: registering ours alone would hide them
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, \
        postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("streamline_jax.lm_eval needs lm-evaluation-harness: pip install 'streamline-jax[lm-eval]' "
                      "(or pip install lm-eval)") from e

import numpy as np

from .evaluation import length_bucket, loglikelihood_tokens
from .models.model import Model

log = logging.getLogger(__name__)

MODEL_NAME = "streamline-jax"
OFFLINE_TASKS = ("piqa_local", "wikitext_local")
# generation options of lm-eval's requests that `generate` honours; any other is refused by name
GEN_OPTIONS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


class StreamlineLMError(ValueError):
    """Bad model arguments or a request streamline-jax cannot answer; the message names the argument."""


class StreamlineLM(TemplateLM):
    """A streamline-jax model as an lm-eval model.

    pretrained: anything `streamline_jax.load` takes (an embedded name, a Hugging Face folder or hub id, a .gguf, an
        Orbax folder), or a pruned run's output folder (its `model/`); or pass `model=` an in-memory `Model`.
    dtype: parameter dtype when loading. batch_size: requests per call (packed rows for log-likelihoods; "auto"
        means the default, 32). max_length: the context (default: the model's). max_gen_toks: the default generation
        length. add_bos_token: override the tokenizer's own choice, as in lm-eval's `hf`. mesh: "auto" (all devices,
        fully sharded) or "DxFxT" (data x fsdp x tensor) to load onto a mesh; an in-memory model keeps its own.
    device, max_batch_size: accepted for lm-eval's command line; JAX places the work.
    """

    def __init__(self, pretrained: str | None = None, *, model: Model | None = None, dtype: str = "float32",
                 batch_size: int | str | None = 32, max_batch_size: int | None = None, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 pack_length: int | None = 256, mesh: Any = None, **unknown):
        super().__init__()
        if unknown:
            raise StreamlineLMError(
                f"unknown model argument(s) for {MODEL_NAME}: {', '.join(sorted(unknown))}; accepted: pretrained, "
                f"dtype, batch_size, max_length, max_gen_toks, add_bos_token, pack_length, mesh (and lm-eval's "
                f"device, max_batch_size)")
        if (pretrained is None) == (model is None):
            raise StreamlineLMError(f"{MODEL_NAME} needs exactly one of pretrained=<model> (a name, folder or file) "
                                    f"and model=<a loaded streamline_jax Model>")
        self.model = model if model is not None else load_pretrained(str(pretrained), dtype, parse_mesh(mesh))
        if self.model.tokenizer is None:
            raise StreamlineLMError(f"{pretrained or 'the model'} has no tokenizer; lm-eval sends text, so load a "
                                    f"model with one")
        self.tokenizer = self.model.tokenizer
        context = self.model.config.max_position_embeddings
        self.max_length = _positive_int("max_length", max_length if max_length is not None else context)
        if self.max_length > context:
            raise StreamlineLMError(f"max_length={self.max_length} is longer than the model's context of {context} "
                                    f"tokens (max_position_embeddings)")
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = add_bos_token
        self.pack_length = int(pack_length) if pack_length else None
        self.stats = {"tokens": 0, "seconds": 0.0, "compiles": 0}  # of the log-likelihood calls, for benchmarks

    # -- tokens ----------------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or MODEL_NAME).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's `hf`: the tokenizer's own special tokens unless told, none where the text starts with BOS."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring ---------------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if not requests:
            return []
        encoded = []
        for i, (args, context, continuation) in enumerate(requests):
            if not continuation:
                raise StreamlineLMError(f"request {i}: the continuation {args[1] if args else ''!r} encodes to no "
                                        f"tokens")
            if len(continuation) > self.max_length:
                raise StreamlineLMError(f"request {i}: the continuation is {len(continuation)} tokens, longer than "
                                        f"the model's context of {self.max_length} tokens")
            if len(context) + len(continuation) > self.max_length + 1:
                log.warning("request %d: context and continuation are %d tokens; the context is cut from the left "
                            "to fit %d (as lm-eval's hf model does)", i, len(context) + len(continuation),
                            self.max_length)
            encoded.append((context, continuation))
        sums, _, greedy, stats = loglikelihood_tokens(self.model, encoded, batch_size=self.batch_size,
                                                      max_length=self.max_length, pack_length=self.pack_length,
                                                      progress=not disable_tqdm)
        for key in self.stats:
            self.stats[key] += stats[key]
        out = [(float(s), bool(g)) for s, g in zip(sums, greedy)]
        for (args, _, _), answer in zip(requests, out):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods in disjoint windows of max_length tokens, as lm-eval's `hf` model."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = np.zeros(len(requests))
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # -- generation ------------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations with our KV-cache `generate`, cut at the stop sequences and EOS.

        Requests are grouped by their generation options and run longest first in batches of `batch_size`, each
        padded to a power of two rows and a length bucket, so that few shapes compile."""
        from .generation import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            options = self._generation_options(requests[indices[0]].args[1])
            until = handle_stop_sequences(options.pop("until"), eos=eos_text)
            max_gen_toks = options.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise StreamlineLMError(f"max_gen_toks={max_gen_toks} leaves no room for the prompt in the model's "
                                        f"context of {self.max_length} tokens")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks)
                       for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for k in range(0, len(order), self.batch_size):
                batch = order[k:k + self.batch_size]
                rows = [prompts[i] for i in batch]
                rows += [rows[-1]] * ((1 << (len(rows) - 1).bit_length()) - len(rows))  # a power of two rows
                longest = max(len(r) for r in rows)
                result = generate(self.model, rows, max_gen_toks, stop=[s for s in until if s], **options,
                                  prompt_bucket=length_bucket(longest, self.max_length - max_gen_toks))
                for i, tokens in zip(batch, result.tokens):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generation_options(self, gen_kwargs: dict) -> dict:
        if not isinstance(gen_kwargs, dict):
            raise StreamlineLMError(f"generation options must be a dict, got {gen_kwargs!r}")
        options = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unsupported = sorted(set(options) - set(GEN_OPTIONS))
        if unsupported:
            raise StreamlineLMError(f"generation option(s) {', '.join(unsupported)} are not supported by "
                                    f"{MODEL_NAME} (supported: {', '.join(GEN_OPTIONS)})")
        do_sample = options.pop("do_sample", False)
        temperature = float(options.pop("temperature", 0.0))
        options["temperature"] = temperature if do_sample else 0.0
        return options

    # -- chat ------------------------------------------------------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """As lm-eval's `hf`: without the generation prompt the last message is left open (continued), and a
        template that rejects the system role is retried without the system messages."""
        import jinja2

        if not getattr(self.tokenizer, "chat_template", None):
            raise StreamlineLMError("--apply_chat_template: the model's tokenizer has no chat template")

        def render(history):
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template failed; retrying without the system messages, as lm-eval's hf does")
            return render([message for message in chat_history if message["role"] != "system"])


def _positive_int(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise StreamlineLMError(f"{name} must be a positive integer, got {value!r}")
    return n


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return 32
    return _positive_int("batch_size", value)


def parse_mesh(mesh):
    """None, a jax Mesh, "auto" (every device on the fsdp axis) or "DxFxT" (data x fsdp x tensor sizes)."""
    if mesh is None or not isinstance(mesh, str):
        return mesh
    from .sharding import make_mesh

    if mesh == "auto":
        return make_mesh()
    if not re.fullmatch(r"-?\d+x-?\d+x-?\d+", mesh):
        raise StreamlineLMError(f"mesh must be 'auto' or DxFxT (data x fsdp x tensor, e.g. 1x8x1), got {mesh!r}")
    return make_mesh(*(int(s) for s in mesh.split("x")))


def load_pretrained(source: str, dtype: str = "float32", mesh=None) -> Model:
    """`streamline_jax.load`, plus a run's output folder (the pruned model it saved under `model/`)."""
    from .loading import ORBAX_MARKER, load

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / ORBAX_MARKER).exists():
        path = path / "model"
        source = str(path)
    try:
        return load(source, dtype=dtype, mesh=mesh)
    except (FileNotFoundError, ValueError) as e:
        raise StreamlineLMError(f"pretrained={source}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Offline task files over the shared data


def piqa_with_labels(dataset, labels_path: str):
    """PIQA items with their `label` from the labels file (one integer a line, as the shared data has them)."""
    from .tasks import read_labels

    labels = [label for _, label in read_labels(Path(labels_path))]
    if len(labels) != len(dataset):
        raise StreamlineLMError(f"{labels_path}: {len(labels)} labels for {len(dataset)} PIQA items")
    return dataset.add_column("label", labels)


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # an article's heading; sections are " = = ... = = "


def wikitext_pages(dataset):
    """WikiText lines (a `text` dataset) grouped into articles, as lm-eval's document-level wikitext: {"page"}."""
    import datasets

    pages: list[list[str]] = []
    for line in dataset["text"]:
        if WIKITEXT_TITLE.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    return datasets.Dataset.from_dict({"page": ["\n".join(p) + "\n" for p in pages]})


PIQA_YAML = """\
task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {items}
output_type: multiple_choice
validation_split: validation
process_docs: !function streamline_tasks.piqa_docs
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
should_decontaminate: true
doc_to_decontamination_query: goal
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

WIKITEXT_YAML = """\
task: wikitext_local
dataset_path: text
dataset_kwargs:
  data_files:
    test: {text}
output_type: loglikelihood_rolling
test_split: test
process_docs: !function streamline_tasks.wikitext_docs
doc_to_text: ""
doc_to_target: !function streamline_tasks.wikitext_detokenizer
process_results: !function streamline_tasks.process_results
should_decontaminate: true
doc_to_decontamination_query: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 2.0
"""

TASKS_PY = """\
# Written by streamline_jax.lm_eval.write_offline_tasks: the shared data's paths are filled in.
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

from streamline_jax.lm_eval import piqa_with_labels, wikitext_pages

PIQA_LABELS = {labels!r}


def piqa_docs(dataset):
    return piqa_with_labels(dataset, PIQA_LABELS)


def wikitext_docs(dataset):
    return wikitext_pages(dataset)
"""


def write_offline_tasks(folder, data_dir=None) -> Path:
    """lm-eval task files for the shared data (`piqa_local`: PIQA validation as lm-eval's `piqa`;
    `wikitext_local`: WikiText-2 test as lm-eval's document-level `wikitext`), written into `folder` with the data's
    absolute paths filled in (the data itself is read from where it lies). Returns the folder, for --include_path."""
    from .tasks import shared_data_dir

    data = Path(data_dir) if data_dir is not None else shared_data_dir()
    files = {"items": data / "piqa" / "valid.jsonl", "labels": data / "piqa" / "valid-labels.lst",
             "text": data / "wikitext-2-raw" / "wiki.test.raw"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise StreamlineLMError(f"shared data not found: {', '.join(missing)} (set $STREAMLINE_JAX_DATA or pass "
                                f"data_dir)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: str(p.resolve()) for k, p in files.items()}
    (folder / "piqa_local.yaml").write_text(PIQA_YAML.format(items=json.dumps(paths["items"])))
    (folder / "wikitext_local.yaml").write_text(WIKITEXT_YAML.format(text=json.dumps(paths["text"])))
    (folder / "streamline_tasks.py").write_text(TASKS_PY.format(labels=paths["labels"]))
    return folder


def offline_tasks_folder() -> Path | None:
    """The offline task files for the shared data ($STREAMLINE_JAX_DATA or ../shared/data), written into the cache
    (a folder per data folder); None when the data is absent."""
    import hashlib

    from .loading import cache_dir
    from .tasks import shared_data_dir

    data = shared_data_dir().resolve()
    key = hashlib.sha256(str(data).encode()).hexdigest()[:12]
    try:
        return write_offline_tasks(cache_dir() / "lm_eval_tasks" / key, data)
    except StreamlineLMError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Python entry point (the pipeline's eval.harness_tasks) and the command line


def task_manager(include_path=None):
    """lm-eval's TaskManager over its own tasks, `include_path` and the offline tasks (when the shared data is
    there). Indexing lm-eval's thousands of task files takes seconds: make one and pass it on."""
    from lm_eval.tasks import TaskManager

    paths = [p for p in ([include_path] if include_path else []) + [offline_tasks_folder()] if p]
    return TaskManager(include_path=[str(p) for p in paths] or None)


def check_tasks(tasks, manager=None):
    """The TaskManager (`task_manager()` unless given), once every name in `tasks` is a task or group it knows."""
    manager = manager or task_manager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise StreamlineLMError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`; offline: "
                                f"{', '.join(OFFLINE_TASKS)})")
    return manager


def evaluate_harness(model: Model, tasks, *, limit: int | None = None, batch_size: int = 32, manager=None,
                     **simple_evaluate_args) -> dict:
    """lm-eval's `simple_evaluate` on an in-memory model: {"tasks": {task: {metric: value}}} (stderr entries
    dropped; `n` the number of items), and lm-eval's full results under "lm_eval". `manager`: see `task_manager`."""
    from lm_eval import simple_evaluate

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    manager = check_tasks(tasks, manager)
    lm = StreamlineLM(model=model, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, **simple_evaluate_args)
    scores = {task: {("n" if k == "sample_len" else k.split(",")[0]): v for k, v in metrics.items()
                     if "_stderr" not in k and isinstance(v, (int, float))}
              for task, metrics in results["results"].items()}
    return {"tasks": scores, "lm_eval": results}


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with `streamline-jax` registered (and the offline tasks without --include_path)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("-h", "--help", "ls", "validate") and "--include_path" not in argv \
            and not any(a.startswith("--include_path=") for a in argv):
        folder = offline_tasks_folder()
        if folder is not None:
            argv += ["--include_path", str(folder)]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except StreamlineLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from streamline_jax.lm_eval import main as registered_main  # the importable module, whose class is registered

    sys.exit(registered_main())
else:
    register_model(MODEL_NAME)(StreamlineLM)
