"""`--sweep`: one load, one scoring pass and one dense evaluation for every point; each point resumable on its own
and never recomputed once finished; the dense evaluation cached on disk by content for later runs."""

from __future__ import annotations

import json

import pytest

from streamline_jax import evaluation, loading, pipeline, run as run_mod, score, sweep
from helpers import run_args as _args


@pytest.fixture
def counted(monkeypatch):
    """Calls of load, score_spans and evaluate (dense and pruned each count one, also when evaluated together)
    during the test."""
    calls = {"load": 0, "score": 0, "evaluate": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += len(a[0].models) if isinstance(a[0], evaluation.ModelGroup) else 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(loading, "load", counting("load", loading.load))
    monkeypatch.setattr(score, "score_spans", counting("score", score.score_spans))
    monkeypatch.setattr(evaluation, "evaluate", counting("evaluate", evaluation.evaluate))
    return calls


def _sweep_args(files, out, *axes, extra=()):
    args = _args(files, "llama", out, "samples.prompts=[]", "train.num_steps=2", *extra)
    return args + [a for axis in axes for a in ("--sweep", axis)]


@pytest.mark.pipeline
def test_sweep_shares_load_scoring_and_dense_evaluation(files, tmp_path, counted, monkeypatch):
    monkeypatch.setenv("STREAMLINE_JAX_RESULTS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = _sweep_args(files, out, "score.num_layers=1,2", "prune.replacement=none,layer", extra=["--stages",
                                                                                                  "prune,evaluate"])
    assert run_mod.main(args) == 0
    assert counted == {"load": 1, "score": 1, "evaluate": 1 + 4}  # the dense model once, each point once
    report = json.loads((out / "report.json").read_text())
    names = [r["point"] for r in report["points"]]
    assert names == ["score.num_layers=1,prune.replacement=none", "score.num_layers=1,prune.replacement=layer",
                     "score.num_layers=2,prune.replacement=none", "score.num_layers=2,prune.replacement=layer"]
    for r in report["points"]:
        point = json.loads((out / "points" / r["point"] / "report.json").read_text())
        assert (out / "points" / r["point"] / "DONE").exists()
        assert r["spans"] == [[point["span"]["start"], point["span"]["length"]]]
        assert r["params"] == point["params"]["pruned"] and r["params"] <= report["dense"]["params"]
        ppl = point["evaluation"]["pruned"]["tasks"]["text"]["perplexity"]
        assert r["tasks"]["text"] == pytest.approx(ppl)
        dense_ppl = point["evaluation"]["dense"]["tasks"]["text"]["perplexity"]
        assert report["dense"]["tasks"]["text"] == pytest.approx(dense_ppl)
    # a layer block is one layer more than none at the same span length
    by_name = {r["point"]: r for r in report["points"]}
    assert by_name["score.num_layers=2,prune.replacement=layer"]["params"] > \
        by_name["score.num_layers=2,prune.replacement=none"]["params"]
    assert (out / "plots" / "sweep.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| dense |" in md and all(n in md for n in names)
    # again: every point is finished, so nothing is loaded or computed
    assert run_mod.main(args) == 0
    assert counted == {"load": 1, "score": 1, "evaluate": 5}
    # a plain run on the same model and evaluation settings takes the dense evaluation from the cache
    assert run_mod.main(_args(files, "llama", tmp_path / "one", "samples.prompts=[]", "train.num_steps=2")) == 0
    assert counted["evaluate"] == 5 + 1
    assert list((tmp_path / "cache" / "dense_eval").glob("*.json"))


@pytest.mark.pipeline
def test_an_interrupted_sweep_resumes_where_it_stopped(files, tmp_path, counted, monkeypatch):
    monkeypatch.setenv("STREAMLINE_JAX_RESULTS_CACHE", "off")
    out = tmp_path / "sweep"
    args = _sweep_args(files, out, "score.num_layers=1,2", extra=["--stages", "train"])
    real_run = pipeline.run
    started = []

    def second_point_fails(config, folder, *a, **k):
        started.append(folder.name)
        if len(started) == 2:
            raise ValueError("the second point broke")
        return real_run(config, folder, *a, **k)

    monkeypatch.setattr(pipeline, "run", second_point_fails)
    assert run_mod.main(args) == 2
    assert (out / "points" / "score.num_layers=1" / "DONE").exists()
    assert not (out / "points" / "score.num_layers=2").exists()
    # the report of the points so far says the sweep is incomplete, naming what is missing
    assert json.loads((out / "report.json").read_text())["unfinished"] == ["score.num_layers=2"]
    assert ("**Incomplete: 1 of 2 points finished**; not yet run: score.num_layers=2"
            in (out / "report.md").read_text())
    monkeypatch.setattr(pipeline, "run", real_run)
    loads = counted["load"]
    assert run_mod.main(args) == 0
    assert counted["load"] == loads + 1  # only the unfinished point ran
    report = json.loads((out / "report.json").read_text())
    assert [r["point"] for r in report["points"]] == ["score.num_layers=1", "score.num_layers=2"]
    assert report["unfinished"] == [] and "Incomplete" not in (out / "report.md").read_text()
    # other base settings in the same folder: refused, naming them
    assert run_mod.main(args + ["train.lr=5e-3"]) == 2


@pytest.mark.parametrize("axis, message", [
    ("score.sparsityy=0.1,0.2", "sparsityy"),
    ("score.sparsity", "is not key=value1,value2"),
    ("score.sparsity=0.1,,0.2", "is not key=value1,value2"),
])
def test_bad_sweep_arguments_are_clear_errors(files, tmp_path, axis, message, capsys):
    assert run_mod.main(_sweep_args(files, tmp_path / "s", axis)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_bad_value_at_any_point_fails_before_any_work(files, tmp_path, capsys):
    assert run_mod.main(_sweep_args(files, tmp_path / "s", "score.num_layers=1,99")) == 2
    assert "99" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_values_split_outside_brackets():
    assert sweep.split_values("0.1,0.2") == ["0.1", "0.2"]
    assert sweep.split_values("[piqa,wikitext2],[piqa]") == ["[piqa,wikitext2]", "[piqa]"]


@pytest.mark.pipeline
def test_two_spans_each_get_a_trained_block_and_export(files, tmp_path):
    import numpy as np
    import torch
    import transformers

    from streamline_jax.models.model import forward

    out = tmp_path / "two"
    args = _args(files, "llama", out, "samples.prompts=[]", "train.num_steps=2", "score.num_layers=4",
                 "score.spans=2", "prune.replacement=layer", "--stages", "train,save")
    assert run_mod.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    spans = [(s["start"], s["length"]) for s in report["spans"]]
    assert [n for _, n in spans] == [2, 2] and spans[0][0] + 2 < spans[1][0]  # apart
    assert [b["span"] for b in report["training"]["blocks"]] == [list(s) for s in spans]
    assert all(len(b["train"]) == 2 for b in report["training"]["blocks"])
    pruned = loading.load(out / "model")
    assert pruned.config.pruned_spans == tuple((s, n, "layer") for s, n in spans)
    dense = loading.load(files["llama"])
    blocks = [f"seg_{i}" for i, seg in enumerate(pruned.config.layout) if seg.kind == "layer"]
    assert len(blocks) == 2
    for key, (s, _) in zip(blocks, spans):  # each block trained away from the layer it was copied from
        trained = np.asarray(pruned.params["segments"][key]["mlp"]["down_proj"]["kernel"])
        copied = np.asarray(dense.params["segments"]["seg_0"]["mlp"]["down_proj"]["kernel"][s])
        assert trained.shape == copied.shape and not np.allclose(trained, copied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    ids = np.array([[5, 9, 3, 17, 22, 8, 1, 4]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(pruned, ids)), ref, atol=2e-4 * np.abs(ref).max())


@pytest.mark.pipeline
def test_sweeping_one_of_sparsity_and_num_layers_sets_the_other_to_null(files, tmp_path):
    base = [a for a in _args(files, "llama", tmp_path / "by_length", "samples.prompts=[]")
            if a not in ("score.sparsity=null", "score.num_layers=2")]  # pipeline.yaml's sparsity stays
    assert run_mod.main(base + ["--stages", "prune", "--sweep", "score.num_layers=1,2"]) == 0
    report = json.loads((tmp_path / "by_length" / "report.json").read_text())
    assert [r["spans"][0][1] for r in report["points"]] == [1, 2]
    # the base sets num_layers on the command line; the swept sparsity replaces it
    args = _args(files, "llama", tmp_path / "by_sparsity", "samples.prompts=[]")
    assert run_mod.main(args + ["--stages", "score", "--sweep", "score.sparsity=0.2,0.4"]) == 0
    config, _ = run_mod.build_config(None, None, sweep.point_overrides(["score.num_layers=2"], [("score.sparsity",
                                                                                                  "0.3")]))
    assert (config.score.sparsity, config.score.num_layers) == (0.3, None)
    with pytest.raises(run_mod.ConfigError, match="exactly one of score.sparsity"):  # both swept: both set
        run_mod.build_config(None, None, sweep.point_overrides([], [("score.sparsity", "0.3"),
                                                                    ("score.num_layers", "2")]))
