"""streamline-jax: LLM-Streamline layer pruning in JAX/Flax for Llama, Mistral, Qwen, Gemma and OPT models.

Pipeline, one module per stage: loading → score → pruning → train → evaluation → export (and generation).
The stage functions are exported here: load, score_spans / choose_span, prune, train_replacement, perplexity /
evaluate / model_group / compare, save_orbax_model / export_hf, generate. Each loads with its module on first use,
so that importing a light module (settings, the command line's parser) does not start JAX.
"""

from .lazy_exports import lazy_exports

# public name -> the module that defines it
_HOMES = {
    "models.config": ("ModelConfig", "Segment"),
    "models.model": ("Model", "forward", "hidden_states", "with_compute_dtype"),
    "models.presets": ("PRESETS", "preset"),
    "loading": ("load",),
    "sharding": ("make_mesh",),
    "data": ("batches", "split_chunks", "text_source", "token_chunks"),
    "score": ("SpanChoice", "SpanScores", "choose_layers", "choose_span", "score_spans"),
    "pruning": ("prune", "prune_layers"),
    "train": ("TrainOptions", "train_replacement"),
    "evaluation": ("ModelGroup", "evaluate", "model_group", "perplexity"),
    "retention": ("RetentionReport", "answer_agreement", "compare", "stability"),
    "tasks": ("TASKS", "PerplexityTask", "Task"),
    "export": ("export_hf", "load_orbax_model", "save_orbax_model"),
    "generation": ("Generation", "generate"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOMES, globals())
