"""Evaluation: perplexity and harness-style multiple choice against transformers, task files, stability, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data
from reference import params_from_torch, torch_model
from streamline_jax import evaluation as ev
from streamline_jax import retention
from streamline_jax import tasks as tk
from streamline_jax.report import summary, to_markdown
from streamline_jax.models.config import ModelConfig
from streamline_jax.models.model import Model

# vocab as large as SmolLM2's, so its tokenizer can drive the tiny random models
TINY = {
    "llama": ModelConfig(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256),
    "opt": ModelConfig(family="opt", vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=256, activation="relu"),
}

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
        "Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
        "surpassed the Washington Monument to become the tallest man-made structure in the world, a title it held "
        "for 41 years until the Chrysler Building in New York City was finished in 1930. ") * 3


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from streamline_jax.loading import embedded_hf_folder

    return AutoTokenizer.from_pretrained(str(embedded_hf_folder("smollm2-135m")))


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request, tokenizer):
    config = TINY[request.param]
    ref = torch_model(config, seed=1)
    return Model(config, params_from_torch(config, ref), tokenizer), ref


def torch_perplexity(model, ids, window, stride):
    """The transformers perplexity guide's loop, verbatim in spirit: labels -100 outside each window's new tokens."""
    ids = torch.tensor(ids)[None]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        trg = end - prev_end
        inp = ids[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(inp, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll, count = nll + float(loss) * n, count + n
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count), count


def torch_loglikelihood(model, tokenizer, context, continuation, max_length=None):
    """A plain, unbatched harness computation: encode, join, truncate from the left, sum the continuation's log-probs."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(context + continuation, add_special_tokens=False)[len(ctx):]
    seq = (ctx + cont)
    if max_length:
        seq = seq[-(max_length + 1):]
    inp = torch.tensor(seq[:-1])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(inp).logits[0].double(), -1)
    n = len(cont)
    return float(sum(logp[len(seq) - 1 - n + j, cont[j]] for j in range(n)))


# ----------------------------------------------------------------------------------------------------------------
# Perplexity


def test_chunked_head_logprobs_equal_the_full_log_softmax():
    """The head runs HEAD_CHUNK tokens at a time; 3 x 100 tokens leave a padded last chunk."""
    import jax
    import jax.numpy as jnp
    from streamline_jax.models import transformer

    config = TINY["llama"]
    params = transformer.init_params(config, jax.random.PRNGKey(0))
    hidden = jax.random.normal(jax.random.PRNGKey(1), (3, 100, config.hidden_size))
    targets = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 100)), jnp.int32)
    assert (3 * 100) % ev.HEAD_CHUNK
    logits = transformer.head(config, params, hidden)
    full = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(ev.head_logprobs(config, params, hidden, targets), full, rtol=1e-5, atol=1e-5)


def test_length_buckets_bound_padding_and_shapes():
    buckets = {ev.length_bucket(n) for n in range(1, 4097)}
    assert len(buckets) <= 30
    for n in range(1, 4097):
        b = ev.length_bucket(n)
        assert n <= b and (b - n < 16 or (b - n) / b < 0.25)
    assert ev.length_bucket(5000, cap=4096) == 4096


@pytest.mark.parametrize("n, window, stride", [(10, 4, None), (11, 4, None), (9, 4, None), (20, 8, 3), (5, 8, 2)])
def test_windows_score_every_token_once(n, window, stride):
    spans = ev.perplexity_windows(n, window, stride)
    scored = [t for b, e, k in spans for t in range(e - k, e)]
    # without a stride each window's first token has no context, so it is not predicted
    unscored = set(range(0, n, window)) if stride is None else {0}
    assert sorted(scored) == [t for t in range(n) if t not in unscored]
    assert all(e - b <= window and k <= e - b - 1 for b, e, k in spans)


@pytest.mark.parametrize("stride", [None, 48])
def test_perplexity_matches_transformers(tiny, stride):
    model, ref = tiny
    ours = ev.perplexity(model, TEXT, window=96, stride=stride, batch_size=4)
    ids = model.tokenizer(TEXT)["input_ids"]
    want, count = torch_perplexity(ref, ids, 96, stride or 96)
    assert ours["tokens"] == count
    assert ours["perplexity"] == pytest.approx(want, rel=1e-5)
    assert ours["compiles"] <= 1  # every window is padded to one shape


