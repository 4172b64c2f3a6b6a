"""release_host_memory: what a stage freed goes back to the system (the rehearsal's peak host memory depends on it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamline_jax import host_memory

ROOT = Path(__file__).resolve().parent.parent

FREED_BUT_HELD = """
import json
import numpy as np
from streamline_jax.host_memory import release_host_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

base = rss_mib()
blocks = [np.ones(8192) for _ in range(8192)]  # 64 KiB each (below malloc's mmap threshold): 512 MiB of heap
pin = np.ones(8192)  # allocated after them: the heap's top stays in use, so free() alone cannot give them back
del blocks
held = rss_mib()
released = release_host_memory()
print(json.dumps({"base": base, "held": held, "after": rss_mib(), "released": released}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_release_host_memory_returns_the_freed_heap_to_the_system():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", FREED_BUT_HELD], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["released"], "glibc's malloc_trim was not found"
    assert seen["held"] - seen["base"] > 400, seen  # freed, yet still the process's
    assert seen["after"] - seen["base"] < 100, seen  # given back


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_libc", lambda: libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return libc


def test_the_mmap_threshold_is_fixed_only_for_a_model_that_fills_a_cpu_host(fake_libc, monkeypatch):
    gib = 2 ** 30
    assert not host_memory.fit_allocator_to(12 * gib, "gpu", host_bytes=24 * gib)  # device memory, not the host's
    assert not host_memory.fit_allocator_to(gib // 2, "cpu", host_bytes=24 * gib)  # SmolLM2: speed first
    assert fake_libc.calls == []
    assert host_memory.fit_allocator_to(12 * gib, "cpu", host_bytes=24 * gib)  # a 7B in bf16 on this host
    assert fake_libc.calls == [(host_memory.M_MMAP_THRESHOLD, host_memory.LARGE_MODEL_MMAP_THRESHOLD)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own setting stays
    assert not host_memory.fit_allocator_to(12 * gib, "cpu", host_bytes=24 * gib)
    assert len(fake_libc.calls) == 1


def test_orbax_may_write_the_largest_shard_at_once_and_no_more_than_the_floor_otherwise():
    """Orbax refuses a shard larger than its write limit: a qwen2.5-7b embedding's quarter on 4 devices (272 MB)
    failed the save at a fixed 0.25 GB."""
    import jax
    import jax.numpy as jnp

    small = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    assert host_memory.save_concurrent_gb(small) == host_memory.SAVE_CONCURRENT_GB
    big = {"w": jax.ShapeDtypeStruct((152064, 3584), jnp.bfloat16), "b": jnp.zeros(3)}
    assert host_memory.save_concurrent_gb(big) * 1e9 >= 152064 * 3584 * 2


@pytest.mark.parametrize("fills", [True, False])
def test_the_run_compiles_for_memory_only_where_the_weights_fill_the_host(tiny_files, monkeypatch, fills):
    """Where the weights fill the host, the load stage has every later CPU program scheduled for memory
    (backend.MEMORY_SCHEDULER); elsewhere (the embedded model on a laptop) for speed, XLA's default."""
    from streamline_jax import backend, pipeline
    from streamline_jax.settings import build_config

    monkeypatch.setattr(pipeline, "weights_fill_host", lambda weight_bytes, platform: fills)
    c, _ = build_config(None, None, [f"model.source={tiny_files['llama']}", "model.compute_dtype=float32",
                                     "data.seq_len=64"])
    backend.schedule_for_memory(not fills)
    try:
        pipeline.load_stage(c, None, None, None)
        assert backend.schedules_for_memory() is fills
    finally:
        backend.schedule_for_memory(False)
