"""Model presets, mesh layouts, the planned steps' numbers against transformers, and ahead-of-time compiles for a
TPU topology (skipped without libtpu)."""

from __future__ import annotations

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

from streamline_jax import mesh_layouts, plan
from streamline_jax.models import transformer
from streamline_jax.models.config import to_hf_config
from streamline_jax.models.presets import PRESETS, PUBLISHED_PARAMS, preset
from streamline_jax.sharding import ShardingError
from tiny import LLAMA_UNTIED as LLAMA

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(mesh_layouts.TopologyError, match="unknown target or topology 'v5e:4x5'.*did you mean"):
        mesh_layouts.find_target("v5e:4x5")
    with pytest.raises(plan.TopologyError, match="not of the form"):
        plan.topology_devices("tpu-v5e-16")


def test_mesh_layouts_cover_every_target_and_stage():
    targets, overrides, seq_len = mesh_layouts.load_targets()
    assert set(targets) >= {"v5e-8", "v5e-16", "v5p-8", "v5p-32", "v4-32", "8xH100", "8xH200"}
    assert seq_len > 0
    for t in targets.values():
        for stage in mesh_layouts.STEP_LAYOUTS:
            layout = t.layout(stage)
            assert layout.devices == t.devices and layout.remat in transformer.REMAT_POLICIES
            assert layout.batch % (layout.data * layout.fsdp) == 0
    assert mesh_layouts.find_target("v5e:4x4").name == "v5e-16"
    fake = lambda kind, n: [SimpleNamespace(device_kind=kind)] * n
    assert mesh_layouts.pick_target(fake("TPU v5 lite", 16), targets).name == "v5e-16"
    assert mesh_layouts.pick_target(fake("TPU v5", 4), targets).name == "v5p-8"
    assert mesh_layouts.pick_target(fake("TPU v4", 16), targets).name == "v4-32"
    assert mesh_layouts.pick_target(fake("NVIDIA H100 80GB HBM3", 8), targets).name == "8xH100"
    assert mesh_layouts.pick_target(fake("cpu", 3), targets) is None


def test_layout_errors_name_the_problem():
    cfg = preset("llama2-70b")  # 64 heads, 8 kv heads
    with pytest.raises(ShardingError, match="tensor=16 does not divide num_kv_heads=8"):
        mesh_layouts.check_layout(cfg, mesh_layouts.StageLayout(1, 1, 16, 16))
    with pytest.raises(ShardingError, match="batch 12 cannot be split over data×fsdp = 1×16"):
        mesh_layouts.check_layout(cfg, mesh_layouts.StageLayout(1, 16, 1, 12))
    with pytest.raises(ValueError, match="unknown remat policy"):
        mesh_layouts.StageLayout(1, 1, 1, 1, "some")


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


# the optax chain of train_replacement with a warm-up of one step, so the second step already moves the block
TRAINING = dict(lr=1e-3, min_lr=1e-3, warmup_steps=1, num_steps=10, weight_decay=0.0)


def _program_inputs(stage, params, start, length, training=TRAINING):
    """The plan's training program for a span of LLAMA (the one train_replacement builds), and its real inputs."""
    from streamline_jax import pruning, train

    program, pruned_cfg = plan.training_program(stage, LLAMA, (start, length), None, training=training)
    _, pruned = pruning.prune_params(LLAMA, params, start, length)
    block = train.trainable_blocks(pruned_cfg)[0]
    trained, frozen_pruned = train.split_params(pruned, lambda p: p.startswith(f"segments/{block.key}/"))
    assert jax.tree.structure(trained) == jax.tree.structure(program.arguments[0])
    trained = jax.tree.map(lambda a: jnp.array(a, jnp.float32), trained)
    frozen = {"pruned": frozen_pruned, **({"dense": params} if stage == "mse" else {})}
    return program, trained, frozen


