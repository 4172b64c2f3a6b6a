"""Stage 5, evaluate: perplexity and zero-shot multiple choice scored like lm-evaluation-harness (retention.py
compares a dense and a pruned model's results).

Every score comes from one jitted function, the log-probability of each target token given its prefix. Inputs are
right-padded into a few fixed shapes (length buckets, a fixed batch), so a new length does not mean a new compile.
Several models can be scored together (`model_group`: a dense model and its pruned copy), each call running what
they share (the embeddings and the layers before the pruned span) once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .backend import jit_by_config
from .models import transformer, vocab_slices
from .models.model import Model
from .sharding import place_batch
from .tasks import Item, PerplexityTask, Task, get_task, load_items, resolve_path


class EvaluationError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The one jitted scoring function


HEAD_CHUNK = 128  # tokens per LM-head call when scoring: their [128, V] logits stay small enough to stay in cache


@jit_by_config(static_argnames=("config", "with_greedy"))
def target_logprobs(config, params, input_ids, targets, attention_mask=None, segment_ids=None, positions=None,
                    shared_prefix_ids=None, with_greedy=False):
    """log p(targets[b, t] | input_ids[b, :t+1]) as [B, T] float32 (within its own segment, and the prefix it
    shares, for packed rows: see `transformer.apply`). With `with_greedy`, also [B, T] bool: whether each target is
    the argmax token (the harness's is_greedy).

    The LM head runs HEAD_CHUNK tokens at a time, and each chunk's logits are reduced to (target logit,
    logsumexp) at once: the [B, T, V] float32 logits are never written out whole."""
    hidden = transformer.apply(config, params, input_ids, attention_mask, positions, segment_ids=segment_ids,
                               shared_prefix_ids=shared_prefix_ids, return_logits=False)["last_hidden"]
    return head_logprobs(config, params, hidden, targets, with_greedy=with_greedy)


def head_logprobs(config, params, hidden, targets, with_greedy=False):
    """log softmax(head(hidden))[targets] for [B, T, D] last hidden states, HEAD_CHUNK tokens at a time (and, with
    `with_greedy`, whether each target is the argmax)."""
    b, t, d = hidden.shape
    n = b * t
    if transformer.converts_head(config):  # a slice of the vocabulary at a time for all tokens: each slice
        # converted once (in chunks of tokens, every chunk would convert the whole matrix again)
        features = transformer.head_features(config, params, hidden.reshape(n, d))
        out = vocab_slices.log_softmax_at(params, features, targets.reshape(n), config.final_logit_softcap,
                                          with_greedy)
        return jax.tree.map(lambda x: x.reshape(b, t), out)
    flat_hidden, flat_targets = transformer.chunk_tokens(HEAD_CHUNK, hidden.reshape(n, d), targets.reshape(n))

    def one_chunk(args):
        h, tg = args
        logits = transformer.head(config, params, h[None])[0]
        logprob = jnp.take_along_axis(logits, tg[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        return (logprob, jnp.argmax(logits, axis=-1) == tg) if with_greedy else logprob

    unchunk = lambda x: x.reshape(-1)[:n].reshape(b, t)
    return jax.tree.map(unchunk, jax.lax.map(one_chunk, (flat_hidden, flat_targets)))


@jit_by_config(static_argnames=("config", "shared", "with_greedy"))
def shared_prefix_logprobs(config, params, input_ids, targets, attention_mask=None, segment_ids=None, positions=None,
                           shared_prefix_ids=None, *, shared, with_greedy=False):
    """`target_logprobs` of several models at once (`config`, `params`: a tuple, one per model) whose embeddings and
    first `shared` layers are the same (`transformer.shared_prefix_depth`): those run once. A model whose parameters
    lack the head's (`heads_once`) reads the first model's. A tuple, one per model."""
    hidden = transformer.apply_shared_prefix(config, params, shared, input_ids, attention_mask, positions,
                                             segment_ids=segment_ids, shared_prefix_ids=shared_prefix_ids)
    first_head = {k: params[0][k] for k in transformer.HEAD_KEYS if k in params[0]}
    return tuple(head_logprobs(c, {**first_head, **p}, h, targets, with_greedy=with_greedy)
                 for c, p, h in zip(config, params, hidden))


def heads_once(params: Sequence[dict], same=None) -> tuple:
    """The parameters of models scored together by `shared_prefix_logprobs`, each later model's head leaves left
    out where they are the first model's (`same(a, b)`; default: the very same arrays): the step then reads, and
    with float32 products converts, that head once instead of once per model."""
    same = same or (lambda a, b: a is b)
    first = params[0]
    return (first,) + tuple({k: v for k, v in p.items() if not (k in transformer.HEAD_KEYS and k in first and all(
        same(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(first[k]))))} for p in params[1:])


@dataclasses.dataclass(frozen=True)
class ModelGroup:
    """Models scored on the same inputs, call by call: the embeddings and first `shared` layers they have in common
    run once (None: nothing in common, or one model: each runs on its own). See `model_group`."""

    models: tuple
    shared: int | None = None


def model_group(models: Sequence[Model]) -> ModelGroup:
    """Models to evaluate together (a dense model and its pruned copies): what every one shares with the first (the
    layers before a pruned span) runs once per call. They read the first model's tokenizer, so they must share it."""
    models = tuple(models)
    if not models:
        raise EvaluationError("no model to evaluate")
    first = models[0]
    for m in models[1:]:
        if m.config.vocab_size != first.config.vocab_size or not _same_tokenizer(m.tokenizer, first.tokenizer):
            raise EvaluationError("models evaluated together must share a tokenizer")
    shared = None
    if len(models) > 1 and all(m.mesh == first.mesh for m in models):
        depths = [transformer.shared_prefix_depth(first.config, first.params, m.config, m.params) for m in models[1:]]
        shared = None if None in depths else min(depths)
    return ModelGroup(models, shared)


