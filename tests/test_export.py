"""export.py: stock Hugging Face folders (checked by loading them in transformers) and Orbax round trips, including a
restore onto 8 simulated CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from reference import params_from_torch, torch_model
from streamline_jax import export, pruning as prune_mod
from streamline_jax.loading import ORBAX_MARKER, load
from streamline_jax.models.config import ModelConfig
from streamline_jax.models.model import Model, forward
from tiny import OPT

ROOT = Path(__file__).resolve().parents[1]

LLAMA = ModelConfig(family="llama", model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                    num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, mlp_bias=True)


class _Tokenizer:
    """Stands in for a tokenizer where only save_pretrained is needed (what it writes is no tokenizer file)."""

    def save_pretrained(self, folder):
        Path(folder, "stub_tokenizer.txt").write_text("stub")


def tiny(config) -> Model:
    return Model(config, params_from_torch(config, torch_model(config)), _Tokenizer())


def _ids(batch=2, length=12, vocab=128, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy(), model


@pytest.mark.parametrize("config", [LLAMA, OPT], ids=["llama", "opt"])
@pytest.mark.parametrize("replacement", ["none", "layer", "ffn"])
def test_export_hf_loads_in_transformers_with_same_logits(tmp_path, config, replacement):
    model = tiny(config)
    pruned = prune_mod.prune(model, 1, 3, replacement)
    # a trained block is not a copy of any layer: perturb it so that a wrong export would show
    if replacement != "none":
        key = next(k for k, s in zip(pruned.params["segments"], pruned.config.layout) if s.kind != "layers")
        pruned.params["segments"][key] = jax.tree.map(lambda v: v * 1.3 + 0.01, pruned.params["segments"][key])
    folder = export.export_hf(pruned, tmp_path / "hf")
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == pruned.config.depth == 6 - 3 + (replacement != "none")
    ids = _ids()
    ref, hf_model = _hf_logits(folder, ids)
    assert type(hf_model).__module__.startswith("transformers.models.")  # stock class, no custom code
    ours = np.asarray(forward(pruned, ids))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-5
    # and the export is not trivially the dense model
    dense_ref = np.asarray(forward(model, ids))
    assert np.max(np.abs(dense_ref - ref)) > 1e-3


def test_export_hf_sharded_and_bfloat16(tmp_path):
    model = tiny(LLAMA)
    bf16 = model.replace(config=model.config.replace(dtype="bfloat16"),
                         params=jax.tree.map(lambda a: a.astype("bfloat16"), model.params))
    folder = export.export_hf(bf16, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref, hf_model = _hf_logits(folder, _ids())
    assert next(hf_model.parameters()).dtype == torch.float32  # upcast on request: the bf16 bits read back
    ours = np.asarray(forward(model.replace(params=jax.tree.map(
        lambda a: a.astype("bfloat16").astype("float32"), model.params)), _ids()))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


def test_mlp_block_cannot_be_exported_and_nothing_is_written(tmp_path):
    pruned = prune_mod.prune(tiny(LLAMA), 1, 3, "mlp")
    with pytest.raises(export.ExportError, match="mlp.*Orbax"):
        export.export_hf(pruned, tmp_path / "hf")
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    model = tiny(LLAMA)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_hf(model, tmp_path / "hf")
    assert not any(tmp_path.iterdir())
    # an existing folder is refused unless overwrite
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        export.atomic_folder(tmp_path / "hf").__enter__()


def test_orbax_round_trip_same_process(tmp_path):
    pruned = prune_mod.prune(tiny(OPT), 2, 2, "ffn")
    folder = export.save_orbax_model(pruned, tmp_path / "model")
    assert (folder / ORBAX_MARKER).exists()
    back = load(folder)
    assert back.config == pruned.config
    np.testing.assert_array_equal(np.asarray(forward(back, _ids())), np.asarray(forward(pruned, _ids())))


RESTORE_ON_8 = r"""
import sys, numpy as np, jax
assert jax.device_count() == 8, jax.devices()
from streamline_jax import export, load, make_mesh
from streamline_jax.models.model import forward
mesh = make_mesh(data=1, fsdp=4, tensor=2)
direct = export.load_orbax_model(sys.argv[1], mesh=mesh)
via_load = load(sys.argv[1], mesh=mesh)
ids = np.random.RandomState(0).randint(0, 128, (2, 12))
for m in (direct, via_load):
    kernel = m.params["segments"]["seg_0"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8, kernel.sharding
np.save(sys.argv[2], np.asarray(forward(direct, ids)))
np.save(sys.argv[3], np.asarray(forward(via_load, ids)))
"""


def test_orbax_saved_on_one_device_restores_on_8(tmp_path):
    pruned = prune_mod.prune(tiny(LLAMA), 2, 3, "layer")
    folder = export.save_orbax_model(pruned, tmp_path / "model")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    a, b = tmp_path / "direct.npy", tmp_path / "load.npy"
    proc = subprocess.run([sys.executable, "-c", RESTORE_ON_8, str(folder), str(a), str(b)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = np.asarray(forward(pruned, _ids()))
    for path in (a, b):
        np.testing.assert_allclose(np.load(path), expected, rtol=1e-5, atol=1e-5)