def _train_losses(program, trained, frozen, ids, steps=4):
    state, losses = program.tx.init(trained), []
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids))}
    for _ in range(steps):
        before = jax.tree.map(jnp.copy, trained)
        trained, state, loss = program.train_step(trained, state, frozen, batch)
        losses.append(float(loss))
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), trained, before)))
    return losses


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

    losses = _train_losses(*_program_inputs("lm", params, start, length), ids)
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

    losses = _train_losses(*_program_inputs("mse", params, start, length), ids)
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


EIGHT_CPUS = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def test_planned_steps_compile_and_run_sharded_on_8_cpu_devices():
    """The same abstract, sharded arguments the TPU plans use, compiled for 8 CPU devices and run with real arrays:
    every stage gives the numbers of the same program on one device."""
    res = _run("""
        import json, jax, jax.numpy as jnp, numpy as np
        from streamline_jax import mesh_layouts, plan
        from streamline_jax.score import score_sums
        from streamline_jax.models.config import ModelConfig
        cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
        layout = plan.StageLayout(2, 2, 2, 8, "full")
        mesh = plan.layout_mesh(layout, jax.devices())
        training = dict(num_steps=10, warmup_steps=1)
        out = {}
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 128, (8, 16)).astype(np.int32)
        tokens = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for stage in mesh_layouts.LAYOUT_STAGES:  # evaluate: test_plan_lowers_the_evaluation_step_the_run_executes
            p = plan.build_step(stage, cfg, layout, mesh, 16, span=(2, 2), training=training)
            compiled = p.lower().compile()
            mem = plan.memory_plan(compiled, stage, layout, 16, 16)
            fill = lambda a: jnp.zeros(a.shape, a.dtype) if jnp.issubdtype(a.dtype, jnp.integer) else \
                jnp.asarray(rng.standard_normal(a.shape) * 0.05, a.dtype)
            if stage == "scoring":
                params = jax.tree.map(fill, p.args[1])
                real = (params, ids, np.ones_like(ids))
                want = score_sums(cfg, params, ids, np.ones_like(ids))
            else:
                trained, frozen = jax.tree.map(fill, p.args[0]), jax.tree.map(fill, p.args[2])
                program, _ = plan.training_program(stage, cfg, (2, 2), None, remat="full", training=training)
                opt_state = program.tx.init(trained)
                real = (trained, opt_state, frozen, tokens)
                want = program.train_step(*jax.tree.map(jnp.copy, real))
            placed = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding),
                                  real, p.args[1:] if stage == "scoring" else p.args)
            got = compiled(*placed)
            last = lambda r: np.asarray(r[-1] if stage != "scoring" else r[0])
            # relative to the largest value: the scoring output is a sum of cosines over every token
            scale = max(1.0, float(np.max(np.abs(last(want)))))
            out[stage] = dict(err=float(np.max(np.abs(last(got) - last(want)))) / scale, total=mem.total_bytes)
        print(json.dumps(out))
    """, env=EIGHT_CPUS)
    for stage, r in res.items():
        assert r["err"] < 1e-4 and r["total"] > 0, (stage, r)


