"""Calibration data: local files through `datasets`, EOS-joined fixed-length chunks, disjoint splits, batches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import shared_data
from streamline_jax import data
from streamline_jax.loading import embedded_hf_folder, load_tokenizer

DOCS = ["The quick brown fox.", "Jumps over the lazy dog, again and again.", "", "A third document here."]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded_hf_folder("smollm2-135m"))


def write(tmp_path, suffix, docs=DOCS, field="text"):
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    elif suffix == ".json":
        path.write_text(json.dumps([{field: d} for d in docs]))
    elif suffix == ".txt":
        path.write_text("\n".join(docs) + "\n")
    else:
        pq.write_table(pa.table({field: docs}), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt", ".parquet"])
def test_local_formats_give_documents_in_order(tmp_path, suffix):
    source = data.text_source(write(tmp_path, suffix))
    assert list(source) == [d for d in DOCS if d]  # empty documents skipped
    assert list(source) == list(source)  # re-iterable: calibration then training reread it


def test_shuffled_documents_are_a_seeded_permutation_read_the_same_every_time(tmp_path):
    docs = [f"Document {i}." for i in range(50)]
    path = write(tmp_path, ".jsonl", docs)
    shuffled = data.text_source(path, shuffle_buffer=100, shuffle_seed=3)
    order = list(shuffled)
    assert sorted(order) == sorted(docs) and order != docs
    assert list(shuffled) == order  # calibration and training chunks come from one order, so they stay disjoint
    assert list(data.text_source(path, shuffle_buffer=100, shuffle_seed=3)) == order
    assert list(data.text_source(path, shuffle_buffer=100, shuffle_seed=4)) != order
    assert list(data.text_source(path, shuffle_buffer=0)) == docs
    with pytest.raises(data.DataError, match="shuffle_buffer must be non-negative, got -1"):
        data.text_source(path, shuffle_buffer=-1)


def test_folder_and_other_text_field(tmp_path):
    write(tmp_path, ".jsonl", field="body")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(data.text_source(tmp_path, text_field="body")) == [d for d in DOCS if d]


def test_chunks_are_eos_joined_documents_cut_in_order(tokenizer):
    docs = [f"Document number {i} says {'word ' * i}" for i in range(40)]
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    chunks = list(data.token_chunks(docs, tokenizer, 16, docs_per_call=7))
    assert len(chunks) == len(stream) // 16
    np.testing.assert_array_equal(np.concatenate(chunks), stream[:len(chunks) * 16])
    assert all(c.dtype == np.int32 and c.shape == (16,) for c in chunks)


def test_chunks_are_streamed(tokenizer):
    """Asking for the first chunks reads only the documents they need."""
    pulled = []

    def docs():
        for i in range(10_000):
            pulled.append(i)
            yield "some words to fill the chunks " * 5
    first = list(zip(range(3), data.token_chunks(docs(), tokenizer, 32, docs_per_call=4)))
    assert len(first) == 3 and len(pulled) <= 8


def test_split_never_overlaps():
    chunks = [np.full(4, i, np.int32) for i in range(20)]
    split = data.split_chunks(iter(chunks), calib=5, train=8, skip=2)
    train = list(split.train)
    assert [int(c[0]) for c in split.calib] == [2, 3, 4, 5, 6]
    assert [int(c[0]) for c in train] == list(range(7, 15))
    everything = list(data.split_chunks(iter(chunks), calib=3).train)
    assert [int(c[0]) for c in everything] == list(range(3, 20))


def test_batches():
    chunks = [np.arange(6, dtype=np.int32) + i for i in range(5)]
    out = list(data.batches(chunks, 2))
    assert [b["input_ids"].shape for b in out] == [(2, 6), (2, 6), (1, 6)]
    assert all(b["attention_mask"].dtype == np.int32 and b["attention_mask"].all() for b in out)
    np.testing.assert_array_equal(out[1]["input_ids"][1], chunks[3])
    assert len(list(data.batches(chunks, 2, drop_last=True))) == 2
    padded = list(data.batches(chunks, 2, pad_last=True))[-1]
    np.testing.assert_array_equal(padded["attention_mask"], [[1] * 6, [0] * 6])
    np.testing.assert_array_equal(padded["input_ids"][0], chunks[4])


def test_calibration_set_from_the_shared_corpus(tokenizer):
    source = data.text_source(shared_data("corpus", "train.jsonl"))
    split = data.split_chunks(data.token_chunks(source, tokenizer, 512), calib=50, train=2)
    assert len(split.calib) == 50 and len(list(split.train)) == 2
    with open(shared_data("corpus", "train.jsonl")) as f:
        first_doc = json.loads(f.readline())["text"]
    head = tokenizer(first_doc, add_special_tokens=False)["input_ids"][:512]
    np.testing.assert_array_equal(split.calib[0][:len(head)], head)


def test_bad_data(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(data.DataError, match="is empty"):
        data.text_source(empty)
    with pytest.raises(data.DataError, match="no text field 'content'.*'id', 'text'"):
        data.text_source(write(tmp_path, ".jsonl"), text_field="content")
    with pytest.raises(data.DataError, match="holds int"):
        data.text_source(write(tmp_path, ".jsonl"), text_field="id")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.text_source(tmp_path / "missing.jsonl")
    (tmp_path / "sub").mkdir()
    with pytest.raises(data.DataError, match="holds no"):
        data.text_source(tmp_path / "sub")
    short = data.token_chunks(data.text_source(write(tmp_path, ".txt")), tokenizer, 8)
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS if d)
    with pytest.raises(data.DataError, match=f"too short: it gives {tokens // 8} chunks, but 0 skipped \\+ 5 calib"):
        data.split_chunks(short, calib=5)
    split = data.split_chunks((np.zeros(4) for _ in range(3)), calib=1, train=5)
    with pytest.raises(data.DataError, match="only 2 training chunks after the first 1, 5 requested"):
        list(split.train)
    with pytest.raises(data.DataError, match="seq_len"):
        data.token_chunks(DOCS, tokenizer, 0)
