"""Model configuration: one frozen dataclass for both families, plus the layer layout."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from .families import FAMILIES, UnsupportedArchitectureError, architecture

SEGMENT_KINDS = ("layers", "layer", "ffn", "mlp", "linear")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of the decoder stack.

    `layers`: `num_layers` original decoder layers, stacked and scanned.
    `layer`, `ffn`, `mlp`, `linear`: one replacement block standing in for a pruned span.
    """

    kind: str
    num_layers: int = 1
    width: int | None = None  # hidden width of an `mlp` block

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"unknown segment kind {self.kind!r}; expected one of {SEGMENT_KINDS}")
        if self.kind == "layers" and self.num_layers < 1:
            raise ValueError("a `layers` segment needs at least one layer")
        if self.kind != "layers" and self.num_layers != 1:
            raise ValueError("a replacement block counts as exactly one layer")
        if self.kind == "mlp" and not self.width:
            raise ValueError("an `mlp` block needs a width")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    model_type: str = ""  # Hugging Face model_type, for export
    # llama family
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    attention_bias: bool = False  # bias on q, k, v and o
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before the rotary embedding (Qwen3)
    mlp_bias: bool = False
    sliding_window: int | None = None  # every layer attends this far back (Mistral)
    # Gemma 2/3 flags
    norm_offset: float = 0.0  # RMSNorm applies (norm_offset + weight): Gemma stores w and applies 1 + w
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the weights' dtype
    sandwich_norms: bool = False  # norms on the attention and MLP outputs as well as their inputs
    query_pre_attn_scalar: float | None = None  # q is scaled by this ** -0.5 instead of head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None
    # the attention type of each layer of the current stack (a replacement block keeps the type of the layer it
    # was made from): "sliding_attention" layers attend `local_window` slots back with rope base
    # `local_rope_theta` (unscaled; None: rope_theta); "full_attention" layers everything. Empty: all full.
    layer_types: tuple[str, ...] = ()
    local_window: int | None = None
    local_rope_theta: float | None = None
    # opt family
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "silu"
    # both
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # the weights'
    # the dtype dot products take their inputs in (accumulating in float32); None: the weights' dtype. Norms,
    # softmax, the residual stream and losses are float32 whatever this says.
    compute_dtype: str | None = None
    # the platform attention is traced for ("cpu", "tpu", "gpu"; None: this host's default backend): an
    # ahead-of-time TPU plan compiled on a CPU host sets it to trace the attention a TPU runs
    attention_platform: str | None = None
    # the stack after surgery; empty means `num_layers` original layers
    layout: tuple[Segment, ...] = ()
    # (start, length, kind) of each pruned span, in original layer numbers
    pruned_spans: tuple[tuple[int, int, str], ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"unknown model family {self.family!r}; supported: {FAMILIES}")
        if self.model_type and architecture(self.model_type).family != self.family:
            raise ValueError(f"model_type {self.model_type!r} runs on the "
                             f"{architecture(self.model_type).family!r} family, not {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.layout:
            object.__setattr__(self, "layout", (Segment("layers", self.num_layers),))
        layout = tuple(s if isinstance(s, Segment) else Segment(**s) for s in self.layout)
        object.__setattr__(self, "layout", layout)
        if self.depth != self.num_layers:
            raise ValueError(f"layout has {self.depth} layers but num_layers={self.num_layers}")
        if self.rope_scaling is not None and isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        self._check_layer_types()

    def _check_layer_types(self):
        types = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)
        if not types:
            return
        if len(types) != self.depth:
            raise ValueError(f"layer_types has {len(types)} entries for a stack of {self.depth} layers")
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"unknown layer_types {unknown}; expected {LAYER_TYPES}")
        if "sliding_attention" in types and not self.local_window:
            raise ValueError("layer_types has sliding_attention layers but local_window is not set")

    def layer_is_local(self, first: int, count: int) -> tuple[bool, ...]:
        """Whether each of the `count` stack layers from `first` is a sliding-window layer."""
        if not self.layer_types:
            return (False,) * count
        return tuple(t == "sliding_attention" for t in self.layer_types[first:first + count])

    @property
    def depth(self) -> int:
        return sum(s.num_layers for s in self.layout)

    @property
    def is_dense(self) -> bool:
        """Every original layer, in one stack or in consecutive stacks (`pruning.split_stack`)."""
        return all(s.kind == "layers" for s in self.layout) and not self.pruned_spans

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m projects it in and out)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def has_projections(self) -> bool:
        return self.family == "opt" and self.embed_dim != self.hidden_size

    @property
    def has_final_norm(self) -> bool:
        return self.family == "llama" or self.do_layer_norm_before

    def one_block(self, segment: Segment, layer: int = 0) -> "ModelConfig":
        """A one-segment model of `segment` standing at stack index `layer` (whose attention type it keeps)."""
        return self.replace(num_layers=1, layout=(segment,), pruned_spans=(),
                            layer_types=self.layer_types[layer:layer + 1])

    def pruned_layer_types(self, start: int, end: int, block: bool) -> tuple[str, ...]:
        """layer_types after stack layers [start, end) are cut out (and, with `block`, one replacement block made
        from layer `start` put in their place: it keeps that layer's type)."""
        t = self.layer_types
        return t[:start] + (t[start:start + 1] if block else ()) + t[end:] if t else ()

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        check_keys(d, cls, "model config")
        d["layout"] = tuple(Segment(**s) if isinstance(s, dict) else s for s in d.get("layout", ()))
        d["pruned_spans"] = tuple(tuple(s) for s in d.get("pruned_spans", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        if d.get("rope_scaling"):
            d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
        return cls(**d)


def check_keys(d: dict, cls, what: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"unknown {what} key {key!r}{hint}")


def from_hf_config(hf: dict, dtype: str = "float32") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dictionary (architectures: see `families.py`)."""
    arch = architecture(hf.get("model_type"))
    return ModelConfig(
        family=arch.family,
        model_type=arch.model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=_first(hf.get("pad_token_id")),
        dtype=dtype,
        **arch.from_hf(hf),
    )


def to_hf_config(config: ModelConfig) -> dict:
    """A stock Hugging Face config.json for `config`'s current depth, naming its architecture's class."""
    c = config
    arch = architecture(c.model_type or c.family)
    hf = dict(
        model_type=arch.model_type, architectures=[arch.hf_class],
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads, max_position_embeddings=c.max_position_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        tie_word_embeddings=c.tie_word_embeddings, torch_dtype=c.dtype, **arch.to_hf(c))
    # a flag the architecture's config cannot hold would be lost silently: the export would be another model
    back, defaults = arch.from_hf(hf), {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    lost = [f"{f}={getattr(c, f)!r}" for f in PROJECTION_FLAGS if back.get(f, defaults[f]) != getattr(c, f)]
    if lost:
        raise UnsupportedArchitectureError(f"{arch.hf_class} has no config for {', '.join(lost)}")
    return hf


PROJECTION_FLAGS = ("attention_bias", "qkv_bias", "qk_norm", "mlp_bias", "sliding_window", "activation",
                    "norm_offset", "embed_scale", "sandwich_norms", "query_pre_attn_scalar", "attn_logit_softcap",
                    "final_logit_softcap", "layer_types", "local_window", "local_rope_theta")


def _first(v):
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v