def test_plan_lowers_the_train_step_the_run_executes():
    """train_replacement on a model sharded over 8 CPU devices, and the plan for the same layout and settings,
    lower the same program (the same StableHLO text, donation and remat included) for each training mode; remat
    changes the program, and the train step donates the trained parameters and the optimizer state."""
    res = _run("""
        import dataclasses, hashlib, json, jax, numpy as np
        from streamline_jax import plan, train
        from streamline_jax.loading import place_on_mesh
        from streamline_jax.models import transformer
        from streamline_jax.models.config import ModelConfig
        from streamline_jax.models.model import Model
        from streamline_jax.pruning import prune
        cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
        layout = plan.StageLayout(2, 2, 2, 8, "full")
        mesh = plan.layout_mesh(layout, jax.devices())
        dense = place_on_mesh(Model(cfg, transformer.init_params(cfg, jax.random.PRNGKey(0))), mesh)
        pruned = prune(dense, 2, 2)
        ids = np.random.default_rng(0).integers(0, 128, (8, 16)).astype(np.int32)
        batches = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}] * 3
        lowered = {}
        build = train.program.training_program

        def spy(*args, **kwargs):
            program = build(*args, **kwargs)
            def step(*step_args):
                lowered.setdefault("run", program.train_step.lower(*step_args).as_text())
                return program.train_step(*step_args)
            return dataclasses.replace(program, train_step=step)

        digest = lambda text: hashlib.sha256(text.encode()).hexdigest()
        out = {}
        for mode, remat, grad_accum in (("lm", "full", 1), ("kd", "dots", 1), ("mse", "none", 2), ("lm", "none", 1)):
            lowered.clear()
            settings = dict(mode=mode, num_steps=1, grad_accum=grad_accum, lr=3e-4, kd_ce_weight=0.5 if mode == "kd" else 0.0)
            train.program.training_program = spy
            train.train_replacement(dense, pruned, batches, remat=remat, progress=False, **settings)
            train.program.training_program = build
            stage = "mse" if mode == "mse" else "lm"
            text = plan.build_step(stage, cfg, layout.replace(remat=remat), mesh, 16, span=(2, 2),
                                   training=settings).lower().as_text()
            out[f"{mode}/{remat}"] = dict(run=digest(lowered["run"]), plan=digest(text),
                                          barrier="optimization_barrier" in text,
                                          donated=text.count("tf.aliasing_output") + text.count("jax.buffer_donor"))
        print(json.dumps(out))
    """, env=EIGHT_CPUS, timeout=600)
    for key, r in res.items():
        assert r["run"] == r["plan"], (key, r)
        assert r["donated"] > 0, (key, r)
        assert r["barrier"] == (not key.endswith("/none")), (key, r)
    assert res["lm/full"]["plan"] != res["lm/none"]["plan"]


def test_plan_lowers_the_evaluation_step_the_run_executes():
    """A dense model and its pruned copy scored together on packed rows (the run's first evaluation) on 8 CPU
    devices, and the plan's `evaluate` stage for the same rows and span, lower the same program; the stage takes the
    scoring layout."""
    res = _run("""
        import hashlib, json, jax, numpy as np
        from streamline_jax import evaluation, mesh_layouts, plan
        from streamline_jax.loading import place_on_mesh
        from streamline_jax.models import transformer
        from streamline_jax.models.config import ModelConfig
        from streamline_jax.models.model import Model
        from streamline_jax.pruning import prune
        cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=4,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
        layout = plan.StageLayout(2, 2, 2, 8)
        mesh = plan.layout_mesh(layout, jax.devices())
        dense = place_on_mesh(Model(cfg, transformer.init_params(cfg, jax.random.PRNGKey(0))), mesh)
        pruned = prune(dense, 1, 2, replacement="layer")  # as the run prunes: the head is the dense model's array
        block = jax.tree.map(lambda a: a + 1, pruned.params["segments"]["seg_1"])  # as if trained
        pruned = pruned.replace(params={**pruned.params, "segments": {**pruned.params["segments"], "seg_1": block}})
        group = evaluation.model_group([dense, pruned])
        real, lowered = evaluation.shared_prefix_logprobs, {}

        def spy(config, params, **kwargs):
            lowered["run"] = real.jitted(config).lower(config, params, **kwargs).as_text()
            lowered["shape"] = kwargs["input_ids"].shape
            return real(config, params, **kwargs)

        evaluation.shared_prefix_logprobs = spy
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, 128, n) for n in (9, 7, 5, 12, 4, 6)]
        evaluation.score_sequences(group, seqs, [len(q) - 1 for q in seqs], batch_size=32, pack_length=16)
        batch, seq_len = lowered["shape"]
        step = plan.build_step("evaluate", cfg, layout.replace(batch=batch), mesh, seq_len, span=(1, 2))
        target = mesh_layouts.load_targets()[0]["v5e-8"]
        digest = lambda t: hashlib.sha256(t.encode()).hexdigest()
        print(json.dumps(dict(run=digest(lowered["run"]), plan=digest(step.lower().as_text()),
                              shape=[batch, seq_len], shared=group.shared,
                              same_layout=target.layout("evaluate") == target.layout("scoring"))))
    """, env=EIGHT_CPUS, timeout=600)
    assert res["run"] == res["plan"] and res["shape"][1] == 16 and res["shared"] == 1 and res["same_layout"], res


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
        from streamline_jax import mesh_layouts, plan
        from streamline_jax.models.config import ModelConfig
        cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=4,
                          num_heads=8, num_kv_heads=4, head_dim=32, tie_word_embeddings=False, dtype="bfloat16")
        target = mesh_layouts.find_target("v5e-8")
        out = {}
        for stage in plan.PLANNED_STEPS:
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


