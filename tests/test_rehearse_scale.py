"""scripts/rehearse_scale.py, the pod rehearsal on simulated devices, end to end on a tiny preset-shaped model (its
7B figures are in docs/scale.md; stage times stay out of tests), and its pieces that must hold at every size."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny import LLAMA_2K, fake_shared_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import rehearse_scale  # noqa: E402


def tiny_config_json(path: Path) -> Path:
    fields = {k: v for k, v in dataclasses.asdict(LLAMA_2K).items() if v is not None}
    fields.update(vocab_size=512, num_kv_heads=4, eos_token_id=0, bos_token_id=0)
    for k in ("dtype", "compute_dtype", "layout", "pruned_spans", "layer_types"):
        fields.pop(k, None)
    path.write_text(json.dumps(fields))
    return path


@pytest.mark.pipeline
def test_rehearsal_runs_end_to_end_on_four_simulated_devices(tmp_path):
    env = dict(os.environ, STREAMLINE_JAX_DATA=str(fake_shared_data(tmp_path / "data")), PYTHONPATH=str(ROOT))
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "rehearse_scale.py"), "--config-json",
                           str(tiny_config_json(tmp_path / "tiny.json")), "--devices", "4", "--restore-devices", "2",
                           "--cache", str(cache), "--shard-gib", "0.0002", "--set", "train.offload_span=disk"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["ok"] and result["restored_equal"] and result["export_loaded"]
    for key in ("preset", "params", "weights_gib", "peak_rss_gib", "stage_seconds", "pair_cache_gib"):
        assert key in result
    assert {"load", "score", "prune", "train", "evaluate", "save"} <= set(result["stage_seconds"])
    assert result["pair_cache_gib"] > 0 and result["peak_rss_gib"] > 0
    assert result["offloaded_gib"] > 0  # the span left for training and came back for the evaluation
    assert result["mesh"] == {"run": {"fsdp": 1, "tensor": 4}, "restore": {"fsdp": 1, "tensor": 2}}
    index = json.loads((cache / "tiny" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the random weights are sharded
    assert not (cache / "runs" / "tiny").exists()  # the run's output is deleted without --keep


def test_cut_tokenizer_gives_only_ids_below_the_vocabulary():
    import transformers

    from streamline_jax.loading import embedded_hf_folder

    source = json.loads((embedded_hf_folder("smollm2-135m") / "tokenizer.json").read_text())
    cut = rehearse_scale.cut_tokenizer(source, 1000)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
        json.dumps(cut)))
    ids = tok("The quick brown fox jumps over the lazy dog; 12345 ünïcödé")["input_ids"]
    assert ids and max(ids) < 1000
    assert tok.decode(ids) == "The quick brown fox jumps over the lazy dog; 12345 ünïcödé"


def test_random_weights_are_written_in_the_preset_shapes_one_block_at_a_time():
    shapes = {"model.norm.weight": (8,), "model.embed_tokens.weight": (10, 4)}
    blocks = list(rehearse_scale.random_rows("model.embed_tokens.weight", shapes["model.embed_tokens.weight"], 3))
    assert [b.shape for b in blocks] == [(3, 4), (3, 4), (3, 4), (1, 4)] and str(blocks[0].dtype) == "bfloat16"
    assert np.all(np.concatenate(list(rehearse_scale.random_rows("model.norm.weight", (8,)))).astype(float) == 1)
    assert rehearse_scale.plan_shards(shapes, 20) == [["model.norm.weight"], ["model.embed_tokens.weight"]]


def test_batches_hold_one_sequence_per_fsdp_device_and_each_phase_checkpoints_once():
    """Tensor devices each hold the whole batch's activations (host memory, on simulated devices): the batch is the
    fsdp size. One training checkpoint per phase: a 7B's holds 3 GiB of float32 state, two per phase were 12 GiB."""
    args = rehearse_scale.make_parser().parse_args(["--preset", "llama2-7b", "--devices", "8"])
    tensor8 = rehearse_scale.run_overrides(args, Path("/m"), 1, 8)
    assert {"data.batch_size=1", "data.train_chunks=2", "train.checkpoint_every=2", "mesh.tensor=8"} <= set(tensor8)
    assert "data.batch_size=8" in rehearse_scale.run_overrides(args, Path("/m"), 8, 1)