def test_perplexity_reads_files_and_datasets(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "t.txt").write_text(TEXT)
    lines = [{"text": TEXT[:300]}, {"text": TEXT[300:]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    a = ev.perplexity(model, str(tmp_path / "t.txt"), window=64)
    b = ev.perplexity(model, TEXT, window=64)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-9)
    c = ev.perplexity(model, tmp_path / "t.jsonl", window=64)  # lines joined with "\n"
    d = ev.perplexity(model, TEXT[:300] + "\n" + TEXT[300:], window=64)
    assert c["perplexity"] == pytest.approx(d["perplexity"], rel=1e-9)


def test_perplexity_bad_input(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ev.EvaluationError, match=r"empty \(.*empty.txt\)"):
        ev.perplexity(model, tmp_path / "empty.txt", window=64)
    with pytest.raises(ev.EvaluationError, match="empty"):
        ev.perplexity(model, "", window=64)
    with pytest.raises(ev.EvaluationError, match="window 512 is longer than the model's context of 256"):
        ev.perplexity(model, TEXT, window=512)
    with pytest.raises(ev.EvaluationError, match="stride"):
        ev.perplexity(model, TEXT, window=64, stride=65)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ev.perplexity(model, tmp_path / "missing.txt", window=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ev.EvaluationError, match=r"bad.jsonl:2: missing field 'text'"):
        ev.perplexity(model, bad, window=64)


def test_wikitext_parity_smollm2(smollm2, smollm2_torch):
    """The first 4 windows of 256 tokens of WikiText-2 test; the 16 x 1024 figure comes from scripts/eval_full.py."""
    shared_data("wikitext-2-raw", "wiki.test.raw")
    ours = ev.perplexity(smollm2, "wikitext2", window=256, max_windows=4, batch_size=4)
    text, _ = ev.read_text("wikitext2")
    ids = smollm2.tokenizer(text)["input_ids"][:4 * 256]
    want, count = torch_perplexity(smollm2_torch, ids, 256, 256)
    assert ours["tokens"] == count == 4 * 255
    assert ours["perplexity"] == pytest.approx(want, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice


def test_encode_pairs_like_the_harness(tokenizer):
    (ctx, cont), (ctx2, cont2), (ctx3, cont3) = ev.encode_pairs(
        tokenizer, [("Question: x\nAnswer:", " yes"), ("Question: x\nAnswer: ", "yes"), ("", "Hello there")])
    assert (ctx, cont) == (ctx2, cont2)  # the trailing space moved onto the continuation
    assert ctx + cont == tokenizer.encode("Question: x\nAnswer: yes", add_special_tokens=False)
    assert tokenizer.decode(cont) == " yes"
    assert ctx3 == [tokenizer.bos_token_id] and cont3 == tokenizer.encode("Hello there", add_special_tokens=False)


def test_loglikelihoods_match_transformers(tiny):
    model, ref = tiny
    pairs = [("Question: How do I boil an egg?\nAnswer:", " Put it in boiling water for eight minutes."),
             ("Question: How do I boil an egg?\nAnswer:", " Put it in the freezer."),
             ("The capital of France is ", "Paris"),
             ("", "An empty context gets the prefix token."),
             ("x " * 150, " and a context longer than the model's window")]  # left-truncated to 256 + 1
    ours, counts, stats = ev.loglikelihoods(model, pairs, batch_size=2)
    want = [torch_loglikelihood(ref, model.tokenizer, c, x, max_length=256) if c else None for c, x in pairs]
    ctx, cont = ev.encode_pairs(model.tokenizer, [pairs[3]])[0]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
    want[3] = float(sum(logp[j, t] for j, t in enumerate(cont)))
    np.testing.assert_allclose(ours, want, rtol=2e-5)
    assert stats["compiles"] <= 3
    assert stats["shared"] == len(ev.encode_pairs(model.tokenizer, pairs[:1])[0][0]) - 1  # the egg question, once
    unpacked, _, _ = ev.loglikelihoods(model, pairs, batch_size=2, pack_length=None)
    np.testing.assert_allclose(unpacked, want, rtol=2e-5)


def test_shared_prefixes_give_the_log_probs_of_unshared_rows(tiny):
    """Sequences with equal unscored beginnings read them once; a group too large for a row is split, each part
    with the prefix again; lone sequences, and beginnings of one token, are packed as before."""
    model, _ = tiny
    rng = np.random.default_rng(0)
    sequences, scored = [], []
    for prefix_len, branches in ((30, [5, 9, 14, 3]), (12, [40, 40, 40, 40, 40]), (1, [6, 7]), (20, [11])):
        prefix = rng.integers(3, 49152, prefix_len)
        for n in branches:
            sequences.append(np.concatenate([prefix, rng.integers(3, 49152, n)]).astype(np.int32))
            scored.append(n)
    shared, stats = ev.score_sequences(model, sequences, scored, pack_length=64)
    alone, plain = ev.score_sequences(model, sequences, scored, pack_length=64, share_prefixes=False)
    for a, b in zip(shared, alone):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # 30-token prefix: read once instead of 4 times; 12 tokens: 5 branches of 40 split into rows of 64 (one each
    # with the prefix again: 11 + 40 + 40 > 64); the 1-token prefix and the lone sequence share nothing
    assert stats["shared"] == 3 * 29 and plain["shared"] == 0
    assert stats["tokens"] == plain["tokens"] == sum(len(s) - 1 for s in sequences)


def test_first_fit_packing():
    rows = ev.pack_first_fit([9, 7, 5, 4, 3, 2, 1], 10)
    assert rows == [[0, 6], [1, 4], [2, 3], [5]]
    with pytest.raises(ev.EvaluationError, match="11 tokens does not fit a row of 10"):
        ev.pack_first_fit([11], 10)


def test_piqa_parity_smollm2(smollm2, smollm2_torch):
    """Per-item log-likelihoods of the first PIQA items; 50 items are compared by scripts/eval_full.py --parity."""
    shared_data("piqa", "valid.jsonl")
    result = ev.evaluate(smollm2, "piqa", limit=6)["tasks"]["piqa"]
    items = tk.load_items(tk.PIQA, limit=6)
    want = [[torch_loglikelihood(smollm2_torch, smollm2.tokenizer, c, x) for c, x in zip(it.contexts,
                                                                                          it.continuations)]
            for it in items]
    np.testing.assert_allclose(result["loglikelihoods"], want, rtol=1e-4)
    assert result["labels"] == [it.label for it in items]
    assert result["acc"] == np.mean([np.argmax(w) == it.label for w, it in zip(want, items)])


def test_acc_and_acc_norm():
    items = [tk.Item(("c",) * 2, (" aa", " bbbbbb"), ("aa", "bbbbbb"), 1, "x"),
             tk.Item(("c",) * 2, (" é", " e"), ("é", "e"), 0, "y")]
    # item 1: acc picks 0 (-2 > -3); acc_norm and acc_bytes pick 1 (-3/6 > -2/2).
    # item 2: acc picks 1; per character (lm-eval's acc_norm) both are 1 long, so acc_norm picks 1 too; per byte
    # "é" is 2 bytes: -1.5/2 > -1/1, so acc_bytes picks 0.
    scores = ev.score_items(items, [[-2.0, -3.0], [-1.5, -1.0]])
    assert scores["acc"] == 0.0 and scores["predictions"] == [0, 1]
    assert scores["acc_norm"] == 0.5 and scores["acc_bytes"] == 1.0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_piqa_task_from_files(tmp_path, tiny):
    model, ref = tiny
    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
            {"goal": "Dry hair", "sol1": "Use a towel.", "sol2": "Use a spoon."},
            {"goal": "Cut paper", "sol1": "Use scissors.", "sol2": "Use water."}]
    task = tk.PIQA.replace(source=write_jsonl(tmp_path / "p.jsonl", rows), labels_file=str(tmp_path / "l.lst"))
    (tmp_path / "l.lst").write_text("0\n1\n0\n")
    items = tk.load_items(task)
    assert items[0].contexts == ("Question: Open a jar\nAnswer:",) * 2
    assert items[0].continuations == (" Twist the lid.", " Eat the lid.")
    assert [it.label for it in items] == [0, 1, 0]
    out = ev.evaluate(model, task)
    r = out["tasks"]["piqa"]
    want = [[torch_loglikelihood(ref, model.tokenizer, c, x) for c, x in zip(it.contexts, it.continuations)]
            for it in items]
    np.testing.assert_allclose(r["loglikelihoods"], want, rtol=2e-5)
    assert r["acc"] == pytest.approx(np.mean([np.argmax(w) == it.label for w, it in zip(want, items)]))
    assert out["num_params"] == model.num_params and r["n"] == 3


def _trained(pruned, segment):
    """A pruned model whose `segment` moved off its initial values, as training moves it."""
    import jax

    moved = {**pruned.params["segments"], segment: jax.tree.map(lambda a: a * 1.01 + 1e-3,
                                                               pruned.params["segments"][segment])}
    return pruned.replace(params={**pruned.params, "segments": moved})


def test_models_evaluated_together_score_as_each_alone(tmp_path, tiny):
    """A dense model and its pruned copy scored together (the embeddings and the layers before the span once):
    the same perplexity and per-choice log-likelihoods as each scored alone, in both kinds of row (padded
    windows, packed choices with shared prefixes)."""
    from streamline_jax.pruning import prune

    model, _ = tiny
    pruned = _trained(prune(model, 1, 1, replacement="layer"), "seg_1")
    group = ev.model_group([model, pruned])
    assert group.shared == 1  # layer 0; the trained block differs from the span's first layer
    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
            {"goal": "Dry hair", "sol1": "Use a towel.", "sol2": "Use a spoon."}]
    (tmp_path / "l.lst").write_text("0\n1\n")
    piqa = tk.PIQA.replace(source=write_jsonl(tmp_path / "p.jsonl", rows), labels_file=str(tmp_path / "l.lst"))
    (tmp_path / "t.txt").write_text(TEXT)
    text = tk.PerplexityTask("text", str(tmp_path / "t.txt"), window=64)
    together = ev.evaluate(group, [text, piqa])
    for m, joint in zip((model, pruned), together):
        alone = ev.evaluate(m, [text, piqa])
        assert joint["num_params"] == alone["num_params"] and joint["layers"] == alone["layers"]
        assert joint["tasks"]["text"]["perplexity"] == pytest.approx(alone["tasks"]["text"]["perplexity"], rel=1e-5)
        np.testing.assert_allclose(joint["tasks"]["piqa"]["loglikelihoods"], alone["tasks"]["piqa"]["loglikelihoods"],
                                   rtol=1e-5)
    assert together[0]["tasks"]["text"]["perplexity"] != pytest.approx(together[1]["tasks"]["text"]["perplexity"])