def test_plan_memory_plans_with_the_presets_file_and_the_runs_overrides():
    """What the `lm` stage trains comes from the preset's file (the big presets distil the block alone), then the
    run's overrides on the script's command line; a bad override is an error naming it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "scripts" / "plan_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.run_training("gemma-3-4b")["distill_trainable"] == ("block", "segments/.*")
    assert script.run_training("llama2-13b")["distill_trainable"] == ("block",)
    every_layer = script.run_training("llama2-13b", None, ['train.distill_trainable=[block,"segments/.*"]'])
    assert every_layer["distill_trainable"] == ("block", "segments/.*")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_memory.py"), "--model", "llama2-7b",
                          "--topology", "v5e-16", "train.distil_steps=3"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0 and "train.distil_steps" in out.stderr, out.stderr


def test_plan_takes_the_run_settings_nulls_and_distillation_phase_included():
    """scripts/plan_memory.py plans with the run's own train.* settings: num_steps null (every batch) plans, and the
    `lm` stage plans the distillation phase's KD step with what that phase trains."""
    import dataclasses

    from streamline_jax.settings import build_config

    run_config, _ = build_config(None, None, ["train.distill_trainable=[block, final_norm/.*]",
                                              "train.distill_freeze=[]"])
    training = {k: v for k, v in dataclasses.asdict(run_config.train).items() if k != "pair_cache"}
    assert training["num_steps"] is None and training["distill_steps"] > 0  # the defaults distil
    program, _ = plan.training_program("lm", LLAMA, (2, 2), None, training=training)
    trained = {"/".join(str(getattr(k, "key", k)) for k in path)
               for path, _ in jax.tree_util.tree_leaves_with_path(program.arguments[0])}
    assert program.loss_name == "kd" and any(p.startswith("final_norm") for p in trained)
    assert any("self_attn" in p for p in trained)  # distill_freeze=[]: the block's attention trains too
    mse, _ = plan.training_program("mse", LLAMA, (2, 2), None, training=training)
    assert mse.loss_name == "mse"


def test_distillation_splits_the_frozen_head_over_the_devices_instead_of_gathering_it():
    """With fsdp > 1 the head's embedding dimension is sharded, and the distillation's chunk loop gathered the whole
    matrix for the teacher, the student and the input gradient (qwen2.5-7b on 2 x 4 devices: 3 x 260 MiB a device).
    `vocab_split_heads` splits its vocabulary over every device instead: less temporary memory in the compiled step
    (its numbers: test_planned_steps_compile_and_run_sharded_on_8_cpu_devices)."""
    res = _run("""
        import json, jax
        from streamline_jax import plan
        from streamline_jax.models.config import ModelConfig
        from streamline_jax.train import losses
        cfg = ModelConfig(family="llama", vocab_size=32768, hidden_size=64, intermediate_size=96, num_layers=4,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
        layout = plan.StageLayout(1, 4, 2, 8, "full")
        mesh = plan.layout_mesh(layout, jax.devices())
        def temp():
            p = plan.build_step("lm", cfg, layout, mesh, 16, span=(1, 2),
                                training=dict(num_steps=10, warmup_steps=1, mode="kd"))
            return p.lower().compile().memory_analysis().temp_size_in_bytes
        split = temp()
        losses.vocab_split_heads = lambda params, mesh: {k: params[k] for k in losses.HEAD_KEYS if k in params}
        print(json.dumps(dict(split=split, gathered=temp())))
    """, env=EIGHT_CPUS)
    assert res["split"] < 0.8 * res["gathered"], res