def _same_tokenizer(a, b) -> bool:
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab())


def _grouped(model) -> tuple[ModelGroup, bool]:
    """(the group, whether a group was given): the functions below take one model or a ModelGroup, and answer for a
    group with a list, one entry per model."""
    return (model, True) if isinstance(model, ModelGroup) else (ModelGroup((model,)), False)


def _compiles() -> int:
    """Shapes compiled so far (jax's jit cache sizes; 0 where this jax lacks them: `backend.jit_cache_size`; 0 for a
    function that stands in for one, e.g. a test's spy)."""
    return sum(getattr(f, "cache_size", lambda: 0)() for f in (target_logprobs, shared_prefix_logprobs))


def _run(group: ModelGroup, input_ids: np.ndarray, targets: np.ndarray, with_greedy: bool = False,
         **rows: np.ndarray) -> list:
    """target_logprobs of each model on host arrays; `rows` is attention_mask= (padded rows) or segment_ids=,
    positions= and shared_prefix_ids= (packed rows).
    Returns per model [B, T] float64 log-probs, or (log-probs, [B, T] bool is-argmax) with `with_greedy`."""
    arrays = {"input_ids": input_ids, "targets": targets, **rows}
    arrays = {k: jnp.asarray(a, jnp.int32) for k, a in arrays.items()}
    models = group.models
    if group.shared is None:
        outs = [target_logprobs(m.config, m.params, **place_batch(m.mesh, arrays), with_greedy=with_greedy)
                for m in models]
    else:
        outs = shared_prefix_logprobs(tuple(m.config for m in models), heads_once([m.params for m in models]),
                                      **place_batch(models[0].mesh, arrays), shared=group.shared,
                                      with_greedy=with_greedy)
    if with_greedy:
        return [(np.asarray(out[0], np.float64), np.asarray(out[1], bool)) for out in outs]
    return [np.asarray(out, np.float64) for out in outs]


