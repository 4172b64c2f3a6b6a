"""Sharding: logical axis rules, and the forward on a 2 x 4 (fsdp, tensor) mesh of 8 simulated CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from streamline_jax.sharding import ShardingError, logical_to_spec, make_mesh, param_shardings
from streamline_jax.models import transformer
from tiny import CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def test_logical_rules_map_to_mesh_axes():
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    # a mesh axis splits at most one dimension of a tensor
    assert logical_to_spec(("mlp", "vocab")) == P("tensor", None)


def test_mesh_that_does_not_divide_the_heads_is_a_clear_error():
    config = CONFIGS["llama_gqa_tied"]  # 2 kv heads
    devices = [jax.devices()[0]] * 1
    mesh = make_mesh(1, 1, 1, devices=devices)
    param_shardings(transformer.abstract_params(config), transformer.param_axes(config), mesh)  # fine on 1 device
    fake = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 1, "tensor": 4}})()
    from streamline_jax import sharding

    with pytest.raises(ShardingError, match=r"k_proj.*size 2 cannot be split 4 ways"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(transformer.abstract_params(config))[0]:
            names = transformer.param_axes(config)
            for p in path:
                names = names[p.key]
            sharding._check_divisible(jax.tree_util.keystr(path), leaf.shape, logical_to_spec(names), fake)


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ShardingError, match="needs 8 devices, found 1"):
        make_mesh(2, 4, 1, devices=jax.devices()[:1])


SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    import streamline_jax as sj
    from streamline_jax.models.config import ModelConfig
    from streamline_jax.models import transformer
    from streamline_jax.loading import place_on_mesh
    assert len(jax.devices()) == 8, jax.devices()
    config = ModelConfig(family="llama", model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, tie_word_embeddings=False)
    params = transformer.init_params(config, jax.random.PRNGKey(0))
    ids = np.random.default_rng(0).integers(0, 256, size=(4, 16))
    mask = np.ones_like(ids); mask[1, 10:] = 0
    one = np.asarray(sj.forward(sj.Model(config, params), ids, mask))
    mesh = sj.make_mesh(data=1, fsdp=2, tensor=4)
    sharded = place_on_mesh(sj.Model(config, params), mesh)
    q = sharded.params["segments"]["seg_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding.spec
    shards = q.addressable_shards
    assert len({s.device for s in shards}) == 8
    assert shards[0].data.shape == (3, 32, 2, 8), shards[0].data.shape
    head = sharded.params["lm_head"]
    assert head.addressable_shards[0].data.shape == (32, 64)
    logits = sj.forward(sharded, ids, mask)
    assert len(logits.sharding.device_set) == 8
    err = np.abs(np.asarray(logits) - one).max() / np.abs(one).max()
    assert err <= 1e-5, err
    print("OK", err)
""")


def test_forward_on_8_simulated_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
