"""Runs that never lose work: Ctrl-C and SIGKILL at any point of training resume bitwise; --overwrite replaces a
finished run only once the new one has finished; one run per folder; every setting checked before any work; every
error names its file and field. One test (or more) per row of the README's reliability table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from streamline_jax import train
from streamline_jax.train import train_replacement
from helpers import TRAIN_KW, interrupt_at, make_setup, run_args as _args, signal_after_first_checkpoint
from tiny import LLAMA_UNTIED, tiny_gguf

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------------------------
# Training: interrupted anywhere, resumed bitwise

@pytest.fixture(scope="module")
def setup():
    return make_setup()


def _train(setup, folder, **kw):
    model, pruned, data, valid = setup
    return train_replacement(model, pruned, data, valid_batches=valid, checkpoint_dir=folder, **TRAIN_KW, **kw)


def _same_result(a, b):
    (model_a, hist_a), (model_b, hist_b) = a, b
    for x, y in zip(jax.tree.leaves(model_a.params), jax.tree.leaves(model_b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    norm = lambda h: json.loads(json.dumps({k: v for k, v in h.items() if k != "wall_s"}))  # noqa: E731
    assert norm(hist_a) == norm(hist_b)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The loop's interrupt points, in order, in an uninterrupted run; and that run's result."""
    seen = []
    train.loop.LOOP_HOOK = seen.append
    try:
        result = _train(setup, tmp_path_factory.mktemp("straight"))
    finally:
        train.loop.LOOP_HOOK = None
    return seen, result


def _latest_checkpoint(folder: Path) -> int | None:
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=None)


@pytest.mark.pipeline
def test_ctrl_c_at_any_point_of_training_checkpoints_that_step_and_resumes_bitwise(setup, straight, tmp_path):
    points, straight = straight
    num_steps = points.count("logged")
    assert num_steps == 4 and {"batch", "stepped", "validated", "saved"} <= set(points)
    # points of each kind at different steps (all 25 pass; each costs a run and a resume, so the test takes three):
    # mid-accumulation in step 1, after validation in step 2, after the periodic checkpoint of step 3
    picks = [points.index("stepped"), points.index("validated"), points.index("saved")]
    for k in picks:
        folder = tmp_path / f"int{k}"
        train.loop.LOOP_HOOK = interrupt_at(k, signal.SIGINT)
        try:
            with pytest.raises(KeyboardInterrupt):
                _train(setup, folder)
        finally:
            train.loop.LOOP_HOOK = None
        # the step under way is finished and checkpointed: no work is lost, none is done twice
        step = min(points[:k].count("logged") + (points[k] not in ("validated", "saved")), num_steps)
        assert _latest_checkpoint(folder) == step, (k, points[k])
        _same_result(_train(setup, folder, resume=True), straight)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import orbax.checkpoint as ocp
from streamline_jax import train
import helpers as t

point = {point!r}
if point == "mid-save":  # killed while Orbax writes the checkpoint
    def save(manager, step, state, history):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   history=ocp.args.JsonSave(history)))
        os.kill(os.getpid(), signal.SIGKILL)
    train.checkpoints._save = save
else:
    train.loop.LOOP_HOOK = t.interrupt_at(point, signal.SIGKILL)