def test_what_models_share_is_found_from_their_parameters(tiny):
    """Shared layers end where the parameters first differ; an untrained block (a copy of the span's first layer)
    counts as shared; different embeddings share nothing, and such models are scored each on its own."""
    from streamline_jax.pruning import prune

    model, _ = tiny
    same = prune(model, 1, 1, replacement="layer")  # one layer replaced by a copy of itself: the same model
    assert ev.model_group([model, same]).shared == model.config.depth
    copy = prune(model, 0, 2, replacement="layer")
    assert ev.model_group([model, copy]).shared == 1  # the block, still layer 0; then layer 2 against layer 1
    assert ev.model_group([model, _trained(copy, "seg_0")]).shared == 0
    assert ev.model_group([model]).shared is None
    other = model.replace(params={**model.params, "embed_tokens": model.params["embed_tokens"] * 1.5})
    group = ev.model_group([model, other])
    assert group.shared is None
    seqs = [np.arange(3, 40, dtype=np.int32), np.arange(50, 70, dtype=np.int32)]
    joint, _ = ev.score_sequences(group, seqs, [10, 5])
    for m, per_model in zip((model, other), joint):
        alone, _ = ev.score_sequences(m, seqs, [10, 5])
        for a, b in zip(per_model, alone):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_layers_a_pruned_model_holds_as_the_dense_models_own_arrays_are_shared_without_a_copy(monkeypatch):
    """After `split_stack` the pruned model's kept segments are the dense model's own arrays: those count as shared
    at once; only the block is compared by value, inside a jit, with no layer sliced out of its stack (each
    comparison copied a layer of both models: at 7B, 1.7 GiB of host memory held while the evaluation began)."""
    from streamline_jax.models import transformer
    from streamline_jax.pruning import prune, split_stack
    from tiny import SMALL_LLAMA, dense as random_model

    dense = split_stack(random_model(SMALL_LLAMA), [2, 4])
    pruned = prune(dense, 2, 2, replacement="layer")
    trained = _trained(pruned, "seg_1")
    compared, sliced = [], []
    real = transformer._layers_equal
    monkeypatch.setattr(transformer, "_layers_equal", lambda *a, **k: compared.append(1) or real(*a, **k))
    monkeypatch.setattr(transformer, "slice_layers", lambda *a: sliced.append(1))
    assert ev.model_group([dense, pruned]).shared == 3  # and the untrained block
    assert len(compared) == 2 and not sliced  # the block (a copy of layer 2), then pruned layer 3 against dense 3
    compared.clear()
    assert ev.model_group([dense, trained]).shared == 2
    assert len(compared) == 1 and not sliced


