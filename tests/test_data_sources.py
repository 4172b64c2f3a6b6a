"""Where `{data}` comes from (streamline_jax.data_sources): $STREAMLINE_JAX_DATA, then ../shared/data beside a
checkout, then the Hugging Face hub through `datasets` (here: local folders in the hub repositories' layouts, read by
the real `datasets.load_dataset`), and the one error when there is none."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamline_jax import data_sources
from streamline_jax.tasks import PIQA, load_items
from tiny import fake_shared_data

NEEDED = ["{data}/corpus/train.jsonl", "{data}/corpus/valid.jsonl", "{data}/wikitext-2-raw/wiki.test.raw",
          "{data}/piqa/valid.jsonl", "{data}/piqa/valid-labels.lst"]
WIKI_ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", "", " = = Career = = \n"]
PIQA_ROWS = [{"goal": f"goal {i}", "sol1": f"a {i}", "sol2": f"b {i}", "label": i % 2} for i in range(5)]
CORPUS_ROWS = [{"text": f"document {i} about rivers and suns.", "id": str(i)} for i in range(40)] + [{"text": " ",
                                                                                                     "id": "blank"}]


def parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def card(folder: Path, config: str, split: str, pattern: str) -> None:
    """A dataset card whose `configs` map a config name to its parquet files, as the hub repositories' do."""
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: {split}\n"
                                      f"    path: {pattern}\n---\n")