model, pruned, data, valid = t.make_setup()
train.train_replacement(model, pruned, data, valid_batches=valid, checkpoint_dir={folder!r}, **t.TRAIN_KW)
"""


@pytest.mark.pipeline
def test_sigkill_at_any_point_of_training_resumes_bitwise(setup, straight, tmp_path):
    points, straight = straight
    after_checkpoint = points.index("saved") + 3  # in the step after the first checkpoint
    for point in ("mid-save", after_checkpoint):
        folder = tmp_path / f"kill{point}"
        script = KILLED_RUN.format(tests=str(TESTS), point=point, folder=str(folder))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        _same_result(_train(setup, folder, resume=True), straight)


# --------------------------------------------------------------------------------------------------------------
# The command line: output folder, lock, settings, errors

from streamline_jax import run as run_mod  # noqa: E402


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.pipeline
def test_overwrite_keeps_the_finished_run_until_the_new_one_finishes(files, tmp_path, monkeypatch, capsys):
    from streamline_jax import score

    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 0
    before = (out / "report.json").read_text()
    # a bad model path and a failure half-way both leave the finished run as it was
    assert run_mod.main(_args(files, "llama", out, "--stages", "score", "--overwrite",
                              "--model", str(tmp_path / "nowhere"))) == 2
    assert "no such folder or file" in capsys.readouterr().err
    real = score.score_spans

    def broken(*a, **k):
        raise ValueError("scoring broke")

    monkeypatch.setattr(score, "score_spans", broken)
    again = _args(files, "llama", out, "--stages", "score", "--overwrite", "score.num_layers=3")
    assert run_mod.main(again) == 2
    err = capsys.readouterr().err
    assert "scoring broke" in err and f"the finished run in {out} is kept as it was" in err
    assert (out / "report.json").read_text() == before and (out / "DONE").exists()
    staging = run_mod.staging_folder(out)
    assert (staging / "FAILED").exists() and not (staging / "DONE").exists()
    # the same command continues the replacement and puts it in place once it has finished
    monkeypatch.setattr(score, "score_spans", real)
    assert run_mod.main(again) == 0
    assert _report(out)["span"]["length"] == 3 and (out / "DONE").exists() and not (out / "FAILED").exists()
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("extra", ["notes.txt", "my_subfolder"])
@pytest.mark.pipeline
def test_overwrite_refuses_a_folder_holding_more_than_a_run(files, tmp_path, capsys, extra):
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 0
    (out / extra).mkdir() if "." not in extra else (out / extra).write_text("keep")
    listing = sorted(p.name for p in out.iterdir())
    assert run_mod.main(_args(files, "llama", out, "--stages", "score", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert extra in err and "which no run writes" in err and "nothing was changed" in err
    assert sorted(p.name for p in out.iterdir()) == listing and not run_mod.staging_folder(out).exists()


KILLED_HOLDER = """
import os, signal
from pathlib import Path
from streamline_jax import run
with run.folder_lock(Path({out!r})):
    run.mark_holder(Path({out!r}))
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.pipeline
def test_a_stale_lock_of_a_killed_run_is_noticed_and_taken_over(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", KILLED_HOLDER.format(out=str(out))], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    holder = (out / ".lock").read_text().strip()
    assert holder.startswith("pid ") and "started" in holder
    from streamline_jax import run_folder

    warnings = []
    monkeypatch.setattr(run_folder.log, "warning", lambda msg, *a: warnings.append(msg % a))
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 0
    assert any("stale lock" in w and holder in w for w in warnings), warnings
    assert (out / ".lock").read_text() == ""  # released: the next run finds no stale record


@pytest.mark.parametrize("override, message", [
    ("train.clip_norm=-1", "train.clip_norm must be > 0, got -1.0"),
    ("train.clip_norm=0", "train.clip_norm must be > 0, got 0.0"),
    ("eval.ppl_windows=-1", "eval.ppl_windows must be >= 1, got -1"),
    ("eval.ppl_windows=0", "eval.ppl_windows must be >= 1, got 0"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("score.num_layers=6", "score.num_layers=6 would replace all 6 layers"),
    ("score.num_layers=0", "score.num_layers must be >= 1, got 0"),
    ("data.train_chunks=2", "data.train_chunks=2 gives no optimizer step"),
    ("train.lr=-1e-3", "train.lr must be > 0"),
    ("train.num_steps=99", "train.num_steps=99 x train.grad_accum=1 needs 99 batches"),
])
def test_every_setting_is_checked_before_any_work(files, tmp_path, monkeypatch, capsys, override, message):
    from streamline_jax import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("score.sparsity=1.5", "score.sparsity is the fraction of parameters removed: it must be in (0, 1)"),
    ("score.sparsity=0.99", "score.sparsity: sparsity 0.99 cannot be reached"),
    ("data.seq_len=300", "data.seq_len=300 is longer than the 256 positions OPT learned"),
])
def test_settings_against_the_model_shape_are_checked_before_loading(files, tmp_path, monkeypatch, capsys,
                                                                     override, message):
    from streamline_jax import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    extra = ["score.num_layers=null"] if "sparsity" in override else []
    assert run_mod.main(_args(files, "opt", out, *extra, override)) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.pipeline
