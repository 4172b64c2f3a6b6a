"""`compute_dtype: auto`: bf16 where the backend has fast bf16 dot products, float32 elsewhere."""

from __future__ import annotations

import pytest

from streamline_jax import backend
from streamline_jax.models.model import Model, with_compute_dtype


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx512f amx_bf16 avx512_bf16\n")
    assert {"amx_bf16", "avx512_bf16", "sse2"} <= backend.cpu_flags(info)
    assert backend.cpu_flags(tmp_path / "missing") == set()


def test_auto_compute_dtype(monkeypatch):
    assert backend.auto_compute_dtype("tpu")[0] == "bfloat16"
    assert backend.auto_compute_dtype("gpu")[0] == "bfloat16"

    def no_probe():
        raise AssertionError("a CPU without bf16 units is never probed")

    monkeypatch.setattr(backend, "bf16_probe_speedup", no_probe)
    dtype, why = backend.auto_compute_dtype("cpu", flags={"avx2", "fma"})
    assert dtype == "float32" and "amx_bf16" in why
    dtype, why = backend.auto_compute_dtype("cpu", flags={"amx_bf16", "avx512_bf16"})  # AMX: no probe needed
    assert dtype == "bfloat16" and "AMX" in why
    monkeypatch.setattr(backend, "bf16_probe_speedup", lambda: 3.4)
    dtype, why = backend.auto_compute_dtype("cpu", flags={"avx512_bf16"})
    assert dtype == "bfloat16" and "3.4x" in why
    monkeypatch.setattr(backend, "bf16_probe_speedup", lambda: 1.1)  # AVX512-BF16 without a real gain: float32
    assert backend.auto_compute_dtype("cpu", flags={"avx512_bf16"})[0] == "float32"
    assert backend.resolve_compute_dtype("float32") == ("float32", "set explicitly")


def test_probe_runs_and_returns_a_ratio():
    assert backend.bf16_probe_speedup() > 0


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype='int8' is not one of"):
        with_compute_dtype(Model(config=None, params=None), "int8")


@pytest.mark.parametrize("flags, eigen", [({"avx512f", "amx_bf16"}, True), ({"avx2", "fma"}, False)])
def test_float32_cpu_programs_get_eigen_dots_where_they_measured_faster_and_bf16_ones_never(monkeypatch, flags, eigen):
    """Decided by the CPU's flags and what the jaxlib accepts, never by timing: every process of a run compiles the
    same dots (bitwise resume)."""
    monkeypatch.setattr(backend, "cpu_flags", lambda: flags)
    backend.float32_cpu_dot_options.cache_clear()
    try:
        slices = backend.BF16_SLICES  # every CPU program
        assert backend.compiler_options("float32") == {**slices, **(backend.EIGEN_DOTS if eigen else {})}
        assert backend.compiler_options("bfloat16") == slices
    finally:
        backend.float32_cpu_dot_options.cache_clear()


def test_jit_by_config_counts_the_signatures_it_compiled():
    """`cache_size()`: what evaluation reports as a call's compiles; a new shape or config compiles, a repeat does not."""
    import jax.numpy as jnp

    from streamline_jax.models.config import ModelConfig

    @backend.jit_by_config(static_argnums=0)
    def scaled(config, x):
        return x * config.hidden_size

    config = ModelConfig(family="llama", vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=4)
    assert scaled.cache_size() == 0
    scaled(config, jnp.ones(3))
    scaled(config, jnp.ones(3))
    assert scaled.cache_size() == 1
    scaled(config, jnp.ones(5))
    scaled(config.replace(hidden_size=8, head_dim=8), jnp.ones(5))
    assert scaled.cache_size() == 3
    assert backend.jit_cache_size(lambda x: x) == 0  # not a jitted function: nothing compiled


def test_a_bf16_forward_holds_no_float32_copy_of_its_layers():
    """XLA:CPU's float normalization converted the whole scanned stack of bf16 weights to float32 ahead of the loop
    (twice the weights in every forward); with backend.BF16_SLICES (in every CPU program's options) each layer is
    sliced in bf16: the compiled forward's temporaries stay below the stack's own bf16 size."""
    import jax
    import jax.numpy as jnp

    from streamline_jax.models import transformer
    from streamline_jax.models.config import ModelConfig

    config = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=512,
                         num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, max_position_embeddings=64,
                         dtype="bfloat16", compute_dtype="bfloat16")
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), transformer.abstract_params(config))
    stack = sum(a.nbytes for a in jax.tree.leaves(params["segments"]))
    ids = jnp.zeros((1, 4), jnp.int32)

    def logits(params, ids):
        return transformer.apply(config, params, ids)["logits"]

    compiled = backend.jit_for("bfloat16", logits).lower(params, ids).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < stack


@pytest.mark.parametrize("for_memory", [True, False])
def test_a_float32_products_forward_converts_one_bf16_weight_at_a_time_when_scheduled_for_memory(for_memory):
    """bf16 weights with float32 products: XLA:CPU's default scheduler converts all of a scanned layer's weights at the
    top of the layer, so a forward holds that layer in float32 whole; scheduled for memory (as the run compiles where
    the weights fill the host: backend.schedule_for_memory) each is converted just before its product, and the
    temporaries stay under one layer in float32. Without it the same program holds the whole layer."""
    import jax
    import jax.numpy as jnp

    from streamline_jax.models import transformer
    from streamline_jax.models.config import ModelConfig

    if not backend.cpu_options(backend.MEMORY_SCHEDULER):
        pytest.skip("this jaxlib's CPU compiler does not take the scheduler option")
    config = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=1024,
                         num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, max_position_embeddings=64,
                         dtype="bfloat16", compute_dtype="float32")
    params = transformer.abstract_params(config)
    layer_f32 = sum(a.size * 4 for a in jax.tree.leaves(params["segments"])) // config.num_layers
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)

    def logits(params, ids):
        return transformer.apply(config, params, ids)["logits"]

    backend.schedule_for_memory(for_memory)
    try:
        assert (backend.MEMORY_SCHEDULER.items() <= backend.compiler_options("float32").items()) == for_memory
        compiled = backend.jit_for("float32", logits).lower(params, ids).compile()
    finally:
        backend.schedule_for_memory(False)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert (temp < 0.75 * layer_f32) == for_memory, (temp, layer_f32)  # 0.59 and 1.02 of a layer here