def test_a_head_both_models_hold_is_passed_to_the_joint_step_once():
    """The dense and the pruned model's head is one array: the joint step takes it once (with float32 products
    it converted it once per model); a head of its own stays, and the scores are each model's own."""
    import dataclasses

    import jax

    from streamline_jax.models import transformer
    from streamline_jax.pruning import prune, split_stack
    from tiny import SMALL_LLAMA, dense as random_model

    dense = split_stack(random_model(dataclasses.replace(SMALL_LLAMA, tie_word_embeddings=False)), [2, 4])
    pruned = _trained(prune(dense, 2, 2, replacement="layer"), "seg_1")
    once = ev.heads_once([dense.params, pruned.params])
    assert not set(transformer.HEAD_KEYS) & set(once[1]) and once[0] is dense.params
    own_head = pruned.replace(params={**pruned.params, "lm_head": jax.tree.map(lambda a: a * 2,
                                                                              pruned.params["lm_head"])})
    assert "lm_head" in ev.heads_once([dense.params, own_head.params])[1]
    seqs = [np.arange(3, 40, dtype=np.int32) % 64, np.arange(20, 45, dtype=np.int32) % 64]
    for other in (pruned, own_head):
        joint, _ = ev.score_sequences(ev.model_group([dense, other]), seqs, [10, 5])
        for m, per_model in zip((dense, other), joint):
            alone, _ = ev.score_sequences(m, seqs, [10, 5])
            for a, b in zip(per_model, alone):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_models_with_per_layer_attention_types_share_layers_while_the_types_agree():
    """Gemma 3 (sliding s s f s s f): a `layer` block from layer 1 keeps layer 1's parameters and type, so layers 0
    and 1 are shared; the pruned model's next layer (3, sliding) stands where the dense one has layer 2 (full), and
    sharing stops there. Together, each model scores as alone, every layer with its own type."""
    from streamline_jax.pruning import prune
    from tiny import reference_pair

    _, model = reference_pair("gemma3")
    pruned = prune(model, 1, 2, replacement="layer")
    group = ev.model_group([model, pruned])
    assert group.shared == 2
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 128, n).astype(np.int32) for n in (30, 17, 9)]
    joint, _ = ev.score_sequences(group, seqs, [20, 8, 4], pack_length=32)
    for m, per_model in zip((model, pruned), joint):
        alone, _ = ev.score_sequences(m, seqs, [20, 8, 4], pack_length=32)
        for a, b in zip(per_model, alone):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