def test_evaluation_settings_can_change_on_resume_without_training_again(files, tmp_path, monkeypatch, capsys):
    from streamline_jax import evaluation

    out = tmp_path / "out"
    args = _args(files, "llama", out, "prune.replacement=layer", "--stages", "train,evaluate")
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad windows")))
    assert run_mod.main(args) == 2
    assert "stage evaluate" in (out / "FAILED").read_text()
    trained = _report_history(out)
    monkeypatch.setattr(evaluation, "evaluate", real)
    steps = []
    monkeypatch.setattr(train.loop, "LOOP_HOOK", lambda point: steps.append(point) if point == "stepped" else None)
    assert run_mod.main(args + ["eval.ppl_windows=1"]) == 0
    assert steps == [] and (out / "DONE").exists()  # training was read back, not run again
    report = _report(out)
    assert report["config"]["eval"]["ppl_windows"] == 1 and report["evaluation"]["pruned"]["tasks"]["text"]
    assert report["training"]["train"] == trained["train"]
    assert run_mod.read_yaml(out / "run_config.yaml")["eval"]["ppl_windows"] == 1


def _report_history(out):
    return json.loads((out / "train_checkpoint" / "loss_curve.json").read_text())


def _copy_model(files, tmp_path, edit=None):
    import shutil

    folder = Path(shutil.copytree(files["llama"], tmp_path / "model"))
    if edit:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _bad_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama",')


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("fault, message", [
    ("missing", "no such folder or file"),
    ("bad_json", "config.json: not valid JSON"),
    ("no_hidden_size", "config.json: missing field 'hidden_size'"),
    ("string_hidden_size", "config.json: field 'hidden_size' must be an integer, got '64'"),
    ("truncated", "model.safetensors: truncated"),
    ("bad_jsonl_line", "train.jsonl, line 250: not valid JSON"),
])
def test_every_error_names_the_file_and_the_field_or_line(files, tmp_path, monkeypatch, capsys, fault, message):
    args = _args(files, "llama", tmp_path / "out")
    if fault == "missing":
        args += ["--model", str(tmp_path / "no" / "such" / "model")]
    elif fault == "bad_jsonl_line":
        lines = (files["data"] / "train.jsonl").read_text().splitlines()
        lines[249] = '{"text": "unterminated'
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
        args += [f"data.calibration={tmp_path / 'train.jsonl'}"]
    else:
        edits = {"no_hidden_size": lambda c: c.pop("hidden_size"),
                 "string_hidden_size": lambda c: c.update(hidden_size="64")}
        folder = _copy_model(files, tmp_path, edits.get(fault))
        {"bad_json": _bad_config_json, "truncated": _truncate_weights}.get(fault, lambda f: None)(folder)
        args += ["--model", str(folder)]
    assert run_mod.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.pipeline
def test_ctrl_c_during_save_waits_for_whole_files_and_temp_folders_are_cleaned(files, tmp_path, monkeypatch,
                                                                             capsys):
    from streamline_jax import export, load

    out = tmp_path / "out"
    args = _args(files, "llama", out, "prune.replacement=layer", "--stages", "train,save")
    real = export.save_orbax_model

    def interrupted_save(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the save starts
        return real(*a, **k)

    monkeypatch.setattr(export, "save_orbax_model", interrupted_save)
    assert run_mod.main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert load(out / "model").config.depth == 5  # written whole before stopping
    assert (out / "FAILED").read_text().strip() == "stage save: interrupted" and not (out / "DONE").exists()
    monkeypatch.setattr(export, "save_orbax_model", real)
    (out / ".hf.tmp-leftover").mkdir()  # as a run killed while writing hf/ leaves it
    (out / ".model.tmp-leftover").mkdir()
    assert run_mod.main(args) == 0
    assert not list(out.glob(".*.tmp-*")) and (out / "DONE").exists() and (out / "hf" / "config.json").exists()


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_run_log(files, tmp_path, monkeypatch, capsys):
    from streamline_jax import score

    def bug(*a, **k):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(score, "score_spans", bug)
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "--stages", "score")) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: RuntimeError: a bug of ours"] and "Traceback" not in err
    assert f"the traceback is in {out / 'run.log'}" in err
    assert "Traceback" in (out / "run.log").read_text()


