"""The package as a user installs it: the wheel (not editable) in a fresh venv, a tiny pipeline run from a folder
outside the checkout with the shipped settings files, and every console script's --help.

The fresh venv reuses the test venv's installed dependencies without the network: a .pth file puts that venv's
site-packages on the path (after the fresh venv's own, and without running its .pth files, so an editable install
of the project there cannot shadow the wheel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("streamline-jax", "streamline-jax-data", "streamline-jax-convert", "streamline-jax-export",
           "streamline-jax-lm-eval", "streamline-jax-plan")
TINY = ["data.seq_len=32", "data.calib_chunks=4", "data.train_chunks=16", "data.valid_chunks=2", "data.batch_size=4",
        "score.sparsity=null", "score.num_layers=2", "eval.limit=4", "eval.ppl_windows=2", "samples.prompts=[the cat]",
        "samples.max_new_tokens=4", "train.lr=1e-3", "train.distill_steps=0"]


def build_wheel(dest: Path) -> Path:
    """The wheel of the checkout's tracked files (a copy, so the checkout gets no build/ or egg-info)."""
    source = dest / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dest), str(source)], check=True, capture_output=True, text=True, timeout=300)
    return next(dest.glob("streamline_jax-*.whl"))


def fresh_venv(folder: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300, env=clean_env())
    return folder / "bin"


def clean_env(**extra) -> dict:
    """No PYTHONPATH (which would import the checkout's package) and offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAMLINE_JAX_DATA", "VIRTUAL_ENV")}
    return dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", PIP_NO_INPUT="1", **extra)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    wheel = build_wheel(root / "dist")
    return wheel, fresh_venv(root / "venv", wheel)


def test_the_wheel_holds_the_settings_files_and_the_licence(installed):
    names = zipfile.ZipFile(installed[0]).namelist()
    for name in ("streamline_jax/configs/pipeline.yaml", "streamline_jax/configs/meshes.yaml",
                 "streamline_jax/configs/recipes/paper.yaml", "streamline_jax/configs/recipes/quick.yaml",
                 "streamline_jax/configs/llama2-7b.yaml", "streamline_jax/data_sources.py"):
        assert name in names, name
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)


@pytest.mark.pipeline
def test_a_tiny_run_from_a_folder_outside_the_checkout(installed, tiny_files, tmp_path):
    bin_dir = installed[1]
    where = subprocess.run([str(bin_dir / "python"), "-c", "import streamline_jax; print(streamline_jax.__file__)"],
                           capture_output=True, text=True, env=clean_env(), cwd=tmp_path, check=True).stdout
    assert where.startswith(str(bin_dir.parent)), where  # the wheel's copy, not the checkout's or /work/main's
    env = clean_env(STREAMLINE_JAX_DATA=str(tiny_files["shared"]), STREAMLINE_JAX_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([str(bin_dir / "streamline-jax"), "--model", str(tiny_files["llama_2k"]), "--config",
                          "paper", "--out", "run", "--quiet", *TINY], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "DONE").is_file() and (tmp_path / "run" / "report.json").is_file()
    assert f"data: {tiny_files['shared']} ($STREAMLINE_JAX_DATA)" in out.stderr


def test_a_fresh_install_without_data_or_hub_says_how_to_provide_it(installed, tmp_path):
    out = subprocess.run([str(installed[1] / "streamline-jax"), "--out", "run", "--quiet"], capture_output=True,
                         text=True, env=clean_env(STREAMLINE_JAX_CACHE=str(tmp_path / "cache")), cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: no data for {data}/corpus/train.jsonl" in out.stderr and "STREAMLINE_JAX_DATA" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help(installed, tmp_path, script):
    out = subprocess.run([str(installed[1] / script), "--help"], capture_output=True, text=True, env=clean_env(),
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stdout + out.stderr


def test_config_takes_a_path_or_a_shipped_recipe(tmp_path, monkeypatch):
    """`--config paper` and `--config quick` from any folder; the former configs/recipes/... path still works."""
    from streamline_jax.settings import ConfigError, build_config

    monkeypatch.chdir(tmp_path)
    assert build_config(None, "paper")[0].train.lr == build_config(None, "configs/recipes/paper.yaml")[0].train.lr
    quick, _ = build_config("qwen2.5-0.5b", "quick")
    assert quick.data.seq_len == 512 and quick.eval.limit == 500
    (tmp_path / "mine.yaml").write_text("train:\n  lr: 0.5\n")
    assert build_config(None, "mine.yaml")[0].train.lr == 0.5
    with pytest.raises(ConfigError, match="not a shipped recipe .paper, quick"):
        build_config(None, "papr")


def test_the_settings_and_the_training_options_import_without_jax():
    """settings.py (and train.options, whose TrainOptions it subclasses) need no JAX, and the package's public names
    load with their modules on first use, so importing the settings starts no JAX; the names still resolve."""
    code = """
import sys
import streamline_jax.settings
assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))[:3]
import streamline_jax as sj
from streamline_jax import TrainOptions, load
assert sj.compare.__module__ == "streamline_jax.retention" and "jax" in sys.modules
assert set(sj.__all__) <= set(dir(sj))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
