"""Step-time estimates of the memory planner: what XLA's cost analysis counts (per chip, a known matmul), the
roofline arithmetic, a default run's work per stage, and the planner's printed columns and run estimate."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from streamline_jax import plan, step_estimates
from streamline_jax.settings import build_config

ROOT = Path(__file__).resolve().parents[1]
M, K, N = 256, 512, 1024


def _python(code, env):
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


SHARDED_MATMUL = f"""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from streamline_jax import plan
    devices = plan.topology_devices("v5e:2x2") if {{tpu}} else jax.devices()[:4]
    mesh = Mesh(np.array(devices).reshape(4), ("x",))
    a = jax.ShapeDtypeStruct(({M}, {K}), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    b = jax.ShapeDtypeStruct(({K}, {N}), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    cost = jax.jit(lambda a, b: a @ b).lower(a, b).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(json.dumps(dict(flops=cost["flops"], bytes=cost["bytes accessed"])))
"""


def test_cost_analysis_counts_a_matmul_for_one_device():
    """2·m·n·k FLOPs for one device's matmul; split over 4 devices, each counts its quarter (per chip, not
    global)."""
    a, b = jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, N), jnp.bfloat16)
    cost = jax.jit(lambda a, b: a @ b).lower(a, b).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert abs(cost["flops"] / (2 * M * N * K) - 1) < 0.01
    assert cost["bytes accessed"] >= 2 * (M * K + K * N + M * N)  # bf16 inputs read, output written
    sharded = json.loads(_python(SHARDED_MATMUL.format(tpu=False), {
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}).splitlines()[-1])
    assert abs(sharded["flops"] / (2 * M * N * K / 4) - 1) < 0.01, sharded


@pytest.mark.skipif(not plan.libtpu_available(), reason="libtpu not installed: `bash scripts/setup.sh --test`")
def test_libtpu_cost_analysis_is_per_chip():
    out = json.loads(_python(SHARDED_MATMUL.format(tpu=True), {"JAX_PLATFORMS": ""}).splitlines()[-1])
    assert out["flops"] == 2 * M * N * K / 4, out


def test_roofline_is_the_slower_of_compute_and_memory():
    v5e = step_estimates.CHIPS["v5e"]
    est = step_estimates.roofline("v5e", v5e.bf16_flops * 2, v5e.hbm_bandwidth)
    assert (est.compute_s, est.memory_s, est.seconds, est.bound) == (2.0, 1.0, 2.0, "compute")
    est = step_estimates.roofline("h200", 989e12, 9.6e12)
    assert (est.seconds, est.bound, est.at_least_s) == (2.0, "memory", 2.0)
    # XLA counted a quarter of the bytes (a scan body once): at least those, and every FLOP
    est = step_estimates.step_estimate("h200", 989e12, 989e12 / 4, 9.6e12 / 4)
    assert (est.bytes, est.seconds, est.at_least_s) == (9.6e12, 2.0, 1.0)
    # XLA counted a scan body once: its bytes scale by the FLOPs it missed; never down, nor from nothing
    assert step_estimates.scan_corrected_bytes(10.0, 2.0, 8.0) == 40.0
    assert step_estimates.scan_corrected_bytes(10.0, 8.0, 2.0) == 10.0
    assert step_estimates.scan_corrected_bytes(10.0, float("nan"), 8.0) == 10.0


def test_target_chips():
    assert step_estimates.target_chips("v5e-16") == ("v5e",)
    assert step_estimates.target_chips("8xH200") == ("h200",)
    assert step_estimates.target_chips("gpu:8") == ("h100", "h200")
    with pytest.raises(ValueError, match="no peak figures for target 'a100-8'"):
        step_estimates.target_chips("a100-8")


def test_default_run_work_per_stage():
    run_config, _ = build_config("llama2-13b", None, [])
    work = {w.what.split(" ")[0]: (w.stage, w.tokens) for w in step_estimates.run_work(run_config)}
    d = run_config.data
    assert work["score"] == ("scoring", d.calib_chunks * d.seq_len)
    assert work["train"] == ("mse", d.train_chunks * d.seq_len)
    assert work["distil"] == ("lm", run_config.train.distill_steps * d.batch_size * d.seq_len)
    assert work["validate"] == ("scoring", 6 * d.valid_chunks * d.seq_len)  # 5 in training, 1 after distilling
    assert work["evaluate"] == ("evaluate", 332 * 1024 + 1838 * 90)
    limited, _ = build_config("llama2-13b", None, ["eval.limit=100", "eval.ppl_windows=4", "train.num_steps=10"])
    work = {w.what.split(" ")[0]: w.tokens for w in step_estimates.run_work(limited)}
    assert work["evaluate"] == 4 * 1024 + 100 * 90 and work["train"] == 10 * d.batch_size * d.seq_len
    est = step_estimates.roofline("v5e", 1e12, 1e9)
    parts = step_estimates.run_estimate(step_estimates.run_work(limited), {"scoring": (est, 16 * 2048)})
    assert [p.work.stage for p in parts] == ["scoring", "scoring"]  # unplanned stages left out
    assert parts[0].steps == 256 * 2048 / (16 * 2048) and parts[0].seconds == parts[0].steps * est.seconds


@pytest.mark.pipeline
def test_planner_prints_step_times_and_the_run_estimate(tmp_path):
    """`--topology gpu:8` compiles the 8-GPU target's steps for 8 CPU devices and prints, beside each stage's
    per-chip memory, its step time at H100 and H200 peaks, then the whole run's estimate per stage."""
    out = subprocess.run([sys.executable, "-m", "streamline_jax.plan_memory", "--model", "smollm2-135m", "--topology",
                          "gpu:8", "--seq-len", "128", "--stage", "scoring", "--stage", "mse", "--no-search",
                          "--json", str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert "compiled for 8 CPU devices" in out.stdout
    stage_lines = [l for l in lines if l.startswith(("scoring ", "mse "))]
    assert len(stage_lines) == 2
    for line in stage_lines:
        assert "GiB accessed/chip" in line and "step h100 " in line and " h200 " in line and "at least" in line
    summary = [l for l in lines if l.startswith("a run with these settings")]
    assert len(summary) == 2 and "NVIDIA H100 SXM peak" in summary[0] and "without the unplanned stage(s)" in summary[0]
    result = json.loads((tmp_path / "plan.json").read_text())
    stages = {r["stage"]: r for r in result["stages"]}
    h100, h200 = result["run_estimate"]["h100"], result["run_estimate"]["h200"]
    assert h100["missing"] == ["evaluate", "lm"] and h100["total_s"] > 0
    assert h200["total_s"] <= h100["total_s"]  # the same FLOPs, more bandwidth
    assert stages["scoring"]["step_s_h100"] >= stages["scoring"]["at_least_s_h100"] > 0


@pytest.mark.pipeline
def test_scan_correction_against_the_unrolled_program():
    """XLA counts a scanned layer stack's body once: the same tiny step with every layer unrolled counts them all.
    The FLOPs from the shapes match the unrolled count; XLA's scanned bytes fall short, and scaled they come
    within the documented factor (scoring 2.0x, LM 1.0x) of the unrolled program's."""
    from streamline_jax.models.config import ModelConfig, Segment

    cfg = ModelConfig(family="llama", model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_layers=8, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=512)
    unrolled = cfg.replace(layout=tuple(Segment("layer") for _ in range(cfg.num_layers)))
    mesh = plan.layout_mesh(plan.StageLayout(1, 1, 1, 4), jax.devices()[:1])
    for stage, remat, most in (("scoring", "none", 2.2), ("lm", "full", 1.2)):
        layout = plan.StageLayout(1, 1, 1, 4, remat)
        scanned, full = (plan.memory_plan(plan.compile_plan(plan.build_step(stage, c, layout, mesh, 128)), stage,
                                          layout, 128, 16) for c in (cfg, unrolled))
        flops = plan.step_flops(cfg, stage, 4, 128, None, remat)
        assert abs(flops / full.flops - 1) < 0.2, (stage, flops, full.flops)
        assert scanned.xla_bytes < 0.5 * full.xla_bytes
        est = step_estimates.step_estimate("v5e", flops, scanned.flops, scanned.xla_bytes)
        assert 0.8 < est.bytes / full.xla_bytes < most, (stage, est.bytes, full.xla_bytes)