# --------------------------------------------------------------------------------------------------------------
# The fault cases of issue 49


@pytest.mark.pipeline
def test_an_interrupted_overwrite_is_continued_by_the_same_command(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    base = _args(files, "llama", out, "prune.replacement=layer", "--stages", "train", "train.checkpoint_every=1")
    assert run_mod.main(base) == 0
    before = (out / "report.json").read_text()
    again = base + ["--overwrite", "train.lr=0.02"]
    monkeypatch.setattr(train.loop, "LOOP_HOOK", signal_after_first_checkpoint(signal.SIGINT))
    assert run_mod.main(again) == 130
    staging = run_mod.staging_folder(out)
    assert (staging / "train_checkpoint").exists() and (out / "report.json").read_text() == before
    capsys.readouterr()
    steps = []
    monkeypatch.setattr(train.loop, "LOOP_HOOK", lambda point: steps.append(point) if point == "logged" else None)
    assert run_mod.main(again) == 0, capsys.readouterr().err
    assert 0 < len(steps) < 4  # continued from its checkpoint, not started again
    assert _report(out)["config"]["train"]["lr"] == 0.02 and not staging.exists()


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
from streamline_jax import run
sys.exit(run.main({args!r}))
"""


def _run_on_full_disk(args, limit):
    """main(args) in a process that cannot write more than `limit` bytes into any file."""
    script = FULL_DISK.format(limit=limit, args=[*args, "--compilation-cache", "off"])
    env = {**os.environ, "STREAMLINE_JAX_RESULTS_CACHE": "off"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.pipeline
def test_a_full_disk_at_startup_leaves_nothing_the_same_command_refuses(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(files, "llama", out, "--stages", "score")
    done = _run_on_full_disk(args, limit=1000)  # run_config.yaml is longer
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and "run_config.yaml" in errors[0] and "free some space" in errors[0], errors
    assert run_mod.main(args) == 0, capsys.readouterr().err
    assert run_mod.read_yaml(out / "run_config.yaml") == _report(out)["config"]


@pytest.mark.parametrize("left", ["", "model:\n  source: /x\ntrain: [1"])
@pytest.mark.pipeline
def test_a_run_folder_without_whole_settings_is_treated_as_empty(files, tmp_path, capsys, left):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.yaml").write_text(left)  # as a version writing in place left it on a full disk
    (out / "run.log").write_text("")
    args = _args(files, "llama", out, "--stages", "score")
    assert run_mod.main(args) == 0, capsys.readouterr().err
    assert (out / "DONE").exists() and run_mod.read_yaml(out / "run_config.yaml") == _report(out)["config"]


@pytest.mark.pipeline
def test_exported_folders_are_readable_as_the_umask_says(files, tmp_path, capsys):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert run_mod.main(_args(files, "llama", out, "prune.replacement=layer", "--stages", "save")) == 0
    finally:
        os.umask(previous)
    saved = [out / "model", *(out / "model").rglob("*"), out / "hf", *(out / "hf").rglob("*")]
    for path in [*saved, out / "report.json", out / "run_config.yaml", out / "plots" / "span_scores.png"]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def _jsonl_with(path: Path, files, bad_line: str | bytes, every: int) -> Path:
    """The tiny train.jsonl with every `every`-th record from the second replaced by `bad_line` (every other one:
    whatever the shuffled order, the first chunks read hold one)."""
    lines = (files["data"] / "train.jsonl").read_bytes().splitlines()
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    path.write_bytes(b"\n".join(bad if i % every == 1 else line for i, line in enumerate(lines)) + b"\n")
    return path


@pytest.mark.parametrize("bad_line, every, message", [
    ('{"title": "no text here"}', 2, "line 2: no text field 'text' (its fields: ['title'])"),
    ('{"text": 42}', 2, "line 2: field 'text' holds int, not text"),
    (b'{"text": "caf\xe9 au lait"}', 2, "line 2: not UTF-8 text (byte 0xe9"),
])
@pytest.mark.parametrize("shuffle", [0, 10000])
def test_every_record_is_checked_and_a_bad_one_is_named_by_file_and_line(files, tmp_path, capsys, bad_line, every,
                                                                         message, shuffle):
    data = _jsonl_with(tmp_path / "train.jsonl", files, bad_line, every)
    args = _args(files, "llama", tmp_path / "out", "--stages", "score", f"data.calibration={data}",
                 f"data.shuffle_buffer={shuffle}")
    assert run_mod.main(args) == 2
    err = capsys.readouterr().err
    assert f"{data}, {message}" in err and "Traceback" not in err, err


@pytest.mark.pipeline
def test_records_without_text_are_skipped_and_counted_up_to_the_setting(files, tmp_path, monkeypatch, capsys):
    data = _jsonl_with(tmp_path / "train.jsonl", files, '{"title": "no text here"}', 2)
    from streamline_jax import data as data_mod

    warnings = []
    monkeypatch.setattr(data_mod.log, "warning", lambda msg, *a: warnings.append(msg % a))
    args = _args(files, "llama", tmp_path / "out", "--stages", "score", f"data.calibration={data}",
                 "data.shuffle_buffer=0", "data.max_skipped_records=1000")
    assert run_mod.main(args) == 0, capsys.readouterr().err
    assert any("skipped" in w and "record(s) without text" in w and str(data) in w for w in warnings), warnings
    skipped = _report(tmp_path / "out")["skipped_records"]
    assert list(skipped) == ["calibration"] and skipped["calibration"] > 0


def _truncated_gguf(tmp_path, where: str) -> Path:
    path = tiny_gguf(tmp_path / "whole.gguf", LLAMA_UNTIED)
    raw = path.read_bytes()
    cut = tmp_path / f"cut-in-{where}.gguf"
    cut.write_bytes(raw[:200] if where == "metadata" else raw[:len(raw) - 5000])
    return cut


@pytest.mark.parametrize("where, message", [
    ("metadata", "not a GGUF file, or truncated: its metadata cannot be read"),
    ("tensors", "truncated: its tensor table lists"),
])
def test_a_truncated_gguf_is_named_in_the_run_and_in_convert(files, tmp_path, capsys, where, message):
    sys.path.insert(0, str(TESTS.parent / "scripts"))
    import convert

    cut = _truncated_gguf(tmp_path, where)
    assert run_mod.main(_args(files, "llama", tmp_path / "out", "--model", str(cut))) == 2
    assert convert.main([str(cut), str(tmp_path / "converted")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(e.startswith(f"error: {cut}: {message}") for e in errors), errors
    assert not (tmp_path / "out").exists() and not (tmp_path / "converted").exists()


def test_an_out_naming_a_file_is_one_line(files, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("a file of the user's")
    assert run_mod.main(_args(files, "llama", out)) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: --out {out} is a file"] and out.read_text() == "a file of the user's"


def test_an_out_on_a_read_only_filesystem_is_one_line(files, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "ro" / "out"
    real = Path.mkdir

    def read_only(self, *a, **k):
        if self == out or out.is_relative_to(self) and self != tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert run_mod.main(_args(files, "llama", out)) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {out}: Read-only file system; choose a folder you can write in (--out)"]


def _as_another_user() -> list[str]:
    """The command prefix that runs a process as a user without root's pass over permissions."""
    import shutil

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a folder's missing write permission cannot be felt")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.pipeline
def test_an_out_in_a_folder_without_write_permission_is_one_line(files, tmp_path):
    import shutil
    import tempfile

    prefix = _as_another_user()
    shared = Path(tempfile.mkdtemp(prefix="streamline-perm-"))  # pytest's own folders are root's only
    try:
        model = shutil.copytree(files["llama"], shared / "llama")
        data = shutil.copytree(files["data"], shared / "data")
        locked = shared / "locked"
        locked.mkdir()
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        locked.chmod(0o555)
        (shared / "home").mkdir(mode=0o777)
        (shared / "home").chmod(0o777)  # the datasets cache
        out = locked / "out"
        args = _args({"llama": model, "data": data}, "llama", out, "--compilation-cache", "off")
        env = {**os.environ, "HOME": str(shared / "home"), "STREAMLINE_JAX_RESULTS_CACHE": "off"}
        done = subprocess.run([*prefix, sys.executable, "-m", "streamline_jax.run", *args], capture_output=True,
                              text=True, timeout=600, env=env, cwd=shared)
        assert done.returncode == 1, done.stderr[-3000:]
        assert done.stderr.splitlines()[-1:] == [f"error: {out}: Permission denied; choose a folder you can write "
                                                 f"in (--out)"] and "Traceback" not in done.stderr, done.stderr
        assert not out.exists()
    finally:
        shutil.rmtree(shared)


TERMINATED_RUN = """
import signal, sys
sys.path.insert(0, {tests!r})
from streamline_jax import run, train
import helpers as t
train.loop.LOOP_HOOK = t.signal_after_first_checkpoint(signal.SIGTERM)
sys.exit(run.main({args!r}))
"""


@pytest.mark.pipeline
def test_sigterm_stops_at_the_next_safe_point_like_ctrl_c(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = _args(files, "llama", out, "prune.replacement=layer", "--stages", "train", "train.checkpoint_every=1")
    script = TERMINATED_RUN.format(tests=str(TESTS), args=[*args, "--compilation-cache", "off"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "interrupt (SIGTERM): stopping at the next safe point" in done.stderr and "Traceback" not in done.stderr
    assert (out / "FAILED").read_text().strip() == "stage train: interrupted"
    steps = []
    monkeypatch.setattr(train.loop, "LOOP_HOOK", lambda point: steps.append(point) if point == "logged" else None)
    assert run_mod.main(args) == 0, capsys.readouterr().err
    assert 0 < len(steps) < 4  # continued from the checkpoint written as it stopped


def test_a_seq_len_beyond_the_models_context_is_refused_before_loading(files, tmp_path, monkeypatch, capsys):
    from streamline_jax import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert run_mod.main(_args(files, "llama", out, "data.seq_len=300")) == 2
    assert "data.seq_len=300 is longer than the model's context of 256 tokens" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.pipeline
def test_a_short_validation_file_is_named_as_such(files, tmp_path, capsys):
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"text": "the cat sat."}\n')
    args = _args(files, "llama", tmp_path / "out", "prune.replacement=layer", "--stages", "train",
                 f"data.valid={valid}")
    assert run_mod.main(args) == 2
    err = capsys.readouterr().err
    assert f"2 validation (data.valid {valid}) chunks are needed" in err and "calibration" not in err, err


@pytest.mark.pipeline
def test_a_resume_whose_span_moved_because_the_data_changed_says_so(files, tmp_path, monkeypatch, capsys):
    import shutil

    calibration = Path(shutil.copy(files["data"] / "train.jsonl", tmp_path / "calibration.jsonl"))
    out = tmp_path / "out"
    args = _args(files, "llama", out, "prune.replacement=layer", "--stages", "train", "train.checkpoint_every=1",
                 f"data.calibration={calibration}")
    monkeypatch.setattr(train.loop, "LOOP_HOOK", signal_after_first_checkpoint(signal.SIGINT))
    assert run_mod.main(args) == 130
    monkeypatch.setattr(train.loop, "LOOP_HOOK", None)
    capsys.readouterr()
    calibration.write_text('{"text": "the the the the the the the the"}\n' * 400)  # scores choose layers 2..3
    assert run_mod.main(args) == 2
    err = capsys.readouterr().err
    assert ("the chosen span moved from layers [4, 6) -> layer to layers [2, 4) -> layer: the calibration data "
            f"({calibration}) changed since the run stopped") in err and "Traceback" not in err, err


@pytest.mark.pipeline
def test_a_disk_filling_during_the_save_is_one_line_and_the_tracebacks_go_to_run_log(files, tmp_path):
    out = tmp_path / "out"
    done = _run_on_full_disk(_args(files, "llama", out, "prune.replacement=layer", "--stages", "save"), limit=200_000)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "File too large" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr[-3000:]
    assert "Traceback" in (out / "run.log").read_text() and not (out / "model").exists()