def local_hub(root: Path) -> dict:
    """HUB with each repository replaced by a local folder in its layout on the hub (parquet files, no script)."""
    wiki, piqa, fineweb = root / "Salesforce__wikitext", root / "baber__piqa", root / "HuggingFaceFW__fineweb-edu"
    parquet(wiki / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet", [{"text": t} for t in WIKI_ROWS])
    parquet(wiki / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet", [{"text": " other \n"}])
    card(wiki, "wikitext-2-raw-v1", "test", "wikitext-2-raw-v1/test-*")
    parquet(piqa / "data" / "validation-00000-of-00001.parquet", PIQA_ROWS)
    parquet(piqa / "data" / "train-00000-of-00001.parquet", PIQA_ROWS[:1])
    parquet(fineweb / "sample" / "10BT" / "000_00000.parquet", CORPUS_ROWS)
    card(fineweb, "sample-10BT", "train", "sample/10BT/*")
    folders = {"wikitext-2": wiki, "piqa": piqa, "corpus": fineweb}
    return {part: dataclasses.replace(source, path=str(folders[part])) for part, source in data_sources.HUB.items()}


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """No $STREAMLINE_JAX_DATA, no ../shared/data, an empty cache: what a fresh install sees."""
    monkeypatch.delenv(data_sources.ENV, raising=False)
    monkeypatch.setattr(data_sources, "checkout_data_dir", lambda: tmp_path / "no-checkout" / "shared" / "data")
    monkeypatch.setenv("STREAMLINE_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_the_order_env_then_checkout_then_hub(tmp_path, monkeypatch, caplog):
    env, checkout = fake_shared_data(tmp_path / "env"), fake_shared_data(tmp_path / "checkout")
    monkeypatch.setattr(data_sources, "checkout_data_dir", lambda: checkout)
    monkeypatch.setenv("STREAMLINE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(data_sources.ENV, str(env))
    with caplog.at_level(logging.INFO, "streamline_jax.data_sources"):
        assert data_sources.provide(NEEDED) == env
        assert "$STREAMLINE_JAX_DATA" in caplog.text
        monkeypatch.delenv(data_sources.ENV)
        assert data_sources.provide(NEEDED) == checkout
        assert "../shared/data beside the checkout" in caplog.text
    monkeypatch.setattr(data_sources, "checkout_data_dir", lambda: tmp_path / "absent")
    assert data_sources.data_folder() == (tmp_path / "cache" / "data", "the Hugging Face hub")
    # the settings' own paths never need the folder
    assert data_sources.provide([str(env / "corpus" / "train.jsonl"), None, "owner/dataset"]) is None


def test_a_file_missing_from_the_env_folder_is_named_with_the_ways(tmp_path, monkeypatch):
    env = fake_shared_data(tmp_path / "env")
    (env / "piqa" / "valid-labels.lst").unlink()
    monkeypatch.setenv(data_sources.ENV, str(env))
    with pytest.raises(data_sources.DataUnavailable, match=r"\$STREAMLINE_JAX_DATA\): \{data\}/piqa/valid-labels"):
        data_sources.provide(NEEDED)


def test_the_hub_path_through_datasets_on_the_hubs_layout(no_local_data, monkeypatch, caplog):
    monkeypatch.setattr(data_sources, "HUB", local_hub(no_local_data / "hub"))
    with caplog.at_level(logging.INFO, "streamline_jax.data_sources"):
        folder = data_sources.provide(NEEDED)
    assert folder == no_local_data / "cache" / "data"
    assert "from the Hugging Face hub" in caplog.text
    wiki = (folder / "wikitext-2-raw" / "wiki.test.raw").read_text()
    assert wiki == " = Robert Boulter = \n Robert Boulter is an English actor . \n = = Career = = \n"
    items = load_items(PIQA.replace(source=str(folder / "piqa" / "valid.jsonl"),
                                    labels_file=str(folder / "piqa" / "valid-labels.lst")))
    assert [i.label for i in items] == [0, 1, 0, 1, 0] and items[3].choices[1].strip() == "b 3"
    train = [json.loads(s)["text"] for s in (folder / "corpus" / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(s)["text"] for s in (folder / "corpus" / "valid.jsonl").read_text().splitlines()]
    assert len(train) == 36 and len(valid) == 4 and valid[0].startswith("document 9 ")  # every 10th, no blank
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folder left
    caplog.clear()
    with caplog.at_level(logging.INFO, "streamline_jax.data_sources"):
        assert data_sources.provide(NEEDED) == folder  # read from the cache afterwards
    assert "from the Hugging Face hub into" not in caplog.text


def test_the_download_command_writes_the_local_layout(no_local_data, monkeypatch, capsys):
    monkeypatch.setattr(data_sources, "HUB", local_hub(no_local_data / "hub"))
    target = no_local_data / "offline-data"
    assert data_sources.main(["download", str(target), "--parts", "piqa,wikitext-2"]) == 0
    assert "wrote piqa, wikitext-2" in capsys.readouterr().out
    assert data_sources.main(["download", str(target)]) == 0
    assert "wrote corpus; kept wikitext-2, piqa" in capsys.readouterr().out
    monkeypatch.setenv(data_sources.ENV, str(target))
    assert data_sources.provide(NEEDED) == target
    assert data_sources.main(["download", str(target), "--parts", "piqa,squad"]) == 2


def test_no_data_and_no_hub_is_one_error_before_the_model_loads(tiny_files, tmp_path):
    """The run's command line with no $STREAMLINE_JAX_DATA, no ../shared/data and the hub offline."""
    code = ("import sys, pathlib; from streamline_jax import data_sources, run; "
            "data_sources.checkout_data_dir = lambda: pathlib.Path('/nonexistent/shared/data'); "
            "sys.exit(run.main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != data_sources.ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", STREAMLINE_JAX_CACHE=str(tmp_path / "cache"),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(data_sources.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code, "--model", str(tiny_files["llama"]), "--out",
                          str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no data for {data}/corpus/train.jsonl" in errors[0], out.stderr
    assert "STREAMLINE_JAX_DATA" in errors[0] and "streamline-jax-data download" in errors[0]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_a_failed_download_leaves_nothing_behind(no_local_data, monkeypatch, capsys):
    def unreachable(self):
        raise ConnectionError(f"Couldn't reach '{self.path}' on the Hub")

    monkeypatch.setattr(data_sources.HubSource, "load", unreachable)
    target = no_local_data / "offline-data"
    assert data_sources.main(["download", str(target)]) == 1
    assert "error: the Hugging Face hub failed (ConnectionError: Couldn't reach" in capsys.readouterr().err
    assert not target.exists()
    with pytest.raises(data_sources.DataUnavailable, match=r"STREAMLINE_JAX_DATA.*streamline-jax-data download"):
        data_sources.provide(["{data}/piqa/valid.jsonl"])
    assert not (no_local_data / "cache" / "data").exists()
