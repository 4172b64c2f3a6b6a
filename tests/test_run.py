"""The `python -m streamline_jax.run` CLI end to end on tiny random Llama and OPT Hugging Face folders (with a tiny
trained tokenizer and tiny data files), its settings layers, presets, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
import yaml

from streamline_jax import run as run_mod
from streamline_jax.loading import load
from streamline_jax.models import transformer
from streamline_jax.models.model import forward
from helpers import run_args as _args
from tiny import LLAMA, hf_folder


@pytest.mark.pipeline
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("replacement", ["none", "layer", "ffn"])
def test_cli_end_to_end_hf_export_matches_pruned_model(files, tmp_path, family, replacement):
    out = tmp_path / "out"
    # the whole pipeline for two of the six; the others skip evaluation (the slow part on a shared CPU)
    full = (family, replacement) in (("llama", "layer"), ("opt", "ffn"))
    stages = [] if full else ["--stages", "train,save"]
    assert run_mod.main(_args(files, family, out, f"prune.replacement={replacement}", *stages)) == 0
    assert (out / "DONE").exists()
    report = json.loads((out / "report.json").read_text())
    span = report["span"]
    assert span["length"] == 2 and report["params"]["pruned_layers"] == 6 - 2 + (replacement != "none")
    # the Orbax checkpoint reads back through streamline_jax.load ...
    pruned = load(out / "model")
    assert pruned.config.pruned_spans == ((span["start"], 2, replacement),)
    assert pruned.num_params == report["params"]["pruned"]
    # ... and the Hugging Face folder loads with stock transformers classes and gives the same logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    assert type(hf).__module__.startswith("transformers.models.")
    assert hf.config.num_hidden_layers == pruned.config.depth
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
    ids = np.asarray(tok(["the big cat sat on a red mat near the river"])["input_ids"])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(pruned, ids))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-5
    dense = load(files[family])
    assert np.max(np.abs(np.asarray(forward(dense, ids)) - ref)) > 1e-3  # really pruned
    if replacement != "none":
        train = report["training"]["train"]
        assert len(train) == 4 and report["training"]["mode"] == "mse"
        assert (out / "plots" / "loss.png").exists()
    assert {"span_scores.png", "block_influence.png"} <= {p.name for p in (out / "plots").iterdir()}
    md = (out / "report.md").read_text()
    assert "## Chosen span" in md
    assert f"- compute: {report['model']['compute_dtype']} (" in md  # what ran, and why `auto` chose it
    if full:
        assert "text" in report["evaluation"]["pruned"]["tasks"]
        assert "| text | perplexity |" in md and "## Samples" in md
        # dense and pruned evaluated together: the layers before the span (untrained) once for both
        assert report["evaluation_shared_layers"] == span["start"] and "together" in report["evaluation_s"]


@pytest.mark.pipeline
def test_linear_block_by_perplexity_fits_without_training(files, tmp_path, monkeypatch):
    """score.metric=perplexity picks the span with the least calibration loss (its costs in the report), and a
    `linear` block is fitted in closed form: no training stage, Orbax only. Scoring, the span choice and the fit
    share one tokenization of the calibration chunks."""
    from streamline_jax import data

    calls = []
    token_chunks = data.token_chunks
    monkeypatch.setattr(data, "token_chunks", lambda source, *a, **k: calls.append(source) or token_chunks(
        source, *a, **k))
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "prune.replacement=linear", "score.metric=perplexity",
                              "--stages", "train,save")) == 0
    report = json.loads((out / "report.json").read_text())
    costs = {int(s): v for s, v in report["span_costs"]["losses"].items()}
    assert report["span"]["start"] == min(costs, key=costs.get) and report["span"]["metric"] == "perplexity"
    assert "training" not in report and 0 <= report["linear_fit"][0]["relative_error"] < 1
    assert "linear" in report["outputs"]["hf"]
    assert len(calls) == len(set(map(id, calls))), "a source was tokenized twice"
    pruned = load(out / "model")
    kinds = [s.kind for s in pruned.config.layout]
    assert kinds.count("linear") == 1
    assert np.any(np.asarray(pruned.params["segments"][f"seg_{kinds.index('linear')}"]["linear"]["kernel"]))


@pytest.mark.pipeline
def test_init_linear_needs_a_block_with_an_output_projection_and_last_drops_the_last_layers(files, tmp_path):
    with pytest.raises(run_mod.ConfigError, match="prune.init=linear"):
        run_mod.build_config(None, None, ["prune.init=linear", "prune.replacement=none"])
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "prune.replacement=layer", "prune.init=linear",
                              "prune.fit_weighting=uniform", "score.metric=last", "train.num_steps=1",
                              "--stages", "train")) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["span"]["start"], report["span"]["end"]) == (4, 6)
    [fit] = report["linear_fit"]  # the copied layer's down projection, refitted: closer to the span than the copy
    assert fit["relative_error"] < fit["start_error"]


@pytest.mark.pipeline
def test_mlp_writes_orbax_only(files, tmp_path):
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "prune.replacement=mlp", "--stages", "train,save")) == 0
    assert (out / "model").is_dir() and not (out / "hf").exists() and (out / "DONE").exists()
    assert "mlp" in json.loads((out / "report.json").read_text())["outputs"]["hf"]


@pytest.mark.pipeline
def test_kd_training_beyond_the_block_from_the_settings(files, tmp_path, monkeypatch):
    from streamline_jax import train

    settings = []
    real_settings = train.program.distillation_settings
    monkeypatch.setattr(train.program, "distillation_settings", lambda *a: settings.append(real_settings(*a)) or settings[-1])
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "train.mode=kd", "train.kd_temperature=2", "train.kd_ce_weight=0.5",
                              "train.kd_hidden_layers=[-1]", "train.kd_hidden_weight=0.1", "train.kd_hidden_every=1",
                              "score.protect_last=2", "train.trainable=[block, final_norm/.*]",
                              "--stages", "train")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["mode"] == "kd" and report["training"]["train"]
    span, depth = report["span"], 6  # a span before the last two layers: every layer from its output on is matched
    assert span["end"] <= depth - 2 and [t for t, _ in settings[-1].hidden_pairs] == list(range(span["end"] - 1, depth))


@pytest.mark.pipeline
def test_distill_phase_trains_what_its_own_settings_say(files, tmp_path):
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "prune.replacement=layer", "train.num_steps=2",
                              "train.distill_steps=6", "train.distill_trainable=[block, final_norm/.*]",
                              "train.distill_freeze=[]", "train.distill_lr_beyond_block=1e-4", "data.valid_chunks=0",
                              "--stages", "train,save")) == 0
    distill = json.loads((out / "report.json").read_text())["training"]["distill"]
    assert (distill["trainable"], distill["freeze"]) == (["block", "final_norm/.*"], [])
    assert distill["lr_beyond_block"] == 1e-4
    assert len(distill["train"]) == 6  # more steps than the 4 batches of one pass: the chunks are read again
    dense, pruned = (load(p) for p in (files["llama"], out / "model"))  # no validation: the distilled model kept
    assert not np.array_equal(dense.params["final_norm"]["scale"], pruned.params["final_norm"]["scale"])


@pytest.mark.pipeline
def test_distill_phase_after_mse_training_resumes_where_it_stopped(files, tmp_path, monkeypatch, caplog):
    from streamline_jax import train

    # a checkpoint at every step (by time): the distillation's own default is one at its end
    args = ["prune.replacement=layer", "train.epochs=2", "train.distill_steps=3", "train.checkpoint_minutes=1e-9",
            "train.pair_cache=true", "--stages", "train"]
    fresh = tmp_path / "fresh"
    with jax.log_compiles(True):
        assert run_mod.main(_args(files, "llama", fresh, *args)) == 0
    # each phase's step compiles once (the first step's inputs are committed to the device like its outputs)
    assert caplog.text.count("Compiling jit(train_step)") == 2
    done = json.loads((fresh / "report.json").read_text())["training"]
    assert done["mode"] == "mse" and len(done["train"]) == 8
    distill = done["distill"]
    assert distill["mode"] == "kd" and [s for s, *_ in distill["train"]] == [1, 2, 3]
    assert [s for s, _ in distill["valid"]] == [0, 3]  # the better of the MSE-trained block and the distilled one
    assert "then distillation: kd loss, 3 steps" in (fresh / "report.md").read_text()
    # the default: the block, less its attention (null: as the MSE phase's), and every other layer at 3e-4
    assert (distill["trainable"], distill["freeze"]) == (["block", "segments/.*"], ["attention"])
    assert distill["lr_beyond_block"] == 3e-4

    out = tmp_path / "out"
    real_save = train.checkpoints._save

    def interrupt_in_the_distill_phase(manager, step, *a, **k):
        real_save(manager, step, *a, **k)
        if "distill_checkpoint" in str(manager.directory) and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.checkpoints, "_save", interrupt_in_the_distill_phase)
    assert run_mod.main(_args(files, "llama", out, *args)) == 130
    monkeypatch.setattr(train.checkpoints, "_save", real_save)
    assert run_mod.main(_args(files, "llama", out, *args)) == 0
    resumed = json.loads((out / "report.json").read_text())["training"]
    np.testing.assert_allclose([l for _, l, *_ in resumed["distill"]["train"]],
                               [l for _, l, *_ in distill["train"]], rtol=1e-5)
    np.testing.assert_allclose([l for _, l in resumed["distill"]["valid"]], [l for _, l in distill["valid"]],
                               rtol=1e-5)


@pytest.mark.pipeline
def test_scoring_only(files, tmp_path, capsys):
    import re

    out = tmp_path / "out"
    assert run_mod.main(_args(files, "opt", out, "--stages", "score")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"] == ["score"] and "span" in report and "training" not in report
    assert not (out / "model").exists()
    # each module logs by its own name; the package logger's handlers show them on the console and in run.log
    err, run_log = capsys.readouterr().err, (out / "run.log").read_text()
    for line in ("[score] started", "chosen span"):
        assert re.search(rf"^\d\d:\d\d:\d\d .*{re.escape(line)}", err, re.M) and line in run_log, (line, err)


@pytest.mark.pipeline
def test_finished_output_folder_is_refused_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 0
    before = (out / "report.json").read_text()
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 2
    assert "finished run" in capsys.readouterr().err and (out / "report.json").read_text() == before
    assert run_mod.main(_args(files, "llama", out, "--stages", "score", "--resume")) == 2
    assert run_mod.main(_args(files, "llama", out, "--stages", "score", "--overwrite", "score.num_layers=3")) == 0
    assert json.loads((out / "report.json").read_text())["span"]["length"] == 3
    assert "--overwrite: the new run is written in" in capsys.readouterr().err  # run_folder.py's logger


def test_unrelated_folder_is_never_overwritten(files, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert run_mod.main(_args(files, "llama", tmp_path, "--overwrite")) == 2
    assert "holds no streamline_jax run" in capsys.readouterr().err and (tmp_path / "mine.txt").exists()


def test_model_without_tokenizer_is_refused_before_loading(files, tmp_path, capsys):
    folder = hf_folder(tmp_path / "notok", LLAMA, tokenizer=False)
    assert run_mod.main(_args(files, "llama", tmp_path / "out", "--model", str(folder))) == 2
    assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.pipeline
def test_ctrl_c_during_training_then_resume(files, tmp_path, monkeypatch):
    from streamline_jax import train

    out = tmp_path / "out"
    args = _args(files, "llama", out, "prune.replacement=layer", "train.checkpoint_every=1", "--stages", "train")
    saves = []
    real_save = train.checkpoints._save

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C came right after the second checkpoint

    monkeypatch.setattr(train.checkpoints, "_save", save_then_interrupt)
    assert run_mod.main(args) == 130
    assert not (out / "DONE").exists() and not (out / "report.json").exists()
    assert (out / "train_checkpoint").is_dir()
    assert (out / "FAILED").read_text().strip() == "stage train: interrupted"
    monkeypatch.setattr(train.checkpoints, "_save", real_save)
    assert run_mod.main(args + ["train.lr=2e-3"]) == 2  # other settings: refused, the checkpoint kept
    assert (out / "train_checkpoint").is_dir()
    assert run_mod.main(args) == 0  # the same settings: it resumes by itself
    assert not (out / "FAILED").exists()
    report = json.loads((out / "report.json").read_text())
    assert [s for s, *_ in report["training"]["train"]] == [1, 2, 3, 4]
    assert (out / "DONE").exists()
    # the resumed result equals an uninterrupted run's
    fresh = tmp_path / "fresh"
    assert run_mod.main(_args(files, "llama", fresh, "prune.replacement=layer", "train.checkpoint_every=1",
                              "--stages", "train")) == 0
    uninterrupted = json.loads((fresh / "report.json").read_text())["training"]["train"]
    np.testing.assert_allclose([l for _, l, _ in report["training"]["train"]], [l for _, l, _ in uninterrupted],
                               rtol=1e-5)


@pytest.mark.pipeline
def test_failed_run_says_what_failed_and_the_same_command_resumes_it(files, tmp_path, monkeypatch, capsys):
    from streamline_jax import evaluation

    out = tmp_path / "out"
    args = _args(files, "llama", out, "prune.replacement=layer", "train.checkpoint_every=1")

    def broken(*a, **k):
        raise ValueError("the evaluation broke")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    assert run_mod.main(args) == 2
    err = capsys.readouterr().err
    assert "the evaluation broke" in err and "the same command continues it" in err
    assert (out / "FAILED").read_text().strip() == "stage evaluate: ValueError: the evaluation broke"
    assert not (out / "DONE").exists()
    monkeypatch.undo()
    # other settings: refused, naming each difference and the flag; nothing deleted
    assert run_mod.main(args + ["train.lr=2e-3", "data.seq_len=16"]) == 2
    err = capsys.readouterr().err
    assert "it stopped in stage evaluate: ValueError: the evaluation broke" in err
    assert "data.seq_len: 32 -> 16" in err and "train.lr: 0.001 -> 0.002" in err and "--overwrite" in err
    assert (out / "train_checkpoint").is_dir()
    # the same settings: resumes (training is read back from its last checkpoint) and finishes
    from streamline_jax import run_folder

    caplog_lines = []
    monkeypatch.setattr(run_folder.log, "info", lambda msg, *a: caplog_lines.append(msg % a))
    assert run_mod.main(args) == 0
    assert any("unfinished run with the same settings (it stopped in stage evaluate" in line and "resuming" in line
               for line in caplog_lines)
    assert (out / "DONE").exists() and not (out / "FAILED").exists()
    summary = capsys.readouterr().out
    assert "span: layers" in summary and "parameters: " in summary and "text perplexity" in summary
    assert f"outputs in {out}" in summary


@pytest.mark.pipeline
def test_a_folder_in_use_by_another_run_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    with run_mod.folder_lock(out):  # as another live run would hold it
        run_mod.mark_holder(out)
        assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another run (pid " in err and "started" in err
    assert not (out / "run_config.yaml").exists()
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 0  # free once the holder is gone


# --------------------------------------------------------------------------------------------------------------
# Settings


def test_unknown_preset_suggests_the_nearest(capsys):
    assert run_mod.main(["--model", "llama2-13", "--out", "/nonexistent/x"]) == 2
    assert "did you mean 'llama2-13b'" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr must be a number"),
    ("data.seq_len=1.5", "data.seq_len must be an integer"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer must be >= 0"),
    ("export.hf=maybe", "export.hf must be true or false"),
    ("train.lrr=1e-4", "did you mean 'train.lr'"),
    ("lr=1e-4", "did you mean 'train.lr'"),
    ("prune.replacement=layers", "did you mean 'layer'"),
    ("trian.lr=1e-4", "did you mean 'train"),
    ("train.kd_hidden_layers=[a]", "train.kd_hidden_layers must be a list of integers"),
    ("train.kd_temperature=0", "train.kd_temperature must be > 0"),
    ("train.kd_ce_weight=2", r"train.kd_ce_weight is the cross-entropy's share of the KD loss"),
    ("train.trainable=[seg_2(]", "train.trainable: 'seg_2(' is not a regular expression"),
    ("train.trainable=[block,lm_head]", "train.mode=mse trains the block only"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.log_every=2.5", "train.log_every must be an integer"),
    ("train.distill_steps=-1", "train.distill_steps must be >= 0"),
    ("train.distill_lr_beyond_block=0", "train.distill_lr_beyond_block must be > 0"),
    ("train.distill_trainable=[]", "train.distill_trainable is empty"),
    ("train.distill_freeze=[self_attn(]", "train.distill_freeze: 'self_attn(' is not a regular expression"),
])
def test_bad_overrides_are_clear_errors(override, message, capsys):
    assert run_mod.main(["--out", "/nonexistent/x", override]) == 2
    assert message in capsys.readouterr().err


def test_settings_layers(tmp_path):
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"lr": 1e-4, "mode": "lm"}, "eval": {"tasks": ["piqa"]}}))
    config, preset = run_mod.build_config("smollm2-135m", str(cfg_file), ["train.lr=3e-4", "score.sparsity=0.3"])
    assert preset == "smollm2-135m"
    assert config.train.lr == 3e-4 and config.train.mode == "lm" and config.eval.tasks == ("piqa",)
    assert config.data.seq_len == 512 and config.train.pair_cache  # from the preset
    assert config.train.weight_decay == 1e-3  # from pipeline.yaml
    assert config.train.freeze == ("attention",) and config.train.shuffle  # the default recipe
    # the paper's recipe is one file away, on the preset's sizes
    paper, _ = run_mod.build_config("smollm2-135m", str(run_mod.CONFIG_DIR / "recipes" / "paper.yaml"))
    assert (paper.train.lr, paper.train.freeze, paper.train.shuffle, paper.train.epochs) == (2e-4, (), False, 1)
    assert paper.data.seq_len == 512 and paper.score.sparsity == 0.2
    # the embedded preset distils on the model's answers; where the settings leave no distillation phase, the corpus
    assert paper.data.distill_text == "corpus" and config.data.distill_text == "self"  # mode lm, then distillation
    assert run_mod.build_config(None, None, ["train.mode=kd"])[0].data.distill_text == "corpus"
    with pytest.raises(run_mod.ConfigError, match="or data.distill_text=corpus"):  # asked for, it must have a phase
        run_mod.build_config(None, None, ["train.distill_steps=0", "data.distill_text=self"])
    config, _ = run_mod.build_config(None, None, ["train.freeze=[self_attn, input_layernorm]"])
    assert config.train.freeze == ("self_attn", "input_layernorm")
    config, _ = run_mod.build_config(None, None, ["train.mode=kd", "train.kd_temperature=2", "train.kd_ce_weight=0.5",
                                                  "train.kd_hidden_layers=[-1, 20]", "train.kd_hidden_weight=1e-3",
                                                  "train.trainable=[block, segments/seg_2/.*mlp.*]"])
    t = config.train
    assert (t.mode, t.kd_temperature, t.kd_ce_weight, t.kd_hidden_layers, t.kd_hidden_weight) == (
        "kd", 2.0, 0.5, (-1, 20), 1e-3)
    assert t.trainable == ("block", "segments/seg_2/.*mlp.*") and paper.train.trainable == ("block",)
    with pytest.raises(run_mod.ConfigError, match="exactly one of score.sparsity"):
        run_mod.build_config(None, None, ["score.num_layers=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("score:\n  metrik: cosine\n")
    with pytest.raises(run_mod.ConfigError, match=r"bad.yaml: unknown key 'score.metrik'; did you mean 'score.metric'"):
        run_mod.build_config(None, str(bad))
    assert run_mod.parse_stages("train") == ("score", "prune", "train")
    with pytest.raises(run_mod.ConfigError, match="did you mean 'evaluate'"):
        run_mod.parse_stages("evaluat")


# train_replacement's arguments that the pipeline gives from elsewhere than the train section
def test_every_training_option_of_the_api_is_a_setting_with_its_default():
    import dataclasses

    from streamline_jax.train import TrainOptions

    # the settings' type is the API's options type, plus whether to keep a pair cache and to offload the span (the
    # API takes their folders) and the run's distillation phase
    assert issubclass(run_mod.TrainSection, TrainOptions)
    section = {f.name: f.default for f in dataclasses.fields(run_mod.TrainSection)}
    # the run's second (kd) phase: train_replacement again
    run_only = {"pair_cache", "offload_span", "distill_steps", "distill_lr", "distill_lr_beyond_block",
                "distill_trainable", "distill_freeze"}
    assert {k: v for k, v in section.items() if k not in run_only} == dataclasses.asdict(TrainOptions())
    assert set(run_mod.read_yaml(run_mod.CONFIG_DIR / "pipeline.yaml")["train"]) == set(section)


def test_every_preset_parses_and_matches_the_shape_table():
    from streamline_jax.models.presets import PRESETS

    assert set(run_mod.preset_names()) == set(PRESETS)
    for name in run_mod.preset_names():
        config, preset = run_mod.build_config(name)
        assert preset == name and config.model.architecture
        shapes = run_mod.preset_model_config(name)
        ref = PRESETS[name]
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "tie_word_embeddings", "family"):
            assert getattr(shapes, field) == getattr(ref, field), (name, field)


@pytest.mark.parametrize("name, billions", [("llama2-7b", 6.74), ("llama2-13b", 13.0), ("opt-6.7b", 6.66)])
def test_preset_parameter_counts_equal_the_published(name, billions):
    config = run_mod.preset_model_config(name)
    count = transformer.count_params(transformer.abstract_params(config))  # jax.eval_shape: no memory
    assert float(f"{count / 1e9:.3g}") == billions, count  # to the published 3 significant figures


@pytest.mark.pipeline
def test_convert_and_export_scripts_round_trip(files, tmp_path):
    import importlib.util

    def script(name):
        spec = importlib.util.spec_from_file_location(name, Path(run_mod.__file__).parents[1] / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    convert, export_hf = script("convert"), script("export_hf")
    assert convert.main([str(files["opt"]), str(tmp_path / "orbax")]) == 0
    assert convert.main([str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    assert export_hf.main([str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 2  # exists: refused
    assert export_hf.main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--overwrite"]) == 0
    ids = np.arange(3, 20)[None]
    a, b = load(files["opt"]), load(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(forward(a, ids)), np.asarray(forward(b, ids)))


def test_unknown_mesh_layout_is_refused_before_any_work(tmp_path, capsys):
    code = run_mod.main(["--target", "v5e-17", "--out", str(tmp_path / "out"), "--stages", "score"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown target or topology 'v5e-17'" in err and "did you mean" in err
    assert not (tmp_path / "out").exists()


def test_mesh_layout_by_flag_on_simulated_devices():
    import subprocess
    import sys

    script = (
        "import jax; from streamline_jax import pipeline, run\n"
        "cfg, preset = run.build_config('llama2-7b', None, [])\n"
        "mesh = pipeline.scoring_mesh(cfg, preset, 'v5e-8')\n"
        "print(dict(mesh.shape))\n")
    env = dict(__import__("os").environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shape = eval(out.stdout.strip().splitlines()[-1])
    assert shape["data"] * shape["fsdp"] * shape["tensor"] == 8


@pytest.mark.pipeline
def test_training_runs_on_its_own_stage_layout_on_simulated_devices(files, tmp_path):
    """On 8 CPU devices with the v5e-8 layouts, and a training layout (lm stage) that differs from the scoring one:
    the models are re-sharded for training, which runs with the layout's remat, and the report says which layout
    each stage ran on."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    args = _args(files, "llama", out, "--target", "v5e-8", "--stages", "score,prune,train", "train.mode=lm",
                 "train.num_steps=2", "data.batch_size=8")
    script = f"""
import json, jax
from streamline_jax import mesh_layouts, pipeline, run
scoring = pipeline.stage_layout
def layouts(stage, preset, target):
    if stage == "lm":  # another mesh than scoring's fsdp=8
        layout = mesh_layouts.StageLayout(2, 2, 2, 8, "dots")
        return mesh_layouts.layout_mesh(layout, jax.devices()), layout
    return scoring(stage, preset, target)
pipeline.stage_layout = layouts
assert run.main({args!r}) == 0
report = json.load(open({str(out / "report.json")!r}))
print(json.dumps(dict(layouts=report["layouts"], remat=report["training"]["remat"],
                      losses=[l for _, l, _ in report["training"]["train"]])))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["layouts"] == {"load, score, evaluate": "data=1 fsdp=8 tensor=1 batch=8 remat=none",
                              "train": "data=2 fsdp=2 tensor=2 batch=8 remat=dots"}, got
    assert got["remat"] == "dots" and len(got["losses"]) == 2 and all(l == l for l in got["losses"]), got