HUB_ROWS = {
    "hellaswag": {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow "
                  "covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
                  "ctx": "...", "endings": [", the man adds wax to the windshield and cuts it.",
                                            ", a person board a ski lift [title] while two men supporting.",
                                            ", the man puts on a christmas coat, knitted with netting.",
                                            ", the man continues removing the snow on his car."],
                  "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "train", "split_type": "indomain",
                  "label": "3"},
    "arc_easy": {"id": "Mercury_7179953", "question": "Which two body systems are directly involved in movement?",
                 "choices": {"text": ["muscular and skeletal", "digestive and muscular", "skeletal and respiratory",
                                      "respiratory and digestive"], "label": ["A", "B", "C", "D"]},
                 "answerKey": "A"},
    "arc_challenge": {"id": "Mercury_SC_405487", "question": "Which is a renewable resource?",
                      "choices": {"text": ["coal", "wind", "oil"], "label": ["1", "2", "3"]}, "answerKey": "2"},
    "boolq": {"question": "does ethanol take more energy make that produces",
              "passage": "Ethanol fuel -- All biomass goes through at least some of these steps.", "idx": 0,
              "label": 0},
    "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                   "option1": "Sarah", "option2": "Maria", "answer": "1"},
    "openbookqa": {"id": "7-980", "question_stem": "The sun is responsible for",
                   "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                                        "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                               "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
}


def test_hub_tasks_read_their_formats(tmp_path):
    got = {}
    for name, row in HUB_ROWS.items():
        task = tk.TASKS[name].replace(source=write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        (got[name],) = tk.load_items(task)
    h = got["hellaswag"]
    assert h.contexts[0] == ("Removing ice from car: Then, the man writes over the snow covering the window of a "
                             "car, and a woman wearing winter clothes smiles. Then")
    assert h.continuations[1] == " , a person board a ski lift. while two men supporting."
    assert h.label == 3 and len(h.choices) == 4
    a = got["arc_easy"]
    assert a.contexts[0] == "Question: Which two body systems are directly involved in movement?\nAnswer:"
    assert a.continuations[0] == " muscular and skeletal" and a.label == 0
    assert got["arc_challenge"].label == 1 and len(got["arc_challenge"].choices) == 3
    b = got["boolq"]
    assert b.contexts[0] == ("Ethanol fuel -- All biomass goes through at least some of these steps.\nQuestion: "
                             "does ethanol take more energy make that produces?\nAnswer:")
    assert b.continuations == (" no", " yes") and b.label == 0
    w = got["winogrande"]  # partial scoring: the option fills the blank, the rest is scored
    assert w.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria")
    assert w.continuations == (" always got the harder cases.",) * 2 and w.label == 0
    assert tk.WINOGRANDE.metrics == ("acc",)
    o = got["openbookqa"]
    assert o.contexts[0] == "The sun is responsible for" and o.label == 3
    assert o.continuations[3] == " plants sprouting, blooming and wilting"


def test_task_file_errors_name_file_and_line(tmp_path):
    piqa = {"goal": "g", "sol1": "a", "sol2": "b"}
    labels = tmp_path / "l.lst"
    labels.write_text("0\n1\n")
    task = tk.PIQA.replace(source=write_jsonl(tmp_path / "p.jsonl", [piqa, {"goal": "g", "sol1": "a"}]),
                           labels_file=str(labels))
    with pytest.raises(tk.TaskFileError, match=r"p.jsonl:2.*missing field 'sol2'"):
        tk.load_items(task)
    labels.write_text("0\n2\n")
    task = task.replace(source=write_jsonl(tmp_path / "p.jsonl", [piqa, piqa]))
    with pytest.raises(tk.TaskFileError, match=r"p.jsonl:2 \(label at .*l.lst:2\): label 2 is out of range"):
        tk.load_items(task)
    labels.write_text("0\nyes\n")
    with pytest.raises(tk.TaskFileError, match=r"l.lst:2: label 'yes' is not an integer"):
        tk.load_items(task)
    labels.write_text("0\n1\n1\n")
    with pytest.raises(tk.TaskFileError, match=r"3 labels for 2 items"):
        tk.load_items(task)
    (tmp_path / "p.jsonl").write_text(json.dumps(piqa) + "\n{not json\n")
    with pytest.raises(tk.TaskFileError, match=r"p.jsonl:2: not valid JSON"):
        tk.load_items(task)
    arc = dict(HUB_ROWS["arc_easy"], answerKey="E")
    task = tk.ARC_EASY.replace(source=write_jsonl(tmp_path / "arc.jsonl", [HUB_ROWS["arc_easy"], arc]))
    with pytest.raises(tk.TaskFileError, match=r"arc.jsonl:2: answerKey 'E' is not one of the choice labels"):
        tk.load_items(task)
    boolq = dict(HUB_ROWS["boolq"], label=5)
    task = tk.BOOLQ.replace(source=write_jsonl(tmp_path / "b.jsonl", [boolq]))
    with pytest.raises(tk.TaskFileError, match=r"b.jsonl:1: label 5 is out of range for 2 choices"):
        tk.load_items(task)
    wino = dict(HUB_ROWS["winogrande"], sentence="no blank here")
    task = tk.WINOGRANDE.replace(source=write_jsonl(tmp_path / "w.jsonl", [wino]))
    with pytest.raises(tk.TaskFileError, match=r"w.jsonl:1: sentence has no blank"):
        tk.load_items(task)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        tk.load_items(tk.PIQA.replace(source=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(KeyError, match="unknown task 'piqa2'"):
        tk.get_task("piqa2")


def test_evaluate_checks_every_task_before_model_work(tmp_path, tiny):
    model, _ = tiny
    good = tk.BOOLQ.replace(source=write_jsonl(tmp_path / "b.jsonl", [HUB_ROWS["boolq"]]))
    bad = tk.BOOLQ.replace(name="boolq_bad", source=write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}]))
    before = ev.target_logprobs.cache_size()
    with pytest.raises(tk.TaskFileError, match=r"bad.jsonl:1: missing field 'passage'"):
        ev.evaluate(model, [good, bad])
    assert ev.target_logprobs.cache_size() == before


# ----------------------------------------------------------------------------------------------------------------
# Stability and the report


def softmax(x):
    e = np.exp(np.asarray(x, float) - max(x))
    return e / e.sum()


def authors_stability(dense, pruned, labels):
    """The authors' script: the sum of the first k weights, k the number of items where both agree."""
    w = softmax([np.std(s) for s in dense])
    agree = [(np.argmax(d) == y) == (np.argmax(p) == y) for d, p, y in zip(dense, pruned, labels)]
    return float(w[:sum(agree)].sum())


def test_stability_hand_computed():
    dense = [[0.0, 1.0], [0.0, 3.0], [0.0, 0.5]]  # std 0.5, 1.5, 0.25; dense predicts 1, 1, 1
    labels = [1, 1, 0]  # dense: right, right, wrong
    pruned = [[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]]  # pruned: wrong, right, wrong -> agree on items 2 and 3
    z = math.exp(0.5) + math.exp(1.5) + math.exp(0.25)
    want = (math.exp(1.5) + math.exp(0.25)) / z
    assert retention.stability(dense, pruned, labels) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(0.7776, abs=1e-4)
    # the authors' version sums the first two weights instead: a different answer
    assert authors_stability(dense, pruned, labels) == pytest.approx((math.exp(0.5) + math.exp(1.5)) / z)
    assert authors_stability(dense, pruned, labels) == pytest.approx(0.8268, abs=1e-4)


def test_stability_edge_cases():
    dense = [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0]]  # ragged choices are fine
    labels = [2, 0, 0]
    assert retention.stability(dense, dense, labels) == pytest.approx(1.0)
    # both wrong counts as agreement; equal spreads give the plain share of agreeing items
    assert retention.stability([[0, 1], [0, 1]], [[0, 1], [1, 0]], [0, 0]) == pytest.approx(0.5)
    assert retention.stability([[0, 1], [0, 1]], [[1, 0], [0, 1]], [0, 0]) == pytest.approx(0.5)
    assert retention.stability([[0, 1], [0, 1]], [[1, 0], [1, 0]], [0, 0]) == pytest.approx(0.0)
    with pytest.raises(ev.EvaluationError, match="same items"):
        retention.stability([[0, 1]], [[0, 1], [1, 0]], [0])


