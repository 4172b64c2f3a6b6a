"""streamline-jax: LLM-Streamline layer pruning for Llama and OPT in JAX/Flax.

Pipeline, one module per stage: load → score → prune → train → evaluate → export (and generate).
"""

from .models.config import ModelConfig, Segment
from .models.model import Model, forward, hidden_states
from .load import load
from .sharding import make_mesh

__all__ = ["Model", "ModelConfig", "Segment", "forward", "hidden_states", "load", "make_mesh"]
