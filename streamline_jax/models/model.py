"""`Model`: config + parameters + tokenizer (+ mesh), and the public forward functions."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..backend import jit_by_config
from ..sharding import place_batch
from . import transformer
from .config import ModelConfig


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: Any
    tokenizer: Any = None
    mesh: Any = None  # a jax.sharding.Mesh when the parameters are sharded

    @property
    def num_params(self) -> int:
        return transformer.count_params(self.params)

    @property
    def weight_bytes(self) -> int:
        """The parameters' bytes in the config's dtype."""
        return self.num_params * jnp.dtype(self.config.dtype).itemsize

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def with_compute_dtype(model: Model, compute_dtype: str | None) -> Model:
    """The same model whose dot products take `compute_dtype` inputs (accumulating in float32); "auto": bfloat16
    where this backend runs it fast (`streamline_jax.backend`), else float32; None: the weights' dtype. The weights
    themselves are not cast."""
    if compute_dtype == "auto":
        from ..backend import auto_compute_dtype

        compute_dtype = auto_compute_dtype()[0]
    if compute_dtype is not None and str(compute_dtype) not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    compute_dtype = None if compute_dtype is None else str(compute_dtype)
    return model.replace(config=model.config.replace(compute_dtype=compute_dtype))


@jit_by_config(static_argnames=("config", "collect_hidden", "return_logits"))
def _jit_apply(config, params, input_ids, attention_mask, *, collect_hidden, return_logits):
    out = transformer.apply(config, params, input_ids, attention_mask, collect_hidden=collect_hidden,
                            return_logits=return_logits)
    return out.get("logits"), out.get("hidden")


def prepare_inputs(model: Model, input_ids, attention_mask=None):
    """(input_ids, attention_mask) as [B, T] int32 device arrays placed on the model's mesh ([T] ids: one row; no
    mask: every token real)."""
    input_ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(np.asarray(attention_mask), jnp.int32).reshape(input_ids.shape)
    return place_batch(model.mesh, (input_ids, attention_mask))


def forward(model: Model, input_ids, attention_mask=None):
    """Logits [B, T, V] in float32."""
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    logits, _ = _jit_apply(model.config, model.params, ids, mask, collect_hidden=False, return_logits=True)
    return logits


def hidden_states(model: Model, input_ids, attention_mask=None):
    """All L+1 hidden states [L+1, B, T, D]: h[0] the embeddings, h[i] the input of layer i, h[L] the output of the
    last layer *before* the final norm (transformers' `output_hidden_states` applies the final norm to its last entry).
    A replacement block counts as one layer."""
    return stack_hidden(model.config, model.params, *prepare_inputs(model, input_ids, attention_mask))


def stack_hidden(config, params, input_ids, attention_mask):
    """`hidden_states` of prepared inputs (`prepare_inputs`), jitted: every layer's input h[0..L], without the
    head."""
    return _jit_apply(config, params, input_ids, attention_mask, collect_hidden=True, return_logits=False)[1]
