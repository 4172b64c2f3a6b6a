"""Text generation with a preallocated KV cache, for dense and pruned models alike.

Prompts are left-padded to a common length (rounded up to `prompt_bucket`) and prefilled in one pass; then one token
per step is decoded inside a `jax.lax.while_loop`, so a (batch, prompt bucket, max_new_tokens) shape compiles once.
Every segment with attention (the original `layers` stacks and a `layer` replacement block) keeps its own cache;
`ffn` and `mlp` blocks, and deleted spans, need none.

EOS stops a row on device. Stop sequences are matched on the host in the decoded text, as lm-evaluation-harness
does: decoding runs in chunks of `stop_check_every` tokens and ends early once every row has stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .backend import jit_by_config
from .models import transformer
from .models.config import ModelConfig, Segment
from .models.model import Model

_TRACES = {"prefill": 0, "decode": 0}  # bumped while tracing, so a count of compiles


def compile_count() -> int:
    """How many times the prefill and decode functions have been traced (= compiled) in this process."""
    return sum(_TRACES.values())


@dataclasses.dataclass
class Generation:
    """What `generate` returns, one entry per prompt."""

    texts: list[str] | None  # the continuations, cut at EOS and at the first stop sequence (None without tokenizer)
    tokens: list[list[int]]  # the new tokens, cut before EOS, or after the token that completed a stop sequence
    prompt_tokens: list[list[int]]
    finish_reasons: list[str]  # 'eos', 'stop' (a stop sequence) or 'length'
    logits: list[np.ndarray] | None = None  # [n_new, V] float32 per prompt, with output_logits=True


# ----------------------------------------------------------------------------------------------------------------
# Sampling


NUCLEUS_CANDIDATES = 256  # the filter first looks at this many top logits: a row's kept prefix nearly always ends
# there, and a full sort of the vocabulary was most of a CPU decode step (~0.17 s of ~0.28 at batch 16, SmolLM2)


def _filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p (nucleus) over what top-k kept, as transformers orders them.

    temperature, top_k, top_p are traced, so changing them does not recompile. top_k=0 and top_p=1 are off. The
    threshold comes from the top NUCLEUS_CANDIDATES logits where every row's kept prefix ends inside them (top-k
    keeps no more than them, or top-k is off and they hold top_p of the mass), else from the whole sorted
    vocabulary: the same threshold either way.
    """
    logits = logits / temperature
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    head = jax.lax.top_k(logits, min(NUCLEUS_CANDIDATES, vocab))[0]
    top_k_fits = k <= head.shape[-1]
    # the softmax's normaliser: over the top k where they fit in the head, else (top-k off) over the vocabulary
    lse = jnp.where(top_k_fits, jax.nn.logsumexp(_first(head, k), axis=-1, keepdims=True),
                    jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    inside = top_k_fits | ((k == vocab) & (jnp.sum(jnp.exp(head - lse), axis=-1) >= top_p))
    threshold = jax.lax.cond(jnp.all(inside), lambda: _nucleus_threshold(head, k, top_p, lse),
                             lambda: _nucleus_threshold(-jnp.sort(-logits, axis=-1), k, top_p))
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _first(sorted_desc, k):
    """The first k of each row of logits in descending order, the rest -inf."""
    return jnp.where(jnp.arange(sorted_desc.shape[-1]) < k, sorted_desc, -jnp.inf)


def _nucleus_threshold(sorted_desc, k, top_p, lse=None):
    """[B, 1]: the smallest logit top-k and top-p keep, from each row's largest logits in descending order (the
    whole row; or as many as hold the kept prefix, with `lse` the log of the softmax's normaliser over the rest)."""
    kept_by_k = _first(sorted_desc, k)
    if lse is None:
        lse = jax.nn.logsumexp(kept_by_k, axis=-1, keepdims=True)
    probs = jnp.exp(kept_by_k - lse)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # the smallest prefix holding top_p of the mass, rank 0 always kept; top_p=1 keeps all (the cumulative sum
    # reaches 1 in float32 before the smallest probabilities do)
    keep = ((mass_before < top_p) | (top_p >= 1)) & (jnp.arange(sorted_desc.shape[-1]) < k)
    last_kept = jnp.sum(keep, axis=-1, keepdims=True) - 1
    return jnp.take_along_axis(kept_by_k, last_kept, axis=-1)


def _next_token(logits, rng, step, sampling, greedy):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = _filter_logits(logits, sampling["temperature"], sampling["top_k"], sampling["top_p"])
    return jax.random.categorical(jax.random.fold_in(rng, step), filtered, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Decoding runs the layer stacks unrolled


def unrolled(config: ModelConfig, params):
    """The same model with every `layers` stack split into single `layer` segments (a copy of the layer weights).

    A scanned stack inside the decode loop slices every layer's weights and cache afresh at each step; on CPU that
    copying took about half the decode time at batch 1 and 8 (SmolLM2-135M). Separate layers read their weights in
    place and update their caches in place.
    """
    layout, segments = [], {}
    for i, seg in enumerate(config.layout):
        p = params["segments"][transformer.segment_key(i)]
        if seg.kind == "layers":
            for j in range(seg.num_layers):
                segments[transformer.segment_key(len(layout))] = jax.tree.map(lambda a, j=j: a[j], p)
                layout.append(Segment("layer"))
        else:
            segments[transformer.segment_key(len(layout))] = p
            layout.append(seg)
    return config.replace(layout=tuple(layout)), {**params, "segments": segments}


# ----------------------------------------------------------------------------------------------------------------
# The two compiled functions: prefill, and a decode loop that runs until a step limit or until every row is done


@jit_by_config(static_argnames=("config", "max_new_tokens", "cache_len", "greedy", "output_logits"))
def _prefill(config: ModelConfig, params, prompt_ids, prompt_mask, eos_ids, sampling, rng, *, max_new_tokens,
             cache_len, greedy, output_logits):
    _TRACES["prefill"] += 1
    b, p = prompt_ids.shape
    key_mask = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(prompt_mask)
    positions = transformer.default_positions(prompt_mask)
    caches = transformer.init_caches(config, b, cache_len)
    out = transformer.apply(config, params, prompt_ids, key_mask, positions, return_logits=False, caches=caches,
                            cache_index=0)
    logits = transformer.head(config, params, out["last_hidden"][:, -1:])[:, 0]  # left padding: last slot is real
    token = _next_token(logits, rng, 0, sampling, greedy)
    done = jnp.isin(token, eos_ids)
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
    state = dict(tokens=tokens, step=jnp.int32(1), caches=out["caches"], key_mask=key_mask, done=done,
                 next_position=jnp.sum(prompt_mask, axis=1).astype(jnp.int32), rng=rng)
    if output_logits:
        state["logits"] = jnp.zeros((b, max_new_tokens, config.vocab_size), jnp.float32).at[:, 0].set(logits)
    return state


@jit_by_config(static_argnames=("config", "greedy"), donate_argnames=("state",))
def _decode(config: ModelConfig, params, state, stop_at, eos_ids, pad_id, sampling, *, greedy):
    _TRACES["decode"] += 1
    prompt_len = state["key_mask"].shape[1] - state["tokens"].shape[1] + 1  # cache_len = P + max_new_tokens - 1

    def running(s):
        return (s["step"] < stop_at) & ~jnp.all(s["done"])

    def step(s):
        i = s["step"]
        slot = prompt_len + i - 1  # where the previous token goes
        key_mask = jax.lax.dynamic_update_slice_in_dim(s["key_mask"], jnp.ones_like(s["key_mask"][:, :1]), slot, 1)
        last = jax.lax.dynamic_slice_in_dim(s["tokens"], i - 1, 1, axis=1)
        out = transformer.apply(config, params, last, key_mask, s["next_position"][:, None], return_logits=True,
                                caches=s["caches"], cache_index=slot)
        logits = out["logits"][:, 0]
        token = _next_token(logits, s["rng"], i, sampling, greedy)
        token = jnp.where(s["done"], pad_id, token)
        new = dict(s, tokens=jax.lax.dynamic_update_slice_in_dim(s["tokens"], token[:, None], i, 1), step=i + 1,
                   caches=out["caches"], key_mask=key_mask, done=s["done"] | jnp.isin(token, eos_ids),
                   next_position=s["next_position"] + 1)
        if "logits" in s:
            new["logits"] = jax.lax.dynamic_update_slice_in_dim(s["logits"], logits[:, None], i, 1)
        return new

    return jax.lax.while_loop(running, step, state)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point


def generate(model: Model, prompts, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), chat: bool = False, eos_token_id=None,
             prompt_bucket: int = 32, stop_check_every: int = 32, output_logits: bool = False,
             unroll_layers: bool = True) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompts: a string, a list of strings, or a list of token-id lists. temperature=0 is greedy decoding; otherwise
    tokens are sampled from the temperature-scaled distribution after top-k (0 = off) and top-p (1 = off), with a
    fixed `seed`. `stop`: strings that end a continuation (it is cut before the first one). `chat`: wrap each
    prompt as a user turn in the tokenizer's chat template, with the generation prompt. `eos_token_id`: an id or
    ids that end a row (default: the model's EOS; `()` never stops early). `unroll_layers`: decode with the layer
    stacks split into separate layers, about twice as fast on CPU, at the cost of a copy of the layer weights while
    generating (False: scan the stacks, no copy). `output_logits`: also return the logits of each new token.
    """
    config = model.config
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        prompts = [prompts]
    prompt_tokens = _tokenize(model, list(prompts), chat)
    _check_arguments(config, prompt_tokens, max_new_tokens, temperature, top_k, top_p, stop, prompt_bucket,
                     stop_check_every)
    eos = _eos_ids(model, eos_token_id)
    if stop and model.tokenizer is None:
        raise ValueError("stop sequences need a tokenizer to decode the continuations; the model has none")

    longest = max(len(t) for t in prompt_tokens)
    padded_len = -(-longest // prompt_bucket) * prompt_bucket
    pad_id = _pad_id(config, eos)
    ids = np.full((len(prompt_tokens), padded_len), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(prompt_tokens):
        ids[row, padded_len - len(tokens):] = tokens
        mask[row, padded_len - len(tokens):] = 1

    greedy = temperature == 0
    params = model.params
    if unroll_layers:
        config, params = unrolled(config, params)
    sampling = dict(temperature=jnp.float32(temperature if temperature > 0 else 1.0), top_k=jnp.int32(top_k),
                    top_p=jnp.float32(top_p))
    eos_ids = jnp.asarray(eos if eos else [-1], jnp.int32)
    state = _prefill(config, params, jnp.asarray(ids), jnp.asarray(mask), eos_ids, sampling,
                     jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                     cache_len=padded_len + max_new_tokens - 1, greedy=greedy, output_logits=output_logits)
    chunk = stop_check_every if stop else max_new_tokens
    stopped_at = np.full(len(prompt_tokens), max_new_tokens)  # step at which a stop sequence ended each row
    while True:
        generated = int(state["step"])
        if generated >= max_new_tokens or bool(jnp.all(state["done"])):
            break
        state = _decode(config, params, state, jnp.int32(min(generated + chunk, max_new_tokens)), eos_ids,
                        jnp.int32(pad_id), sampling, greedy=greedy)
        if stop:  # rows whose text already holds a stop sequence are finished: mark them done on device
            rows = _rows_with_stop(model.tokenizer, np.asarray(state["tokens"])[:, :int(state["step"])],
                                   np.asarray(state["done"]), eos, stop)
            if rows.any():
                stopped_at[rows] = int(state["step"])
                state = dict(state, done=state["done"] | jnp.asarray(rows))
    return _finish(model, state, prompt_tokens, eos, stop, stopped_at, output_logits)


def _finish(model, state, prompt_tokens, eos, stop, stopped_at, output_logits):
    steps = int(state["step"])
    all_tokens = np.asarray(state["tokens"])[:, :steps]
    tokens, reasons = [], []
    for row, end in zip(all_tokens, stopped_at):
        row = row[:end].tolist()  # after a stop sequence the row holds padding
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "eos")
    texts = None
    if model.tokenizer is not None:
        texts = []
        for row, toks in enumerate(tokens):
            text = model.tokenizer.decode(toks, skip_special_tokens=True)
            cut = _first_stop(text, stop)
            if cut is not None:
                text, reasons[row] = text[:cut], "stop"
                tokens[row] = _tokens_up_to_stop(model.tokenizer, toks, stop)
            texts.append(text)
    logits = None
    if output_logits:
        all_logits = np.asarray(state["logits"])
        # logits for every new token, EOS included (it was chosen from them)
        logits = [all_logits[row, :min(len(t) + 1, steps)] for row, t in enumerate(tokens)]
    return Generation(texts, tokens, prompt_tokens, reasons, logits)


def _rows_with_stop(tokenizer, tokens, done, eos, stop):
    rows = np.zeros(len(tokens), bool)
    for row, toks in enumerate(tokens):
        if done[row]:
            continue
        toks = [t for t in toks.tolist() if t not in eos]
        rows[row] = _first_stop(tokenizer.decode(toks, skip_special_tokens=True), stop) is not None
    return rows


def _tokens_up_to_stop(tokenizer, tokens, stop):
    """The shortest prefix of `tokens` whose text holds a stop sequence (decoding ran on to the next check)."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(tokenizer.decode(tokens[:mid], skip_special_tokens=True), stop) is None:
            lo = mid + 1
        else:
            hi = mid
    return tokens[:lo]


def _first_stop(text, stop):
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


# ----------------------------------------------------------------------------------------------------------------
# Input handling


def _tokenize(model: Model, prompts: list, chat: bool) -> list[list[int]]:
    if not prompts:
        raise ValueError("no prompts given")
    tok = model.tokenizer
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if tok is None:
                raise ValueError("string prompts need a tokenizer; the model has none (pass token ids instead)")
            if chat:
                if not getattr(tok, "chat_template", None):
                    raise ValueError("chat=True, but the tokenizer has no chat template")
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
            else:
                ids = tok(prompt)["input_ids"]
        else:
            if chat:
                raise ValueError("chat=True needs string prompts, not token ids")
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(list(ids))
    return out


def _check_arguments(config, prompt_tokens, max_new_tokens, temperature, top_k, top_p, stop, prompt_bucket,
                     stop_check_every):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(len(t) for t in prompt_tokens)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} is "
            f"{longest + max_new_tokens} tokens, past the model's context of "
            f"max_position_embeddings={config.max_position_embeddings}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 is off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    if prompt_bucket < 1 or stop_check_every < 1:
        raise ValueError("prompt_bucket and stop_check_every must be >= 1")


def _eos_ids(model: Model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        ids = {model.config.eos_token_id}
        if model.tokenizer is not None:
            ids.add(getattr(model.tokenizer, "eos_token_id", None))
        return tuple(sorted(i for i in ids if i is not None))
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(i) for i in eos_token_id)


def _pad_id(config: ModelConfig, eos) -> int:
    if config.pad_token_id is not None:
        return config.pad_token_id
    return eos[0] if eos else 0


# ----------------------------------------------------------------------------------------------------------------
# Samples for the report


def side_by_side(models: dict[str, Model], prompts: Sequence[str], max_new_tokens: int = 48, *, chat: bool = False,
                 stop: Sequence[str] = ()) -> str:
    """A markdown table: each prompt, and each model's greedy continuation (e.g. {'dense': ..., 'pruned': ...})."""
    columns = {name: generate(m, list(prompts), max_new_tokens, chat=chat, stop=stop).texts
               for name, m in models.items()}
    cell = lambda s: s.strip().replace("|", "\\|").replace("\n", "<br>")
    lines = ["| prompt | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for i, prompt in enumerate(prompts):
        lines.append("| " + " | ".join([cell(prompt)] + [cell(texts[i]) for texts in columns.values()]) + " |")
    return "\n".join(lines)
