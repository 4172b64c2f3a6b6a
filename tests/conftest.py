"""Shared fixtures. Random tiny configs for most tests; the real SmolLM2-135M only where it proves something."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run on the CPU even where libtpu (the optional AOT-planning extra) is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# ... and cached results (the dense model's evaluation) live in a folder of this session's own.
os.environ.setdefault("STREAMLINE_JAX_RESULTS_CACHE", tempfile.mkdtemp(prefix="streamline-jax-cache-"))


def pytest_configure(config):
    """Compiled programs go to a cache of this session's own, one per test worker (two workers never write one
    entry), not ~/.cache: tests that build the same programs (the tiny models' train steps) compile them once. The
    command lines a test starts inherit it (an entry a killed one left half-written is only a warning and a compile);
    $STREAMLINE_JAX_COMPILATION_CACHE, where set, wins."""
    if config.getoption("dist", "no") != "no" and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller: its workers each make their own
    from streamline_jax.distributed import ENV_COMPILATION_CACHE, enable_compilation_cache

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ.setdefault(ENV_COMPILATION_CACHE, tempfile.mkdtemp(prefix=f"streamline-jax-xla-{worker}-"))
    enable_compilation_cache()


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Tiny random Llama and OPT folders and tiny text files, made once (see tests/tiny.py)."""
    from tiny import run_files

    return run_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def files(tiny_files):
    """The command line's tests' name for tiny_files."""
    return tiny_files


# fixtures that load the real model: a test using one is `slow` (the quick loop, `-m "not slow and not pipeline"`,
# leaves it out with the whole runs marked `pipeline`)
REAL_MODEL_FIXTURES = {"smollm2", "smollm2_torch"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    """Our SmolLM2-135M-Instruct, float32, from the embedded GGUF (converted once into the cache)."""
    import streamline_jax as sj

    return sj.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers' own float32 SmolLM2-135M, dequantized by transformers from the same GGUF: an independent path."""
    import torch
    from transformers import AutoModelForCausalLM

    from streamline_jax.loading import embedded_gguf

    path = embedded_gguf("smollm2-135m")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def rel_err(ours, ref) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
