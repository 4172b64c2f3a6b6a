"""transformers' PyTorch models as the reference: build one for a ModelConfig, and copy its weights into ours."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from streamline_jax.loading import params_from_tensors
from streamline_jax.models.config import ModelConfig, to_hf_config

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}


def torch_model(config: ModelConfig, seed: int = 0):
    """A transformers model of `config`'s shape with random weights (float32, eager attention)."""
    hf = to_hf_config(config)
    cfg_cls, model_cls = _CLASSES[hf["model_type"]]
    hf_config = cfg_cls(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    # Non-trivial norms and biases, so that a wrong mapping shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm.weight" in name:
                p.uniform_(0.5, 1.5)
                if config.norm_offset:  # Gemma applies 1 + w
                    p.sub_(config.norm_offset)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model


def params_from_torch(config: ModelConfig, model):
    sd = model.state_dict()
    params = params_from_tensors(config, ((k, lambda v=v: v.detach().numpy()) for k, v in sd.items()))
    return params_to_jax(params)


def params_to_jax(tree):
    if isinstance(tree, dict):
        return {k: params_to_jax(v) for k, v in tree.items()}
    return jnp.asarray(tree)


def torch_forward(model, input_ids, attention_mask=None, positions=None):
    """Logits and hidden states from transformers, with the same positions as ours."""
    ids = torch.tensor(np.asarray(input_ids))
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    kwargs = {}
    if positions is not None and model.config.model_type != "opt":
        kwargs["position_ids"] = torch.tensor(np.asarray(positions))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]
