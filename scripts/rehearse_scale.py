"""Rehearse a pod-sized run on one host: a preset's exact shapes, random bf16 weights, the product's own command on
simulated CPU devices, tiny data sizes; then the saved Orbax model restored on another mesh and the Hugging Face export
read back by its index.

    python scripts/rehearse_scale.py --preset llama2-7b --devices 8

1. Writes random weights in the preset's shapes (names and shapes from transformers' own model class, built on the
   meta device) as sharded bf16 safetensors with model.safetensors.index.json, config.json and SmolLM2's tokenizer
   (its BPE cut to the model's vocabulary, so every id is valid) into ~/.cache/streamline_jax/rehearsal/<preset>:
   once, one tensor at a time, after checking the free disk.
2. Runs `python -m streamline_jax.run --model <that folder> --config configs/<preset>.yaml` on `--devices` simulated
   CPU devices (the mesh.* settings from `--mesh`: tensor parallelism first) with a few 64-token calibration and
   training chunks, a few MSE and distillation steps, one perplexity window and a few
   multiple-choice items; the span pairs cached on disk (train.pair_cache); one training checkpoint per phase, at
   its last step (each of a 7B's holds 3 GiB of float32 block and Adam state). Off: the GGUF export and the samples
   (neither is checked here; a 7B GGUF is another ~13 GB of disk).
   Its peak RSS is the kernel's (wait4's ru_maxrss of the run's process).
3. Restores the saved Orbax model on `--restore-devices` devices and loads the Hugging Face export (by its index) on
   `--devices`, each in its own process, and compares their logits on one batch: equal means within bf16's
   resolution, max |a - b| <= 2^-7 * max |a|, with the same argmax at every position.

The last line printed is one JSON object. The run's output folder is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
BF16_RESOLUTION = 2.0 ** -7


class RehearsalError(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------
# The model folder: shapes, tokenizer, random weights


def model_config(args):
    """(ModelConfig in bf16, the preset's YAML or None) from --preset or --config-json."""
    from streamline_jax.models.config import ModelConfig
    from streamline_jax.settings import CONFIG_DIR, ConfigError, preset_model_config

    if args.config_json:
        fields = json.loads(Path(args.config_json).read_text())
        return ModelConfig(**{**fields, "dtype": "bfloat16"}), None
    try:
        config = preset_model_config(args.preset)
    except (ConfigError, FileNotFoundError) as e:
        raise RehearsalError(f"--preset {args.preset}: {e}") from None
    return config.replace(dtype="bfloat16"), CONFIG_DIR / f"{args.preset}.yaml"


def hf_shapes(hf_config: dict) -> dict[str, tuple]:
    """name -> shape of every tensor of the Hugging Face model, from transformers' class on the meta device."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def cut_tokenizer(tokenizer_json: dict, vocab_size: int) -> dict:
    """A byte-level BPE tokenizer keeping only the ids below `vocab_size` (and the merges that make them)."""
    model = tokenizer_json["model"]
    vocab = {tok: i for tok, i in model["vocab"].items() if i < vocab_size}
    merges = []
    for m in model["merges"]:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(m)
    added = [t for t in tokenizer_json.get("added_tokens", []) if t["id"] < vocab_size]
    return {**tokenizer_json, "added_tokens": added, "model": {**model, "vocab": vocab, "merges": merges}}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from streamline_jax.loading import embedded_hf_folder

    source = embedded_hf_folder("smollm2-135m")
    (folder / "tokenizer.json").write_text(json.dumps(cut_tokenizer(
        json.loads((source / "tokenizer.json").read_text()), vocab_size)))
    shutil.copy(source / "tokenizer_config.json", folder / "tokenizer_config.json")


def random_rows(name: str, shape: tuple, rows_per_block: int = 4096):
    """Blocks of rows of a deterministic random tensor (norm scales one, biases zero), in bf16."""
    import ml_dtypes

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    total = shape[0] if shape else 1
    for lo in range(0, total, rows_per_block):
        block = (min(rows_per_block, total - lo),) + tuple(shape[1:])
        if "norm" in name:
            values = np.ones(block, np.float32)
        elif name.endswith(".bias"):
            values = np.zeros(block, np.float32)
        else:
            values = rng.standard_normal(block, dtype=np.float32) * np.float32(0.02)
        yield values.astype(ml_dtypes.bfloat16).reshape(block if shape else ())


def plan_shards(shapes: dict[str, tuple], shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple]) -> None:
    """One safetensors file, its header first, then each tensor block by block."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            for block in random_rows(name, shapes[name]):
                f.write(block.tobytes())


def check_disk(folder: Path, need: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RehearsalError(f"{what} needs {need / GIB:.1f} GiB of disk in {folder}, which has {free / GIB:.1f} "
                             f"GiB free")


def write_model_folder(folder: Path, config, shard_bytes: int) -> dict[str, tuple]:
    """The random model as a Hugging Face folder (kept: written once); name -> shape of its tensors."""
    from streamline_jax.models.config import to_hf_config

    hf_config = to_hf_config(config)
    shapes = hf_shapes(hf_config)
    if (folder / "config.json").exists() and json.loads((folder / "config.json").read_text()) == hf_config:
        return shapes
    check_disk(folder.parent, 2 * sum(int(np.prod(s)) for s in shapes.values()) + GIB, "the random weights")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = plan_shards(shapes, shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(tmp / fname, names, shapes)
        weight_map.update({n: fname for n in names})
    total = 2 * sum(int(np.prod(s)) for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_tokenizer(tmp, config.vocab_size)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))  # last: the folder is whole
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return shapes


# --------------------------------------------------------------------------------------------------------------
# Child processes: the run, the restore, the export's load


# XLA:CPU aborts a collective that some devices have waited 40 s for; simulated devices share this host's few cores,
# so at a 7B's sizes one device can be that far behind the others (a float32 evaluation was, once in three runs)
COLLECTIVE_TIMEOUT_S = 900


def device_env(devices: int) -> dict:
    """The run's environment: `devices` simulated CPU devices, and no results cache, so that every rehearsal
    evaluates the dense and the pruned model together as a first run does (a cached dense evaluation halves it)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), STREAMLINE_JAX_RESULTS_CACHE="off")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}",
                                         f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S}"])
    return env


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # removed meanwhile
                pass
    return total


def rss_and_peak(pid: int) -> tuple[int, int]:
    """/proc's VmRSS and VmHWM (the peak so far) of process `pid` in bytes, read at once; 0 once it has exited."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            found = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                     if line.startswith(("VmRSS:", "VmHWM:"))}
    except OSError:  # exited meanwhile
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def current_stage(log: Path) -> str:
    """The stage the run's log last said it started ("setup" before the first)."""
    found = re.findall(r"\[(\w+)\] started", log.read_text(errors="replace")) if log.exists() else []
    return found[-1] if found else "setup"


def run_child(command: list[str], env: dict, log: Path, watch: Path | None = None) -> dict:
    """The exit status (`rc`), peak RSS in bytes (`peak`: the kernel's), the peak RSS in each stage the log names
    (`stage_peaks`: the RSS sampled 5 times a second, and the kernel's high-water mark where it rose during the stage,
    so the stage that set the run's peak shows it even if it lasted between two samples) and the largest size `watch`
    reached on disk (`watch_peak`)."""
    seen = {"watch_peak": 0, "stage_peaks": {}}
    with open(log, "w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        done = threading.Event()

        def sample():
            high = 0
            for tick in itertools.count():
                if done.wait(0.2):
                    return
                name = current_stage(log)
                rss, hwm = rss_and_peak(child.pid)
                peak = max(rss, hwm if hwm > high else 0)  # a new high-water mark was set in this stage
                high = max(high, hwm)
                seen["stage_peaks"][name] = max(seen["stage_peaks"].get(name, 0), peak)
                if watch is not None and tick % 5 == 0 and watch.exists():
                    seen["watch_peak"] = max(seen["watch_peak"], folder_bytes(watch))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return {"rc": child.returncode, "peak": usage.ru_maxrss * 1024, **seen}


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def mesh_split(config, devices: int, mesh: str) -> tuple[int, int]:
    """(fsdp, tensor) for `devices`. `tensor`: the most tensor parallelism that divides the heads, the MLP and the
    vocabulary, the rest fsdp. On simulated devices every one is host memory, and fsdp gathers each layer (and the
    head) whole on every device as it runs: 8 fsdp devices hold 8 gathered copies of the largest weights at once,
    a pod's chips one each. `fsdp`: every device on fsdp, the layout configs/meshes.yaml gives 8-chip targets."""
    if mesh == "fsdp":
        return devices, 1
    sizes = (config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size)
    tensor = max(t for t in range(1, devices + 1) if devices % t == 0 and all(n % t == 0 for n in sizes))
    return devices // tensor, tensor


def run_overrides(args, folder: Path, fsdp: int, tensor: int) -> list[str]:
    """Tiny data sizes, every batch one sequence per fsdp device (`--batch`): the tensor axis splits the weights,
    not the batch, so each tensor device holds the whole batch's activations (every layer's hidden states while
    scoring), and simulated devices all hold theirs in host memory: 8 sequences on tensor 8 peaked 1.4 GiB above
    one in a 6-layer llama2-7b's scoring. A pod's chips each hold their own in their own memory."""
    b, seq = args.batch or fsdp, args.seq_len
    wikitext = '"{data}/wikitext-2-raw/wiki.test.raw"'  # quoted: a YAML value
    return [f"model.source={folder}", "model.dtype=bfloat16", f"data.seq_len={seq}", f"data.batch_size={b}",
            f"data.calib_chunks={b * args.calib_batches}", f"data.train_chunks={b * args.train_batches}",
            "data.valid_chunks=0", f"train.num_steps={args.mse_steps}", f"train.distill_steps={args.distill_steps}",
            "train.pair_cache=true", f"train.checkpoint_every={max(1, args.mse_steps, args.distill_steps)}",
            "eval.tasks=[piqa]", f"eval.perplexity_text={wikitext}",
            f"eval.window={seq}", f"eval.ppl_windows={b}", f"eval.limit={args.mc_items}", f"eval.batch_size={b}",
            "samples.prompts=[]", "export.gguf=false", "mesh.data=1", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]


def run_pipeline(args, folder: Path, preset_yaml: Path | None, out: Path, mesh: tuple[int, int]) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, written in place (no --overwrite staging)
    command = [sys.executable, "-m", "streamline_jax.run", "--model", str(folder), "--out", str(out), "--quiet"]
    if preset_yaml is not None:
        command += ["--config", str(preset_yaml)]  # the preset's settings (what distils), its shapes checked
    command += run_overrides(args, folder, *mesh) + args.set
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    child = run_child(command, device_env(args.devices), log, watch=out / "pair_cache")
    peaks = {k: round(v / GIB, 2) for k, v in child["stage_peaks"].items()}
    if child["rc"] != 0:
        raise RehearsalError(f"the run failed (exit {child['rc']}; peak RSS by stage, GiB: {peaks}); the end of "
                             f"{log}:\n{tail(log)}")
    report = json.loads((out / "report.json").read_text())
    return {"command": " ".join(command), "wall_s": time.perf_counter() - start, "peak_rss": child["peak"],
            "stage_peak_rss_gib": peaks, "pair_cache": child["watch_peak"], "report": report}


def offloaded_gib(report: dict) -> float:
    """GiB of the dense span that training kept on disk while its steps ran (train.offload_span; 0: none)."""
    training = report.get("training") or {}
    most = max(phase.get("offloaded", {}).get("bytes", 0) for phase in (training, training.get("distill") or {}))
    return round(most / GIB, 6)


COMPARE_TOKENS = 64


def logits_child(model_path: str, devices: int, tensor: int, save: str) -> None:
    """In a child process: load `model_path` onto `devices` devices (`tensor` of them on the tensor axis, the rest
    fsdp) and save its logits on a fixed batch."""
    import jax

    from streamline_jax.loading import load
    from streamline_jax.models.model import forward, with_compute_dtype
    from streamline_jax.sharding import make_mesh

    assert jax.device_count() == devices, jax.devices()
    model = load(model_path, "bfloat16", mesh=make_mesh(1, devices // tensor, tensor))
    model = with_compute_dtype(model, "float32")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, COMPARE_TOKENS))
    np.save(save, np.asarray(forward(model, ids), np.float32))


def model_logits(model_path: Path, devices: int, tensor: int, save: Path) -> tuple[np.ndarray, int]:
    """(logits, peak RSS of the loading process)."""
    log = save.with_suffix(".log")
    command = [sys.executable, str(Path(__file__).resolve()), "--logits-of", str(model_path), "--devices",
               str(devices), "--tensor", str(tensor), "--save", str(save)]
    child = run_child(command, device_env(devices), log)
    if child["rc"] != 0:
        raise RehearsalError(f"loading {model_path} on {devices} devices failed (exit {child['rc']}):\n{tail(log)}")
    return np.load(save), child["peak"]


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict:
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(a)))
    same_argmax = bool(np.array_equal(a.argmax(-1), b.argmax(-1)))
    return {"equal": diff <= BF16_RESOLUTION * scale and same_argmax, "max_abs_diff": diff, "max_abs": scale,
            "same_argmax": same_argmax}


def check_export_index(folder: Path) -> dict:
    """The export's index against its shards' headers: every tensor where the index says, bf16, sizes adding up."""
    from streamline_jax.checkpoint import safetensors_index

    index_path = folder / "model.safetensors.index.json"
    if not index_path.exists():  # a small model: one file (export.MAX_SHARD_BYTES)
        names = list(safetensors_index(folder / "model.safetensors"))
        index = {"weight_map": dict.fromkeys(names, "model.safetensors"),
                 "metadata": {"total_size": os.path.getsize(folder / "model.safetensors")}}
    else:
        index = json.loads(index_path.read_text())
    found, total = {}, 0
    for fname in sorted(set(index["weight_map"].values())):
        for name, (dtype, shape, _) in safetensors_index(folder / fname).items():
            found[name] = fname
            total += np.dtype(dtype).itemsize * int(np.prod(shape))
            if np.dtype(dtype).name != "bfloat16":
                raise RehearsalError(f"{folder / fname}: {name} is {np.dtype(dtype).name}, not bfloat16")
    if found != index["weight_map"] or (index_path.exists() and total != index["metadata"]["total_size"]):
        raise RehearsalError(f"{folder}: model.safetensors.index.json does not match its shards")
    return {"shards": len(set(found.values())), "tensors": len(found), "bytes": total}


# --------------------------------------------------------------------------------------------------------------
# The rehearsal


def stage_seconds(report: dict) -> dict:
    return {k: round(v, 1) for k, v in report["stage_times"].items()}


def rehearse(args) -> dict:
    config, preset_yaml = model_config(args)
    name = args.preset or Path(args.config_json).stem
    cache = Path(args.cache).expanduser()
    folder = cache / name
    shapes = write_model_folder(folder, config, int(args.shard_gib * GIB))
    weights = sum(2 * int(np.prod(s)) for s in shapes.values())
    out = cache / "runs" / name
    check_disk(out.parent, 2 * weights + GIB, "the run's outputs (Orbax model, Hugging Face export, pair cache)")
    result = {"preset": name, "params": weights // 2, "weights_gib": round(weights / GIB, 3)}
    try:
        mesh = mesh_split(config, args.devices, args.mesh)
        ran = run_pipeline(args, folder, preset_yaml, out, mesh)
        result.update(peak_rss_gib=round(ran["peak_rss"] / GIB, 3), rss_ratio=round(ran["peak_rss"] / weights, 3),
                      stage_seconds=stage_seconds(ran["report"]), stage_peak_rss_gib=ran["stage_peak_rss_gib"],
                      pair_cache_gib=round(ran["pair_cache"] / GIB, 4), offloaded_gib=offloaded_gib(ran["report"]),
                      span=ran["report"].get("span"), pruned_params=ran["report"]["params"]["pruned"])
        restore_mesh = mesh_split(config, args.restore_devices, args.mesh)
        restored, restore_peak = model_logits(out / "model", args.restore_devices, restore_mesh[1],
                                              out.parent / f"{name}-orbax.npy")
        exported, export_peak = model_logits(out / "hf", args.devices, mesh[1], out.parent / f"{name}-hf.npy")
        compared = compare_logits(restored, exported)
        result.update(restored_equal=compared["equal"], logits=compared, export_index=check_export_index(out / "hf"),
                      export_loaded=True, restore_peak_rss_gib=round(restore_peak / GIB, 3),
                      export_load_peak_rss_gib=round(export_peak / GIB, 3), command=ran["command"],
                      mesh={"run": dict(fsdp=mesh[0], tensor=mesh[1]),
                            "restore": dict(fsdp=restore_mesh[0], tensor=restore_mesh[1])})
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            for npy in out.parent.glob(f"{name}-*.npy"):
                npy.unlink()
    result["ok"] = bool(result["restored_equal"] and result["export_loaded"])
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--preset", help="a model preset (streamline_jax/configs/NAME.yaml), e.g. llama2-7b")
    what.add_argument("--config-json", help="a JSON file of ModelConfig fields instead (tests: tiny shapes)")
    what.add_argument("--logits-of", help=argparse.SUPPRESS)  # the child process that loads a model
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--tensor", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mesh", choices=("tensor", "fsdp"), default="tensor",
                   help="tensor: the most tensor parallelism the shapes allow, the rest fsdp (default); fsdp: every "
                        "device on fsdp, as meshes.yaml's 8-chip layouts (host memory then holds a gathered layer "
                        "and head per simulated device)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices of the run (default 8)")
    p.add_argument("--restore-devices", type=int, default=4, help="devices the Orbax model is restored on")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "streamline_jax" / "rehearsal"),
                   help="where the random model is kept and the run is written")
    p.add_argument("--shard-gib", type=float, default=4.0, help="safetensors shard size of the random model")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per chunk (and per perplexity window)")
    p.add_argument("--batch", type=int, help="chunks per batch (default: one per fsdp device)")
    p.add_argument("--calib-batches", type=int, default=1, help="calibration batches")
    p.add_argument("--train-batches", type=int, default=2, help="training batches")
    p.add_argument("--mse-steps", type=int, default=2)
    p.add_argument("--distill-steps", type=int, default=2)
    p.add_argument("--mc-items", type=int, default=4, help="multiple-choice items (PIQA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the run, after the rehearsal's own (e.g. train.distill_trainable=[block])")
    p.add_argument("--keep", action="store_true", help="keep the run's output folder")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.logits_of:
        logits_child(args.logits_of, args.devices, args.tensor, args.save)
        return 0
    if not (args.preset or args.config_json):
        print("error: give --preset NAME or --config-json FILE", file=sys.stderr)
        return 2
    try:
        result = rehearse(args)
    except RehearsalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