def test_agreement_and_flips_see_what_equal_accuracies_hide():
    labels = [0, 0, 0, 0]
    dense = [[1, 0], [1, 0], [0, 1], [0, 1]]  # right, right, wrong, wrong: acc 0.5
    pruned = [[0, 1], [0, 1], [1, 0], [1, 0]]  # wrong, wrong, right, right: acc 0.5 too, every answer changed
    assert retention.answer_agreement(dense, pruned, labels) == {"agreement": 0.0, "flips": 1.0, "right_to_wrong": 0.5,
                                                          "wrong_to_right": 0.5, "items": 4}
    assert retention.answer_agreement(dense, dense, labels)["agreement"] == 1.0
    # three choices: both wrong with different picks is no flip, and no agreement either
    got = retention.answer_agreement([[0, 1, 0]], [[0, 0, 1]], [0])
    assert (got["agreement"], got["flips"]) == (0.0, 0.0)
    with pytest.raises(ev.EvaluationError, match="same items"):
        retention.answer_agreement([[0, 1]], [[0, 1], [1, 0]], [0])


def fake_results(num_params, acc_lls, labels, ppl):
    preds = [int(np.argmax(s)) for s in acc_lls]
    acc = float(np.mean([p == y for p, y in zip(preds, labels)]))
    return {"num_params": num_params, "layers": 30 if num_params > 100 else 24, "tasks": {
        "piqa": {"kind": "multiple_choice", "acc": acc, "acc_norm": acc / 2, "labels": labels, "predictions": preds,
                 "loglikelihoods": acc_lls, "n": len(labels)},
        "wikitext2": {"kind": "perplexity", "perplexity": ppl}}}