def length_bucket(n: int, cap: int | None = None) -> int:
    """The padded length for a sequence of n tokens: a multiple of 16 up to 128, then of an eighth of the power of
    two above n (under 25% padding, and a logarithmic number of shapes to compile)."""
    step = max(16, 1 << max(n - 1, 1).bit_length() >> 3)
    b = -(-n // step) * step
    return min(b, cap) if cap else b


def score_sequences(model: Model | ModelGroup, sequences: Sequence[np.ndarray], num_scored: Sequence[int], *,
                    batch_size: int = 32, fixed_length: int | None = None, pack_length: int | None = None,
                    desc: str | None = None, greedy: bool = False, share_prefixes: bool = True) -> tuple[list, dict]:
    """Log-probabilities of the last `num_scored[i]` tokens of each `sequences[i]` given the tokens before them.

    Sequences are sorted by length (longest first, so memory problems show at once), batched, right-padded to a
    length bucket (or `fixed_length`), and the batch is padded with empty rows to `batch_size`: every shape is one of
    a few, compiled once.

    With `pack_length`, short sequences are instead packed several to a row of `pack_length` tokens (or of the
    longest sequence's bucket, if longer), each seeing only itself; a call holds batch_size/4 rows (2,048 slots at
    32 x 256, what 32 unpacked requests of 64 tokens fill). One shape, almost no padding. There, with
    `share_prefixes`, sequences whose unscored beginnings are equal (the choices of a multiple-choice item) read
    that beginning once: each one's scored part follows it in the row as a branch that sees the prefix and itself,
    at the positions it has in the whole sequence (`transformer.apply`'s shared_prefix_ids). The log-probs are the
    same; the work is less by the repeated prefixes.

    Returns the per-token log-probs of each sequence in input order (with `greedy`, a (log-probs, is-argmax) pair
    per sequence; for a ModelGroup, a list of those, one per model), and stats (tokens, compiles, seconds, padding,
    and with packing `shared`: the tokens that shared prefixes spared).
    """
    if not len(sequences):
        raise EvaluationError("nothing to score")
    group, grouped = _grouped(model)
    start, compiles = time.perf_counter(), _compiles()
    outs: list = [[None] * len(sequences) for _ in group.models]
    tokens = sum(len(s) - 1 for s in sequences)
    slots = filled = 0
    if pack_length:
        length, batches = packed_calls(sequences, num_scored, pack_length, max(1, batch_size // 4), share_prefixes)
    else:
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        batches = _batches([[i] for i in order], batch_size)
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        if pack_length:
            arrays, where = _packed_rows(batch, length)
        else:
            arrays, where = _padded_rows(sequences, batch, fixed_length or length_bucket(
                max(len(sequences[r[0]]) for r in batch if r) - 1,
                min(m.config.max_position_embeddings for m in group.models)))
        slots += arrays["input_ids"].size
        filled += int(np.count_nonzero(arrays["segment_ids" if pack_length else "attention_mask"]))
        for out, scored in zip(outs, _run(group, with_greedy=greedy, **arrays)):
            for i, row, end in where:
                part = slice(end - num_scored[i], end)
                out[i] = (scored[0][row, part], scored[1][row, part]) if greedy else scored[row, part]
    stats = {"tokens": tokens, "compiles": _compiles() - compiles, "seconds": time.perf_counter() - start,
             "padding": 1 - filled / max(slots, 1)}
    if pack_length:
        stats["shared"] = tokens - filled
    return (outs if grouped else outs[0]), stats


def _padded_rows(sequences, batch, length) -> tuple[dict, list]:
    """One sequence a row, right-padded to `length`: the arrays for `_run`, and (sequence, row, end slot) each."""
    ids, targets, mask = (np.zeros((len(batch), length), np.int32) for _ in range(3))
    where = []
    for row, members in enumerate(batch):
        for i in members:
            n = len(sequences[i]) - 1
            ids[row, :n], targets[row, :n], mask[row, :n] = sequences[i][:-1], sequences[i][1:], 1
            where.append((i, row, n))
    return {"input_ids": ids, "targets": targets, "attention_mask": mask}, where


def packed_calls(sequences, num_scored, pack_length: int, rows_per_call: int,
                 share_prefixes: bool = True) -> tuple[int, list[list[list["PackedUnit"]]]]:
    """How `score_sequences` packs: the row length (`pack_length`, or the longest sequence's bucket if longer) and
    the calls, each a list of rows (padded with empty rows as `_batches` does), each row a list of units."""
    length = max(pack_length, length_bucket(max(len(s) for s in sequences) - 1))
    units = _packing_units(sequences, num_scored, length, share_prefixes)
    rows = pack_first_fit([u.slots for u in units], length)
    return length, _batches([[units[j] for j in row] for row in rows], rows_per_call)


@dataclasses.dataclass
class PackedUnit:
    """What packing places in a row: a prefix read once (maybe empty) and branches after it, each (sequence, the
    tokens it reads, its targets) at positions continuing the prefix's."""

    prefix: np.ndarray
    branches: list

    @property
    def slots(self) -> int:
        return len(self.prefix) + sum(len(read) for _, read, _ in self.branches)


def _packing_units(sequences, num_scored, capacity, share_prefixes) -> list[PackedUnit]:
    """Sequences as packing units, longest first: alone, or (`share_prefixes`) grouped by their unscored beginning
    when two or more begin alike with at least 2 unscored tokens, a group split where it would overflow a row."""
    groups: dict[bytes, list[int]] = {}
    for i, seq in enumerate(sequences):
        unscored = len(seq) - num_scored[i]
        key = np.asarray(seq[:unscored], np.int64).tobytes() if share_prefixes and unscored >= 2 else i
        groups.setdefault(key, []).append(i)
    units = []
    for members in groups.values():
        if len(members) == 1:
            seq = sequences[members[0]]
            units.append(PackedUnit(seq[:0], [(members[0], seq[:-1], seq[1:])]))
            continue
        first = sequences[members[0]]
        u = len(first) - num_scored[members[0]]  # the prefix reads first[:u-1]; each branch from token u-1 on
        unit = PackedUnit(first[:u - 1], [])
        for i in members:
            seq = sequences[i]
            branch = (i, seq[u - 1:-1], seq[u:])
            if unit.branches and unit.slots + len(branch[1]) > capacity:
                units.append(unit)
                unit = PackedUnit(first[:u - 1], [])
            unit.branches.append(branch)
        units.append(unit)
    return sorted(units, key=lambda unit: -unit.slots)


def _packed_rows(batch, length) -> tuple[dict, list]:
    """Rows of packing units: the arrays for `_run` (segment ids from 1 in each row, the shared prefix's segment
    for each branch token, positions), and (sequence, row, end slot) for each branch."""
    ids, targets, segments, prefixes, positions = (np.zeros((len(batch), length), np.int32) for _ in range(5))
    where = []
    for row, units in enumerate(batch):
        offset, segment = 0, 0
        for unit in units:
            a = len(unit.prefix)
            prefix_segment = 0
            if a:
                segment += 1
                prefix_segment = segment
                ids[row, offset:offset + a], segments[row, offset:offset + a] = unit.prefix, segment
                targets[row, offset:offset + a - 1] = unit.prefix[1:]  # never scored
                positions[row, offset:offset + a] = np.arange(a)
                offset += a
            for i, read, target in unit.branches:
                n = len(read)
                segment += 1
                ids[row, offset:offset + n], targets[row, offset:offset + n] = read, target
                segments[row, offset:offset + n], prefixes[row, offset:offset + n] = segment, prefix_segment
                positions[row, offset:offset + n] = np.arange(a, a + n)
                offset += n
                where.append((i, row, offset))
    return {"input_ids": ids, "targets": targets, "segment_ids": segments, "positions": positions,
            "shared_prefix_ids": prefixes}, where


def _batches(rows: list, batch_size: int) -> list[list]:
    """Rows in calls of `batch_size`, each call padded with empty rows to a power of two no larger (a short last
    call, or a small job, gets a small shape instead of mostly empty rows)."""
    out = []
    for k in range(0, len(rows), batch_size):
        part = rows[k:k + batch_size]
        out.append(part + [[]] * (min(batch_size, 1 << (len(part) - 1).bit_length()) - len(part)))
    return out


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit packing of item indices into rows of `capacity` (lengths are best given longest first)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for j, n in enumerate(lengths):
        if n > capacity:
            raise EvaluationError(f"a sequence of {n} tokens does not fit a row of {capacity}")
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(j)
                free[r] -= n
                break
        else:
            rows.append([j])
            free.append(capacity - n)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Perplexity


def read_text(source, text_field: str = "text") -> tuple[str, str]:
    """(text, description) from a file path, a `datasets` spec dict or Dataset, a task name, or the text itself.

    A `.jsonl` file contributes its `text_field` values; a `.raw`/`.txt` file its lines joined with "\\n" (the shared
    WikiText-2 copy has its blank lines dropped, and its README says to join with "\\n")."""
    if isinstance(source, PerplexityTask):
        source = source.source
    if isinstance(source, str) and source in _perplexity_task_names():
        source = get_task(source).source
    if isinstance(source, dict):
        import datasets

        ds = datasets.load_dataset(**source)
        return "\n".join(ds[text_field]), f"datasets {source}"
    if hasattr(source, "column_names"):  # a datasets.Dataset
        return "\n".join(source[text_field]), "dataset"
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _names_a_file(source)):
        path = resolve_path(source)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found")
        if path.suffix == ".jsonl":
            from .tasks import read_jsonl

            parts = []
            for where, doc in read_jsonl(path):
                if text_field not in doc:
                    raise EvaluationError(f"{where}: missing field {text_field!r}")
                parts.append(doc[text_field])
            return "\n".join(parts), str(path)
        return "\n".join(path.read_text(encoding="utf-8").splitlines()), str(path)
    if isinstance(source, str):
        return source, "text"
    raise TypeError(f"cannot read text from {type(source).__name__}")


def _names_a_file(s: str) -> bool:
    """A string is a path when it names an existing file (or the shared data); otherwise it is the text."""
    if s.startswith("{data}"):
        return True
    try:
        return "\n" not in s and len(s) < 4096 and Path(s).is_file()
    except OSError:  # too long or otherwise not a possible path
        return False


def _perplexity_task_names():
    from .tasks import TASKS

    return {n for n, t in TASKS.items() if isinstance(t, PerplexityTask)}


def perplexity_windows(num_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: tokens[begin:end] are fed, and the last `scored` of them are predicted.

    Without a stride the windows do not overlap and every token but each window's first is predicted. With a stride
    (sliding window, as in the transformers perplexity guide) each window moves by `stride` tokens and scores only
    the tokens no earlier window scored, so they see up to `window - stride` tokens of context."""
    stride = stride or window
    spans, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            spans.append((begin, end, scored))
        prev_end = end
        if end == num_tokens:
            break
    return spans


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """The whole text at once, with the tokenizer's own special tokens (SmolLM2 adds none; Llama-2 adds BOS)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum" is expected here
    try:
        return np.asarray(tokenizer(text)["input_ids"], np.int32)
    finally:
        transformers.logging.set_verbosity(verbosity)


def perplexity(model: Model | ModelGroup, text_or_source, window: int = 1024, *, stride: int | None = None,
               batch_size: int = 8, max_windows: int | None = None, text_field: str = "text",
               progress: bool = False) -> dict | list[dict]:
    """exp(mean NLL over all predicted tokens) of a text, in windows of `window` tokens (see `perplexity_windows`).

    text_or_source: the text, a file path (`{data}/...` for the shared data), a `datasets` spec dict, or
    'wikitext2'. Returns a dict: perplexity, nll (mean), tokens (predicted), windows, window, stride, seconds (for
    a ModelGroup, a list of them, one per model).
    """
    group, grouped = _grouped(model)
    model = group.models[0]
    _need_tokenizer(model)
    if not isinstance(window, int) or window < 2:
        raise EvaluationError(f"window must be an integer of at least 2 tokens, got {window!r}")
    limit = min(m.config.max_position_embeddings for m in group.models)
    if window > limit:
        raise EvaluationError(f"window {window} is longer than the model's context of {limit} tokens")
    if stride is not None and not 0 < stride <= window:
        raise EvaluationError(f"stride must be in 1..window={window}, got {stride}")
    text, where = read_text(text_or_source, text_field)
    if not text.strip():
        raise EvaluationError(f"the text to score is empty ({where})")
    ids = tokenize_text(model.tokenizer, text)
    if len(ids) < 2:
        raise EvaluationError(f"the text has {len(ids)} token(s); perplexity needs at least 2 ({where})")
    spans = perplexity_windows(len(ids), window, stride)[:max_windows]
    seqs = [ids[b:e] for b, e, _ in spans]
    logprobs, stats = score_sequences(group, seqs, [s for _, _, s in spans], batch_size=batch_size,
                                      fixed_length=min(window, max(len(s) for s in seqs)) - 1,
                                      desc="perplexity" if progress else None)
    results = []
    for per_window in logprobs:
        total = sum(float(lp.sum()) for lp in per_window)
        count = sum(len(lp) for lp in per_window)
        nll = -total / count
        results.append({"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": len(spans),
                        "window": window, "stride": stride or window, "source": where, "compiles": stats["compiles"],
                        "seconds": stats["seconds"], "tokens_fed": stats["tokens"]})
    return results if grouped else results[0]


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice, the lm-evaluation-harness way


def _need_tokenizer(model: Model):
    if model.tokenizer is None:
        raise EvaluationError("the model has no tokenizer; load it with one (streamline_jax.load) to evaluate text")


def prefix_token_id(tokenizer) -> int:
    """What the harness puts before an empty context: BOS, or EOS when there is none."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise EvaluationError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
    return int(tid)


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) per (context, continuation), as lm-evaluation-harness's HFLM does it:
    trailing spaces of the context move onto the continuation; the context is encoded alone, with the tokenizer's
    own special tokens (Llama's BOS; SmolLM2 adds none), and the continuation is the rest of the encoding of the
    joined text; an empty context becomes [BOS or EOS] before the continuation encoded without special tokens (or
    the continuation's first token, where that is already the prefix token)."""
    contexts, wholes, empty = [], [], []
    for context, continuation in pairs:
        if context == "":
            empty.append(True)
            contexts.append("")
            wholes.append(continuation)
            continue
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        empty.append(False)
        contexts.append(context)
        wholes.append(context + continuation)
    context_ids = tokenizer(contexts)["input_ids"]
    whole_ids = tokenizer(wholes)["input_ids"]
    bare_texts = [w for w, e in zip(wholes, empty) if e]
    bare = iter(tokenizer(bare_texts, add_special_tokens=False)["input_ids"] if bare_texts else [])
    out = []
    for is_empty, ctx, whole in zip(empty, context_ids, whole_ids):
        if is_empty:
            cont = list(next(bare))
            prefix = prefix_token_id(tokenizer)
            out.append(([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:]))
        else:
            out.append((list(ctx), list(whole[len(ctx):])))
    return out


def loglikelihoods(model: Model | ModelGroup, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32,
                   max_length: int | None = None, pack_length: int | None = 256, share_prefixes: bool = True,
                   progress: bool = False) -> tuple[np.ndarray | list, np.ndarray, dict]:
    """Summed log-probability of each continuation given its context (for a ModelGroup, a list: one array per
    model), with the number of continuation tokens. See `loglikelihood_tokens`."""
    first = _grouped(model)[0].models[0]
    _need_tokenizer(first)
    encoded = encode_pairs(first.tokenizer, pairs)
    for i, (_, cont) in enumerate(encoded):
        if not cont:
            raise EvaluationError(f"request {i}: the continuation {pairs[i][1]!r} encodes to no tokens")
    sums, scored, _, stats = loglikelihood_tokens(model, encoded, batch_size=batch_size, max_length=max_length,
                                                  pack_length=pack_length, share_prefixes=share_prefixes,
                                                  progress=progress, greedy=False)
    return sums, scored, stats


def loglikelihood_tokens(model: Model | ModelGroup, encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         batch_size: int = 32, max_length: int | None = None, pack_length: int | None = 256,
                         share_prefixes: bool = True, progress: bool = False,
                         greedy: bool = True) -> tuple[Any, np.ndarray, Any, dict]:
    """Summed log-probability of each (context tokens, continuation tokens), the number of continuation tokens
    scored, and whether every one of them was the argmax (the harness's is_greedy; None without `greedy`); for a
    ModelGroup, the sums and is_greedy are lists, one entry per model.

    The joined tokens are truncated from the left to `max_length + 1` (default: the model's context), and the model
    reads all but the last, exactly as the harness's `_loglikelihood_tokens`. Requests are packed into rows of
    `pack_length` tokens (None: one request per row), and requests with the same context read it once
    (`share_prefixes`); see `score_sequences`."""
    group, grouped = _grouped(model)
    max_length = max_length or min(m.config.max_position_embeddings for m in group.models)
    seqs, scored = [], []
    for ctx, cont in encoded:
        seq = np.asarray((list(ctx) + list(cont))[-(max_length + 1):], np.int32)
        seqs.append(seq)
        scored.append(min(len(cont), len(seq) - 1))
    outs, stats = score_sequences(group, seqs, scored, batch_size=batch_size, pack_length=pack_length,
                                  share_prefixes=share_prefixes, desc="loglikelihood" if progress else None,
                                  greedy=greedy)
    if greedy:
        sums = [np.array([lp.sum() for lp, _ in out]) for out in outs]
        is_greedy = [np.array([bool(g.all()) for _, g in out]) for out in outs]
    else:
        sums, is_greedy = [np.array([lp.sum() for lp in out]) for out in outs], None
    if not grouped:
        sums, is_greedy = sums[0], None if is_greedy is None else is_greedy[0]
    return sums, np.array(scored), is_greedy, stats


def score_items(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict:
    """acc: argmax of the summed log-likelihoods; acc_norm: argmax of the sums over the choices' lengths in
    characters, as lm-evaluation-harness; acc_bytes: the same over UTF-8 bytes (the harness's acc_bytes)."""
    acc, acc_norm, acc_bytes, preds = [], [], [], []
    for item, ll in zip(items, lls):
        ll = np.asarray(ll, np.float64)
        chars = np.array([len(c) for c in item.choices], np.float64)
        utf8 = np.array([len(c.encode("utf-8")) for c in item.choices], np.float64)
        pred = int(np.argmax(ll))
        preds.append(pred)
        acc.append(pred == item.label)
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice divides by 0, as in the harness
            acc_norm.append(int(np.argmax(ll / chars)) == item.label)
            acc_bytes.append(int(np.argmax(ll / utf8)) == item.label)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "acc_bytes": float(np.mean(acc_bytes)),
            "predictions": preds}


def evaluate_task(model: Model | ModelGroup, task: Task, *, limit: int | None = None, batch_size: int = 32,
                  progress: bool = False) -> dict | list[dict]:
    """One multiple-choice task's result (for a ModelGroup, a list: one per model); see `evaluate`."""
    group, grouped = _grouped(model)
    items = load_items(task, limit)
    pairs = [(ctx, cont) for item in items for ctx, cont in zip(item.contexts, item.continuations)]
    sums, _, stats = loglikelihoods(group, pairs, batch_size=batch_size, progress=progress)
    results = []
    for per_pair in sums:
        lls, k = [], 0
        for item in items:
            lls.append([float(x) for x in per_pair[k:k + len(item.choices)]])
            k += len(item.choices)
        scores = score_items(items, lls)
        result = {"task": task.name, "kind": "multiple_choice", "n": len(items)}
        result.update({m: scores[m] for m in task.metrics})
        if "acc_norm" in task.metrics:
            result["acc_bytes"] = scores["acc_bytes"]
        result.update({"labels": [item.label for item in items], "predictions": scores["predictions"],
                       "loglikelihoods": lls, **stats})
        results.append(result)
    return results if grouped else results[0]


def evaluate(model: Model | ModelGroup, tasks, *, limit: int | None = None, batch_size: int = 32,
             progress: bool = False) -> dict | list[dict]:
    """Evaluate `model` on tasks: names from `tasks.TASKS` ('piqa', 'hellaswag', ..., 'wikitext2'), Task or
    PerplexityTask objects, or a list of them. Every task's items are read and checked before any model work.

    Returns {"num_params", "layers", "tasks": {name: result}}; a multiple-choice result holds acc (and acc_norm),
    n, per-item labels, predictions and per-choice log-likelihoods; a perplexity result the `perplexity` dict.
    For a ModelGroup (`model_group([dense, pruned])`), a list of those, one per model, from the same calls: what
    the models share runs once, and each task's seconds and compiles are the group's."""
    group, grouped = _grouped(model)
    if isinstance(tasks, (str, Task, PerplexityTask)):
        tasks = [tasks]
    tasks = [get_task(t) for t in tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvaluationError(f"task names must be unique, got {names}")
    _need_tokenizer(group.models[0])
    for t in tasks:  # bad files fail here, before any compile
        if isinstance(t, Task):
            load_items(t, limit)
        else:
            text, where = read_text(t.source)
            if not text.strip():
                raise EvaluationError(f"the text to score is empty ({where})")
    results = [{} for _ in group.models]
    for t in tasks:
        if isinstance(t, Task):
            per_model = evaluate_task(group, t, limit=limit, batch_size=batch_size, progress=progress)
        else:
            per_model = [{"task": t.name, "kind": "perplexity", **ppl} for ppl in perplexity(
                group, t.source, t.window, stride=t.stride, max_windows=limit, progress=progress)]
        for model_results, result in zip(results, per_model):
            model_results[t.name] = result
    out = [{"num_params": m.num_params, "layers": m.config.depth, "tasks": r} for m, r in zip(group.models, results)]
    return out if grouped else out[0]
