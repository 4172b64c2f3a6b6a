"""Model presets, mesh layouts, the planned steps' numbers against transformers, and ahead-of-time compiles for a
TPU topology (skipped without libtpu)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamline_jax import plan
from streamline_jax.models import transformer
from streamline_jax.models.config import ModelConfig, to_hf_config
from streamline_jax.models.presets import PRESETS, PUBLISHED_PARAMS, preset
from streamline_jax.pruning import prune_config
from streamline_jax.sharding import ShardingError

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6, num_heads=4,
                    num_kv_heads=2, head_dim=16, tie_word_embeddings=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_published(name):
    n = transformer.count_params(transformer.abstract_params(preset(name)))
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.005, (name, n)


def test_presets_agree_with_the_run_presets_in_configs():
    """configs/<model>.yaml (the command line's presets) and models/presets.py describe the same shapes."""
    run = pytest.importorskip("streamline_jax.run")
    shape_fields = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
                    "tie_word_embeddings", "word_embed_proj_dim", "dtype", "model_type", "activation", "qk_norm",
                    "norm_offset", "embed_scale", "sandwich_norms", "query_pre_attn_scalar", "attn_logit_softcap",
                    "final_logit_softcap", "layer_types", "local_window", "local_rope_theta", "sliding_window")
    for name, config in PRESETS.items():
        if not (run.CONFIG_DIR / f"{name}.yaml").exists():
            continue
        other = run.preset_model_config(name)
        diff = {f: (getattr(config, f), getattr(other, f)) for f in shape_fields if getattr(config, f) != getattr(other, f)}
        assert not diff, (name, diff)


def test_unknown_preset_and_target_names():
    with pytest.raises(KeyError, match="did you mean 'llama2-13b'"):
        preset("llama2-13")
    with pytest.raises(plan.TopologyError, match="unknown target or topology 'v5e:4x5'.*did you mean"):
        plan.find_target("v5e:4x5")
    with pytest.raises(plan.TopologyError, match="not of the form"):
        plan.topology_devices("tpu-v5e-16")


def test_mesh_layouts_cover_every_target_and_stage():
    targets, overrides, seq_len = plan.load_targets()
    assert set(targets) >= {"v5e-8", "v5e-16", "v5p-8", "v5p-32", "v4-32", "8xH100", "8xH200"}
    assert seq_len > 0
    for t in targets.values():
        for stage in plan.STAGES:
            layout = t.layout(stage)
            assert layout.devices == t.devices and layout.remat in plan.REMAT_POLICIES
            assert layout.batch % (layout.data * layout.fsdp) == 0
    assert plan.find_target("v5e:4x4").name == "v5e-16"
    fake = lambda kind, n: [SimpleNamespace(device_kind=kind)] * n
    assert plan.pick_target(fake("TPU v5 lite", 16), targets).name == "v5e-16"
    assert plan.pick_target(fake("TPU v5", 4), targets).name == "v5p-8"
    assert plan.pick_target(fake("TPU v4", 16), targets).name == "v4-32"
    assert plan.pick_target(fake("NVIDIA H100 80GB HBM3", 8), targets).name == "8xH100"
    assert plan.pick_target(fake("cpu", 3), targets) is None


def test_layout_errors_name_the_problem():
    cfg = preset("llama2-70b")  # 64 heads, 8 kv heads
    with pytest.raises(ShardingError, match="tensor=16 does not divide num_kv_heads=8"):
        plan.check_layout(cfg, plan.StageLayout(1, 1, 16, 16))
    with pytest.raises(ShardingError, match="batch 12 cannot be split over data×fsdp = 1×16"):
        plan.check_layout(cfg, plan.StageLayout(1, 16, 1, 12))
    with pytest.raises(ValueError, match="unknown remat policy"):
        plan.StageLayout(1, 1, 1, 1, "some")


# ----------------------------------------------------------------------------------------------------------------
# The steps' numbers against transformers


@pytest.fixture(scope="module")
def hf_llama():
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(LLAMA))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    import importlib

    L = importlib.import_module("streamline_jax.loading")
    params = L.params_from_tensors(LLAMA, ((k, lambda v=v: v.numpy()) for k, v in model.state_dict().items()))
    return model, jax.tree.map(jnp.asarray, params)


def _ids():
    return np.random.default_rng(0).integers(0, LLAMA.vocab_size, (2, 12)).astype(np.int32)


