"""Peak host memory of the streaming load onto 8 simulated devices, against the checkpoint's largest tensor.

    python scripts/bench_load.py [--layers 4] [--devices 8] [--mesh 1,8,1] [--keep DIR]

Writes a float16 Hugging Face checkpoint with llama2-13b's shapes (hidden 5120, MLP 13824, 40 heads, vocab 32000,
untied head) and `--layers` layers of random values into a temporary folder, sharded one file per layer, then loads
it in a fresh process with `load(folder, "float16", mesh=...)` while a thread samples the process's resident memory.
On simulated CPU devices the devices' own buffers are host memory too, so the figure that matters is the host
memory beyond what the devices hold: resident set − baseline − bytes placed on devices so far (counted as each shard
lands, so the sample can only over-count). The memory-mapped checkpoint pages a shard read touches count as resident.
The folder is deleted afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                  num_key_value_heads=40, head_dim=128)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """A sharded float16 safetensors checkpoint with random values; returns the largest tensor's bytes."""
    from safetensors.numpy import save_file

    from streamline_jax.models.config import from_hf_config, to_hf_config

    rng = np.random.default_rng(seed)
    d, f, v = LLAMA2_13B["hidden_size"], LLAMA2_13B["intermediate_size"], LLAMA2_13B["vocab_size"]
    hf = dict(model_type="llama", num_hidden_layers=layers, rms_norm_eps=1e-5, max_position_embeddings=4096,
              tie_word_embeddings=False, **{k: v for k, v in LLAMA2_13B.items()})
    config = from_hf_config(hf, dtype="float16")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_hf_config(config), indent=2))

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    shards = [{"model.embed_tokens.weight": rand(v, d), "model.norm.weight": np.ones(d, np.float16),
               "lm_head.weight": rand(v, d)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(d, d),
                       p + "self_attn.v_proj.weight": rand(d, d), p + "self_attn.o_proj.weight": rand(d, d),
                       p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                       p + "mlp.down_proj.weight": rand(d, f), p + "input_layernorm.weight": np.ones(d, np.float16),
                       p + "post_attention_layernorm.weight": np.ones(d, np.float16)})
    weight_map, largest, total = {}, 0, 0
    for j, tensors in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, a in tensors.items():
            weight_map[k] = name
            largest, total = max(largest, a.nbytes), total + a.nbytes
        shards[j] = None  # free as we go
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return largest, total


MEASURE = r"""
import json, os, sys, threading, time, tracemalloc
sys.path.insert(0, {root!r})
import jax, numpy as np
from streamline_jax.sharding import make_mesh
from streamline_jax.loading import load

PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

mesh = make_mesh(*{mesh})
jax.device_put(np.ones(1024, np.float16), jax.devices()[-1]).block_until_ready()  # warm the device path
placed = [0]
peak = dict(overhead=0, rss=0)
base = rss()
done = threading.Event()
def sample():
    while not done.is_set():
        r = rss()
        peak["rss"] = max(peak["rss"], r)
        peak["overhead"] = max(peak["overhead"], r - base - placed[0])
        time.sleep(0.001)
t = threading.Thread(target=sample, daemon=True); t.start()
tracemalloc.start()
t0 = time.perf_counter()
model = load({folder!r}, "float16", mesh=mesh, on_shard=lambda n: placed.__setitem__(0, placed[0] + n))
jax.block_until_ready(model.params)
seconds = time.perf_counter() - t0
_, traced_peak = tracemalloc.get_traced_memory()
done.set(); t.join()
device_bytes = sum(s.data.nbytes for a in jax.tree.leaves(model.params) for s in a.addressable_shards)
print(json.dumps(dict(base_rss=base, peak_rss=peak["rss"], peak_overhead=peak["overhead"], placed=placed[0],
                      device_bytes=device_bytes, traced_peak=traced_peak, seconds=seconds,
                      devices=len(jax.devices()))))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor")
    ap.add_argument("--keep", help="write the checkpoint here and keep it")
    args = ap.parse_args(argv)
    mesh = tuple(int(x) for x in args.mesh.split(","))
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        t0 = time.perf_counter()
        largest, total = write_checkpoint(folder / "ckpt", args.layers)
        print(f"wrote {total / 1e9:.2f} GB float16 checkpoint ({args.layers} layers of llama2-13b shapes) in "
              f"{time.perf_counter() - t0:.0f} s; largest tensor {largest / 1e6:.1f} MB", flush=True)
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
                   JAX_PLATFORMS="cpu")
        code = MEASURE.format(root=str(ROOT), mesh=mesh, folder=str(folder / "ckpt"))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"measurement failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    mb = lambda b: f"{b / 1e6:.0f} MB"
    print(f"loaded onto {r['devices']} simulated devices, mesh data,fsdp,tensor={mesh}, in {r['seconds']:.1f} s")
    print(f"  device buffers (all shards)          {mb(r['device_bytes'])}  (checkpoint {mb(total)})")
    print(f"  peak resident set                    {mb(r['peak_rss'])}  (baseline {mb(r['base_rss'])})")
    print(f"  peak host memory beyond the devices  {mb(r['peak_overhead'])}  = "
          f"{r['peak_overhead'] / largest:.2f} × largest tensor ({mb(largest)}); limit 2 ×")
    print(f"  peak numpy staging (tracemalloc)     {mb(r['traced_peak'])}  = {r['traced_peak'] / largest:.2f} × "
          f"largest tensor")
    ok = r["peak_overhead"] < 2 * largest
    print("PASS" if ok else "FAIL", "peak host memory < 2 × largest tensor")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