def test_compare_report():
    dense = fake_results(135, [[0.0, 1.0], [0.0, 3.0], [0.0, 0.5], [2.0, 0.0]], [1, 1, 0, 0], 20.0)
    pruned = fake_results(100, [[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [2.0, 0.0]], [1, 1, 0, 0], 25.0)
    report = retention.compare(dense, pruned)
    rows = {(r["task"], r["metric"]): r for r in report.rows}
    assert rows["piqa", "acc"]["dense"] == 0.75 and rows["piqa", "acc"]["pruned"] == 0.5
    assert rows["piqa", "acc"]["retention"] == pytest.approx(0.5 / 0.75)
    assert rows["wikitext2", "perplexity"]["retention"] == pytest.approx(20.0 / 25.0)
    assert report.num_params == {"dense": 135, "pruned": 100}
    assert report.stability["piqa"] == pytest.approx(
        retention.stability(dense["tasks"]["piqa"]["loglikelihoods"], pruned["tasks"]["piqa"]["loglikelihoods"],
                     [1, 1, 0, 0]))
    assert report.mean_retention == pytest.approx(0.5 / 0.75)
    # dense right, right, wrong, right; pruned wrong, right, wrong, right; picks differ on the first item only
    assert report.agreement["piqa"] == {"agreement": 0.75, "flips": 0.25, "right_to_wrong": 0.25,
                                        "wrong_to_right": 0.0, "items": 4}
    back = json.loads(report.to_json())
    assert back["num_params"]["pruned"] == 100 and len(back["rows"]) == 3
    assert back["agreement"]["piqa"]["flips"] == 0.25
    table = str(report)
    assert "| piqa | acc | 0.7500 | 0.5000 | 66.67% |" in table and "pruned 100" in table
    assert "| 75.00% | 25.00% (-25.00% +0.00%) |" in table
    # report.md reads the same figures from report.json's retention
    md = to_markdown({"retention": back})
    assert "| agreement | flips |" in md and "| 75.00% | 25.00% (-25.00% +0.00%) |" in md
    assert "| wikitext2 | perplexity | 20.0000 | 25.0000 | 80.00% |  |  |  |" in md
    assert "0.667  (same answer 75.0%, flips 25.0%)" in summary({"retention": back}, Path("out"))
    with pytest.raises(ev.EvaluationError, match="no task in common"):
        retention.compare(dense, {"num_params": 1, "tasks": {"boolq": {}}})
    other = fake_results(100, [[1.0, 0.0]], [1], 25.0)
    with pytest.raises(ev.EvaluationError, match="different items"):
        retention.compare(dense, other)


def test_bf16_compute_keeps_smollm2_wikitext_perplexity_within_half_a_percent(smollm2, smollm2_torch):
    """The same 4 windows as the parity test above, with bf16 dot inputs: perplexity within 0.5% of transformers'
    float32 (the quality bar for the bf16 path; P1's full figures are in the README)."""
    from streamline_jax.models.model import with_compute_dtype

    ours = ev.perplexity(with_compute_dtype(smollm2, "bfloat16"), "wikitext2", window=256, max_windows=4,
                         batch_size=4)
    text, _ = ev.read_text("wikitext2")
    want, _ = torch_perplexity(smollm2_torch, smollm2.tokenizer(text)["input_ids"][:4 * 256], 256, 256)
    assert ours["perplexity"] == pytest.approx(want, rel=5e-3)
    assert ours["perplexity"] != pytest.approx(want, rel=1e-5)  # bf16 really ran