def test_lm_step_loss_matches_transformers_pruned_model(hf_llama):
    import copy

    import torch

    model, params = hf_llama
    start, length = 2, 2
    pruned = copy.deepcopy(model)
    # the 'layer' replacement starts as a copy of layer `start`: transformers' model with layers start+1..end deleted
    keep = [i for i in range(LLAMA.num_layers) if not start < i < start + length]
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[i] for i in keep])
    pruned.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    ids = _ids()
    with torch.no_grad():
        want = float(pruned(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long)).loss)

    pc = prune_config(LLAMA, start, length)
    stack = params["segments"]["seg_0"]
    cut = lambda a, b: jax.tree.map(lambda x: x[a:b], stack)
    frozen = dict(params, segments={"seg_0": cut(0, start), "seg_2": cut(start + length, None)})
    block = jax.tree.map(lambda x: x[start].astype(jnp.float32), stack)
    opt = plan.make_optimizer(1e-3)
    step = jax.jit(functools.partial(plan.lm_step, pc, opt))
    state = opt.init(block)
    losses = []
    for _ in range(4):
        new_block, state, loss = step(block, state, frozen, ids, np.ones_like(ids))
        losses.append(float(loss))
        assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new_block, block)))
        block = new_block
    assert abs(losses[0] - want) < 1e-4 * abs(want), (losses[0], want)
    assert losses[-1] < losses[0]


def test_mse_step_loss_matches_transformers_hidden_states(hf_llama):
    import torch

    model, params = hf_llama
    start, length = 1, 3
    ids = _ids()
    with torch.no_grad():
        hs = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
    # block = copy of layer `start`, so block(h_start) = h_{start+1}
    want = float(torch.mean((hs[start + 1] - hs[start + length]) ** 2))

    sc = plan.split_config(LLAMA, start, length)
    stack = params["segments"]["seg_0"]
    cut = lambda a, b: jax.tree.map(lambda x: x[a:b], stack)
    frozen = dict(embed_tokens=params["embed_tokens"], segments={"seg_0": cut(0, start),
                                                               "seg_1": cut(start, start + length)})
    block = jax.tree.map(lambda x: x[start], stack)
    opt = plan.make_optimizer(1e-3)
    step = jax.jit(functools.partial(plan.mse_step, sc, opt))
    state = opt.init(block)
    losses = []
    for _ in range(4):
        block, state, loss = step(block, state, frozen, ids, np.ones_like(ids))
        losses.append(float(loss))
    assert abs(losses[0] - want) < 1e-4 * want, (losses[0], want)
    assert losses[-1] < losses[0]


def test_step_flops_count():
    cfg = preset("llama2-7b")
    per_token = plan.step_flops(cfg, "scoring", 1, 1)
    n = transformer.count_params(transformer.abstract_params(cfg))
    # forward ≈ 2 × (parameters outside the embeddings and head) per token at a short context
    body = n - 2 * cfg.vocab_size * cfg.hidden_size
    assert abs(per_token / (2 * body) - 1) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# Sharded steps on simulated devices, and ahead-of-time for a TPU topology


