"""streamline-jax: LLM-Streamline layer pruning for Llama and OPT in JAX/Flax.

Pipeline, one module per stage: load → score → prune → train → evaluate → export (and generate).
"""

from .models.config import ModelConfig, Segment
from .models.model import Model, forward, hidden_states
from .load import load
from .sharding import make_mesh
from .data import batches, split_chunks, text_source, token_chunks
from .score import SpanChoice, SpanScores, choose_layers, choose_span, score_spans
from .train import train_replacement

__all__ = [
    "Model", "ModelConfig", "Segment", "forward", "hidden_states", "load", "make_mesh",
    "text_source", "token_chunks", "split_chunks", "batches",
    "score_spans", "choose_span", "choose_layers", "SpanScores", "SpanChoice", "train_replacement",
]
