"""Flax Llama and OPT decoders with a scanned layer stack, and their shared building blocks."""

from .config import ModelConfig, Segment, from_hf_config, to_hf_config
from .model import Model, forward, hidden_states
from .transformer import abstract_params, apply, init_params, param_axes
