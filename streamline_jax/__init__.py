"""streamline-jax: LLM-Streamline layer pruning in JAX/Flax for Llama, Mistral, Qwen, Gemma and OPT models.

Pipeline, one module per stage: loading → score → pruning → train → evaluation → export (and generation).
The stage functions are exported here: load, score_spans / choose_span, prune, train_replacement, perplexity /
evaluate / model_group / compare, save_orbax_model / export_hf, generate.
"""

import warnings

# `python -m streamline_jax.data` runs a module this package has imported already; runpy's warning about that does
# not apply (its main only calls data_sources.main), and this filter is in place before runpy checks
warnings.filterwarnings("ignore", r"'streamline_jax\.data' found in sys\.modules", RuntimeWarning)

from .models.config import ModelConfig, Segment
from .models.model import Model, forward, hidden_states, with_compute_dtype
from .models.presets import PRESETS, preset
from .loading import load
from .sharding import make_mesh
from .data import batches, split_chunks, text_source, token_chunks
from .score import SpanChoice, SpanScores, choose_layers, choose_span, score_spans
from .pruning import prune, prune_layers
from .train import TrainOptions, train_replacement
from .evaluation import ModelGroup, evaluate, model_group, perplexity
from .retention import RetentionReport, answer_agreement, compare, stability
from .tasks import TASKS, PerplexityTask, Task
from .export import export_hf, load_orbax_model, save_orbax_model
from .generation import Generation, generate

__all__ = [
    "Model", "ModelConfig", "Segment", "PRESETS", "preset", "forward", "hidden_states", "with_compute_dtype", "load",
    "make_mesh",
    "text_source", "token_chunks", "split_chunks", "batches",
    "score_spans", "choose_span", "choose_layers", "SpanScores", "SpanChoice", "prune", "prune_layers",
    "train_replacement", "TrainOptions", "perplexity", "evaluate", "model_group", "ModelGroup", "compare", "stability",
    "answer_agreement", "RetentionReport", "Task",
    "PerplexityTask", "TASKS", "save_orbax_model", "load_orbax_model", "export_hf", "generate", "Generation",
]