def _run(code, env=None, timeout=300):
    # no LIBTPU_PATH: plan finds libtpu where `scripts/setup.sh --test` put it, as the README's command relies on
    full = {k: v for k, v in os.environ.items() if k != plan.LIBTPU_PATH_ENV} | dict(PYTHONPATH=str(ROOT), **(env or {}))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_planned_steps_compile_and_run_sharded_on_8_cpu_devices():
    """The same abstract, sharded arguments the TPU plans use, compiled for 8 CPU devices and run with real arrays:
    every stage gives the single-device numbers."""
    res = _run("""
        import json, functools, jax, jax.numpy as jnp, numpy as np
        from streamline_jax import plan
        from streamline_jax.models import transformer
        from streamline_jax.models.config import ModelConfig
        cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
        layout = plan.StageLayout(2, 2, 2, 8, "full")
        mesh = plan.layout_mesh(layout, jax.devices())
        out = {}
        for stage in plan.STAGES:
            p = plan.build_step(stage, cfg, layout, mesh, 16, span=(2, 2))
            compiled = p.lower().compile()
            mem = plan.memory_plan(compiled, stage, layout, 16, 16)
            rng = np.random.default_rng(0)
            real = jax.tree.map(lambda a: jax.device_put(jnp.asarray(rng.standard_normal(a.shape) * 0.05, a.dtype),
                                                         a.sharding), p.args[:-2])
            ids = rng.integers(0, 128, (8, 16)).astype(np.int32)
            batch = tuple(jax.device_put(x, a.sharding) for x, a in zip((ids, np.ones_like(ids)), p.args[-2:]))
            single = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), real)
            got = compiled(*jax.tree.map(jnp.copy, real), *batch)
            want = jax.jit(p.fn)(*single, ids, np.ones_like(ids))
            last = lambda r: np.asarray(r[-1] if stage != "scoring" else r[0])
            # relative to the largest value: the scoring output is a sum of cosines over every token
            scale = max(1.0, float(np.max(np.abs(last(want)))))
            out[stage] = dict(err=float(np.max(np.abs(last(got) - last(want)))) / scale, total=mem.total_bytes)
        print(json.dumps(out))
    """, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    for stage, r in res.items():
        assert r["err"] < 1e-4 and r["total"] > 0, (stage, r)


needs_libtpu = pytest.mark.skipif(not plan.libtpu_available(), reason="libtpu not installed: `bash scripts/setup.sh "
                                  "--test` (or set LIBTPU_PATH to a folder holding it) to compile for TPU topologies "
                                  "on this host")


def test_missing_libtpu_is_an_error_naming_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(plan.LIBTPU_PATH_ENV, str(tmp_path / "mine"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert [p for p, _ in plan.libtpu_places()] == [tmp_path / "mine", tmp_path / "venv" / "libtpu-site",
                                                     ROOT / ".venv" / "libtpu-site"]
    monkeypatch.setattr(plan, "libtpu_available", lambda: False)
    with pytest.raises(plan.TopologyError) as e:
        plan.topology_devices("v5e:2x2")
    for place in plan.libtpu_places():
        assert f"{place[0]} ({place[1]})" in str(e.value)
    assert "the Python path" in str(e.value) and "bash scripts/setup.sh --test" in str(e.value)
    monkeypatch.delenv(plan.LIBTPU_PATH_ENV)
    assert "$LIBTPU_PATH (not set)" in plan.libtpu_missing_message()


@needs_libtpu
def test_aot_memory_plan_for_a_tpu_topology():
    res = _run("""
        import json
        from streamline_jax import plan
        from streamline_jax.models.config import ModelConfig
        cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=4,
                          num_heads=8, num_kv_heads=4, head_dim=32, tie_word_embeddings=False, dtype="bfloat16")
        target = plan.find_target("v5e-8")
        out = {}
        for stage in plan.STAGES:
            r = plan.plan_stage(cfg, target, stage, plan.StageLayout(1, 4, 2, 8, "full"), 128)
            out[stage] = r.row() | dict(kind=plan.target_devices(target)[0].device_kind, total=r.total_bytes,
                                         args=r.argument_bytes)
        # far too large a batch: the TPU compiler refuses it, and the plan says it does not fit
        big = plan.plan_stage(cfg, target, "scoring", plan.StageLayout(1, 4, 2, 4096, "none"), 2048)
        out["too big"] = dict(fits=big.fits, total=big.total_bytes, hbm=big.hbm_bytes)
        try:
            plan.topology_devices("v5e:9x9")
            out["bad"] = "no error"
        except plan.TopologyError as e:
            out["bad"] = str(e)
        print(json.dumps(out))
    """, env={"JAX_PLATFORMS": ""})
    assert "libtpu rejects topology 'v5e:9x9'" in res.pop("bad")
    big = res.pop("too big")
    assert not big["fits"] and big["total"] > big["hbm"], big
    for stage, r in res.items():
        assert r["kind"] == "TPU v5 lite" and r["fits"] and r["total"] > r["args"] > 0, (stage, r)


def test_plan_memory_script_reports_bad_topology():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_memory.py"), "--model", "llama2-7b",
                          "--topology", "v5e:3x3"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "unknown target or topology 'v5e:3x3'" in out.stderr


def test_gemma_mse_step_runs_the_block_with_its_layer_type():
    """Gemma 3 tiny (s s f s s f, window 4): a block copied from layer 2 (full attention) replacing just that layer
    has zero MSE on the first step only if the step gives it layer 2's type (run as a sliding layer, as layer 0's
    type or a default would have it, it is another function here)."""
    from streamline_jax.models.config import from_hf_config

    cfg = from_hf_config(dict(model_type="gemma3_text", vocab_size=128, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              sliding_window=4, sliding_window_pattern=3, rope_local_base_freq=100.0))
    start = 2
    assert cfg.layer_types[start] == "full_attention" != cfg.layer_types[0]
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a * 8 if a.ndim > 1 else a, params)  # layers that change the hidden state
    stack = params["segments"]["seg_0"]
    cut = lambda a, b: jax.tree.map(lambda x: x[a:b], stack)
    frozen = dict(embed_tokens=params["embed_tokens"], segments={"seg_0": cut(0, start),
                                                               "seg_1": cut(start, start + 1)})
    block = jax.tree.map(lambda x: x[start], stack)
    opt = plan.make_optimizer(1e-3)
    ids = np.random.RandomState(0).randint(0, 128, (2, 16))
    sc = plan.split_config(cfg, start, 1)
    _, _, loss = jax.jit(functools.partial(plan.mse_step, sc, opt))(block, opt.init(block), frozen, ids,
                                                                     np.ones_like(ids))
    assert float(loss) < 1e-10
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 64))
    mask = transformer.attention_mask_matrix(jnp.ones((2, 16), bool), jnp.arange(16)[None])
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    layer = transformer.decoder_layer(cfg)
    full, sliding = (layer.apply({"params": block}, x, mask, pos, None, None, jnp.asarray(t))[0] for t in (False, True))
    assert float(jnp.abs(full - sliding).max()) > 1e-3
