"""The model's own text for the distillation phase (streamline_jax.self_data, data.distill_text=self): the cache is
written batch by batch, reused and resumed; a torn last batch is cut off; the chat template renders prompt and
answer where the tokenizer has one; prompts files are checked; the distillation trains on the cached text."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import transformers

from streamline_jax import run as run_mod
from streamline_jax import self_data
from streamline_jax.data import DataError, token_chunks
from streamline_jax.generation import Generation
from streamline_jax.models.model import Model
from streamline_jax.run_folder import is_run_folder
from helpers import run_args
from tiny import LLAMA, sentences, train_tokenizer

SAMPLING = self_data.Sampling(max_new_tokens=4, temperature=0.5, top_p=1.0, batch_size=2, seed=7)
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


class SpyGenerate:
    """Stands in for generation.generate: counts the calls, keeps their arguments, answers by seed (the same
    batch gets the same answers), and raises KeyboardInterrupt at call `stop_at` (1-based)."""

    def __init__(self, stop_at=None, reason="eos"):
        self.calls, self.stop_at, self.reason = [], stop_at, reason

    def __call__(self, model, prompts, max_new_tokens, *, seed, chat, **kwargs):
        self.calls.append(dict(prompts=list(prompts), seed=seed, chat=chat, max_new_tokens=max_new_tokens, **kwargs))
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        texts = [f" the cat sat {seed} {i}" for i in range(len(prompts))]
        return Generation(texts, [[5, 6, 7]] * len(prompts), [[3]] * len(prompts), [self.reason] * len(prompts))


@pytest.fixture(scope="module")
def model():
    return Model(LLAMA, None, tokenizer=train_tokenizer())


def make(model, path, spy, tokens=120, key="k", prompts=None):
    return self_data.self_texts(model, prompts or sentences(9, 1), path, tokens, SAMPLING, key, generate=spy)


def test_the_cache_is_written_then_reused_and_a_stopped_one_resumed(model, tmp_path):
    first_spy = SpyGenerate()
    first = make(model, tmp_path / "a.jsonl", first_spy)
    batches = len(first_spy.calls)
    assert batches >= 3 and first.info["tokens"] >= 120 and first.info["batches_reused"] == 0
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == batches + 1 and json.loads(lines[0]) == {"key": "k"}
    assert [c["seed"] for c in first_spy.calls] == [7 + i for i in range(batches)]  # a seed per batch

    again = SpyGenerate()
    assert make(model, tmp_path / "a.jsonl", again).texts == first.texts and not again.calls  # reused whole

    with pytest.raises(KeyboardInterrupt):  # stopped while generating its second batch
        make(model, tmp_path / "b.jsonl", SpyGenerate(stop_at=2))
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 2  # the key and the first batch
    rest = SpyGenerate()
    resumed = make(model, tmp_path / "b.jsonl", rest)
    assert resumed.texts == first.texts and resumed.info["batches_reused"] == 1
    assert [c["seed"] for c in rest.calls] == [7 + i for i in range(1, batches)]
    assert [c["prompts"] for c in rest.calls] == [c["prompts"] for c in first_spy.calls[1:]]

    other = SpyGenerate()  # another key (model, prompts or sampling): generated afresh
    make(model, tmp_path / "b.jsonl", other, key="other")
    assert len(other.calls) == batches


def test_a_torn_last_batch_is_cut_off_and_generated_again(model, tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    whole = make(model, path, SpyGenerate())
    data = path.read_bytes()
    path.write_bytes(data[:-len(data.splitlines()[-1]) // 2])  # a kill halfway through the last append
    spy = SpyGenerate()
    with caplog.at_level(logging.WARNING, logger="streamline_jax.self_data"):
        again = make(model, path, spy)
    assert "ends in an unfinished batch" in caplog.text
    assert len(spy.calls) == 1 and again.texts == whole.texts
    records = lambda raw: [json.loads(line).get("records") for line in raw.splitlines()]  # noqa: E731
    assert records(path.read_bytes()) == records(data)  # every line whole again, none doubled


def test_the_chat_template_renders_prompt_and_answer(tmp_path, caplog):
    tokenizer = train_tokenizer()
    spy = SpyGenerate()
    with caplog.at_level(logging.INFO, logger="streamline_jax.self_data"):
        plain = make(Model(LLAMA, None, tokenizer=tokenizer), tmp_path / "plain.jsonl", spy, tokens=10)
    assert "no chat template" in caplog.text and not spy.calls[0]["chat"]
    assert plain.texts[0] == spy.calls[0]["prompts"][0] + " the cat sat 7 0"  # the prompt continued

    tokenizer.chat_template = TEMPLATE
    spy = SpyGenerate()
    chat = make(Model(LLAMA, None, tokenizer=tokenizer), tmp_path / "chat.jsonl", spy, tokens=10)
    assert spy.calls[0]["chat"] and chat.info["chat_template"]
    assert chat.texts[0] == f"<user>{spy.calls[0]['prompts'][0]}<assistant> the cat sat 7 0"

    tokenizer.chat_template = TEMPLATE + "{% if not add_generation_prompt %}<end>{% endif %}"
    spy, cut = SpyGenerate(), SpyGenerate(reason="length")
    ended = make(Model(LLAMA, None, tokenizer=tokenizer), tmp_path / "ended.jsonl", spy, tokens=10)
    assert ended.texts[0] == f"<user>{spy.calls[0]['prompts'][0]}<assistant> the cat sat 7 0<end>"
    unended = make(Model(LLAMA, None, tokenizer=tokenizer), tmp_path / "cut.jsonl", cut, tokens=10)
    assert unended.texts[0] == f"<user>{cut.calls[0]['prompts'][0]}<assistant> the cat sat 7 0"  # cut: no end


def test_corpus_prompts_take_passages_of_every_document_in_turn():
    docs = [" ".join(f"a{i}" for i in range(10)), " ".join(f"b{i}" for i in range(5)), "c0 c1"]
    prompts = list(self_data.CorpusPrompts(docs, words=4))
    assert prompts == ["a0 a1 a2 a3", "b0 b1 b2 b3", "c0 c1", "a4 a5 a6 a7"]  # then no passage is whole


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "file not found: {path}"),
    ("empty.txt", "\n  \n", "{path} holds no prompts"),
    ("bad.jsonl", '{"prompt": "hi"}\n{"answer": "no"}\n', "{path}, line 2: no prompt"),
])
def test_a_bad_prompts_file_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match="data.self_prompts: " + message.format(path=path)):
        self_data.read_prompts(path)


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n{"text": "two"}\n')
    assert self_data.read_prompts(tmp_path / "p.txt") == ["first prompt", "second"]
    assert self_data.read_prompts(tmp_path / "p.jsonl") == ["one", "two"]


@pytest.mark.parametrize("override, message", [
    ("data.self_prompts={missing}", "data.self_prompts: file not found: {missing}"),
    ("data.self_prompts={empty}", "data.self_prompts: {empty} holds no prompts"),
    ("train.distill_steps=0", "data.distill_text=self is the text of the distillation phase, and there is none"),
    ("data.self_top_p=1.5", "data.self_top_p must be in (0, 1]"),
])
def test_bad_self_data_settings_fail_before_any_work(files, tmp_path, capsys, override, message):
    paths = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt"}
    paths["empty"].write_text("")
    out = tmp_path / "out"
    assert run_mod.main(run_args(files, "llama", out, "train.distill_steps=2", "data.distill_text=self",
                                 override.format(**paths))) == 2
    assert message.format(**paths) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.pipeline
def test_the_distillation_trains_on_the_self_data(files, tmp_path, monkeypatch):
    from streamline_jax import train

    seen = []
    real = train.train_replacement

    def spy(dense_model, pruned_model, batches, options, **kwargs):
        seen.append((options.mode, [np.asarray(b["input_ids"]) for b in batches], kwargs["pair_cache"]))
        return real(dense_model, pruned_model, batches, options, **kwargs)

    monkeypatch.setattr(train, "train_replacement", spy)
    out = tmp_path / "out"
    assert run_mod.main(run_args(files, "llama", out, "prune.replacement=layer", "train.num_steps=2",
                                 "train.distill_steps=3", "train.pair_cache=true", "data.distill_text=self",
                                 "data.self_max_new_tokens=8", "data.self_batch_size=4", "--stages", "train")) == 0
    (mse, mse_rows, _), (kd, kd_rows, pairs) = seen
    assert (mse, kd) == ("mse", "kd") and pairs == out / "pair_cache" / "self_data"  # pairs of their own
    lines = (out / "self_data.jsonl").read_text().splitlines()[1:]
    texts = [r["text"] for line in lines for r in json.loads(line)["records"]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["llama"])
    cached = [c.tolist() for c in token_chunks(texts, tokenizer, 32)][:12]  # 3 steps x batch 4
    assert sorted(r.tolist() for rows in kd_rows for r in rows) == sorted(cached)
    assert not {tuple(r) for r in cached} & {tuple(r) for rows in mse_rows for r in rows.tolist()}
    distill = json.loads((out / "report.json").read_text())["training"]["distill"]
    assert distill["text"] == "self" and distill["self_data"]["chunks"] == 12
    assert distill["self_data"]["texts"] == len(texts) and "own text" in (out / "report.md").read_text()
    records = [r for line in lines for r in json.loads(line)["records"]]  # the model's answers, counted as packed
    assert all(r["text"].startswith(r["prompt"]) for r in records) and distill["self_data"]["generated_tokens"] > 0
    assert sum(r["tokens"] for r in records) == sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts) >= 12 * 32
    assert is_run_folder(out)  # the cache is the run's own file: the folder stays resumable, never foreign


@pytest.mark.pipeline
def test_a_mix_puts_the_models_answers_beside_training_chunks(files, tmp_path, monkeypatch):
    from streamline_jax import train

    seen = []
    real = train.train_replacement

    def spy(dense_model, pruned_model, batches, options, **kwargs):
        seen.append([np.asarray(b["input_ids"]) for b in batches])
        return real(dense_model, pruned_model, batches, options, **kwargs)

    monkeypatch.setattr(train, "train_replacement", spy)
    out = tmp_path / "out"
    assert run_mod.main(run_args(files, "llama", out, "prune.replacement=layer", "train.num_steps=2",
                                 "train.distill_steps=3", "train.pair_cache=true", "data.distill_text=self",
                                 "data.self_mix=0.25", "data.self_chunks=2", "data.self_max_new_tokens=8",
                                 "data.self_batch_size=4", "--stages", "train")) == 0
    mse_batches, kd_batches = seen
    assert len(kd_batches) == 3 and all(b.shape == (4, 32) for b in kd_batches)
    lines = (out / "self_data.jsonl").read_text().splitlines()[1:]
    texts = [r["text"] for line in lines for r in json.loads(line)["records"]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["llama"])
    own = [c.tolist() for c in token_chunks(texts, tokenizer, 32)][:2]  # data.self_chunks, one row a batch
    assert [b[0].tolist() for b in kd_batches] == [own[0], own[1], own[0]]  # cycled
    training = [r.tolist() for b in mse_batches for r in b]  # the MSE phase's chunks, in their order
    assert [r.tolist() for b in kd_batches for r in b[1:]] == training[:9]  # the first 3 x 3 training chunks
    made = json.loads((out / "report.json").read_text())["training"]["distill"]["self_data"]
    assert (made["self_rows"], made["corpus_chunks"], made["chunks"]) == (1, 9, 2)
    assert "1 rows of them, the rest training chunks" in (out / "report.md").read_text()


def test_a_mix_that_leaves_no_row_to_the_answers_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    for override, message in [("data.self_mix=0.1", "data.self_mix=0.1 must be in (0, 1]"),
                              ("data.self_mix=1.5", "data.self_mix=1.5 must be in (0, 1]"),
                              ("data.self_chunks=1", "data.self_chunks=1 fills no distillation batch")]:
        assert run_mod.main(run_args(files, "llama", out, "train.distill_steps=2", "data.distill_text=self",
                                     override)) == 2
        assert message in capsys.readouterr().err and not out.exists()
