"""What this machine's backend runs fast: the compute dtype `auto` resolves to.

TPUs and GPUs run bf16 dot products with float32 accumulation at several times their float32 rate, and so do CPUs
with AMX (on a Sapphire Rapids Xeon, 2048^3: ~690 GFLOP/s against ~190 in float32). A CPU with AVX512-BF16 but no
AMX gains less, so there a small probe times both once per process; a CPU with neither keeps float32, as before.
The AMX answer comes from the flags alone: a probe on a busy shared machine can time either side badly.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PROBE_SIZE = 1024
PROBE_MIN_SPEEDUP = 1.3  # bf16 must beat float32 by this much to be chosen (it costs a little accuracy)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is absent, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def best_seconds(fn, *args, repeats: int = 3) -> float:
    """The best wall time of `repeats` calls of a jax function, after one call that compiles and warms it."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _dot_accumulating_in_float32():
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))


def matmul_rate(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one n^3 jax product on the default device, inputs in `dtype`, accumulated in float32 (as the
    model's products are): the ceiling that benchmarks read their figures against."""
    import jax

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    return 2 * n ** 3 / best_seconds(_dot_accumulating_in_float32(), a, a, repeats=repeats)


@functools.cache
def bf16_probe_speedup(rounds: int = 3) -> float:
    """bf16-input over float32 rate of one PROBE_SIZE^3 product on the default device (each side's best, timed in
    turn)."""
    f32 = bf16 = 0.0
    for _ in range(rounds):
        f32 = max(f32, matmul_rate("float32", PROBE_SIZE, repeats=3))
        bf16 = max(bf16, matmul_rate("bfloat16", PROBE_SIZE, repeats=3))
    return bf16 / f32


def auto_compute_dtype(platform: str | None = None, flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype, why) for `compute_dtype: auto` on `platform` (default: jax's default backend)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    if platform in ("tpu", "gpu", "cuda", "rocm"):
        return "bfloat16", f"{platform}: bf16 dot products at several times the float32 rate"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if not found:
        return "float32", f"{platform} without {' or '.join(BF16_CPU_FLAGS)}: float32"
    if "amx_bf16" in flags:
        return "bfloat16", f"{platform} with AMX (amx_bf16): bf16 dot products at several times the float32 rate"
    speedup = bf16_probe_speedup()
    dtype = "bfloat16" if speedup >= PROBE_MIN_SPEEDUP else "float32"
    return dtype, (f"{platform} with {', '.join(found)}: a {PROBE_SIZE}^3 bf16 dot ran {speedup:.1f}x the float32 "
                   f"rate (bf16 needs >= {PROBE_MIN_SPEEDUP}x)")


def resolve_compute_dtype(setting: str | None) -> tuple[str, str]:
    """A `compute_dtype` setting ("auto", "float32", "bfloat16", "float16") as (dtype, why)."""
    if setting in (None, "auto"):
        return auto_compute_dtype()
    return str(setting), "set explicitly"


# XLA's CPU backend sends dot products to YNNPACK by default. For float32 products its Eigen path measured faster
# on our layer shapes on a Sapphire Rapids Xeon (AMX; scripts/bench_forward.py: 0.97-1.07x torch float32 at 4-8 x 512
# with it, 0.81-0.84x without) and slower on an AVX2 AMD EPYC (`--float32-dots both`: 380-443 tok/s against the
# default's 492-524 at 1-8 x 512), and for bf16 inputs several times slower everywhere. So float32 CPU programs get the option only on CPUs of the
# kind where it measured faster (EIGEN_DOTS_CPU_FLAG), where this jaxlib accepts it; bf16 ones never. Decided by
# flags, not timing: a probe on a busy machine flips, and two processes of one run would then compile different
# dots and lose bitwise resume.
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
EIGEN_DOTS_CPU_FLAG = "amx_bf16"


# XLA:CPU runs every bf16 op but a dot in float32 (its pass "float-normalization-bf16"), the dynamic slice that takes
# one layer out of a scanned stack too: the whole stack was converted, the conversion hoisted out of the loop, and a
# bf16 model held a float32 copy of all its layers in each forward, twice its weights (scripts/rehearse_scale.py:
# 7B-shaped layers, 2 GiB of weights, a forward peaked at 5.8 GiB; 2.8 without the pass, the same logits).
BF16_SLICES = {"xla_disable_hlo_passes": "float-normalization-bf16"}

# XLA:CPU's default scheduler (concurrency-optimized) starts every weight conversion a layer needs at the top of the
# scanned layer, so a layer of bf16 weights with float32 products is held in float32 whole (0.89 GiB at qwen2.5-7b),
# and the dynamic slices of bf16 products all at once too; the memory-optimized one converts each just before its
# product: the scoring call's temporaries 906 -> 529 MiB (float32 products) and 447 -> 270 (bf16) at those layer
# shapes (docs/scale.md, Session 32). Its speed was not shown equal (the default run within a few percent, on a
# noisy machine), so the run asks for it only where memory limits it (`schedule_for_memory`).
MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_schedule_for_memory = False


def schedule_for_memory(on: bool) -> None:
    """Whether CPU programs compiled from now on take MEMORY_SCHEDULER (the run: where the weights fill the host,
    `host_memory.weights_fill_host`). Process-wide, as the allocator's setting is."""
    global _schedule_for_memory
    _schedule_for_memory = bool(on)


def schedules_for_memory() -> bool:
    return _schedule_for_memory


@functools.cache
def cpu_options_accepted(option: str, value: str) -> bool:
    """Whether this jaxlib's CPU compiler takes the option (a renamed or unknown one is refused)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((8, 8), jnp.float32)
    try:
        jax.jit(jnp.dot).lower(x, x).compile(compiler_options={option: value})
    except Exception:  # a jaxlib that does not know (or renamed) the option
        return False
    return True


def cpu_options(options: dict, platform: str | None = None) -> dict:
    """`options` for a program compiled for this CPU (`platform`, default: jax's default backend) where this jaxlib
    takes them all; else {}."""
    import jax

    if (platform or jax.default_backend()) != "cpu" or jax.default_backend() != "cpu":
        return {}
    return dict(options) if all(cpu_options_accepted(k, v) for k, v in options.items()) else {}


@functools.cache
def float32_cpu_dot_options(platform: str | None = None) -> dict:
    """EIGEN_DOTS for a program compiled for this CPU (`platform`, default: jax's default backend) when it has
    EIGEN_DOTS_CPU_FLAG and this jaxlib accepts the option; else {} (XLA's default dots)."""
    return cpu_options(EIGEN_DOTS, platform) if EIGEN_DOTS_CPU_FLAG in cpu_flags() else {}


def compiler_options(compute_dtype, platform: str | None = None) -> dict:
    """XLA compiler options for a program whose dot inputs are `compute_dtype`, compiled for `platform` (default:
    this backend; the memory planner compiles for a TPU from a CPU host)."""
    import jax.numpy as jnp

    dots = float32_cpu_dot_options(platform) if jnp.dtype(compute_dtype) == jnp.float32 else {}
    memory = cpu_options(MEMORY_SCHEDULER, platform) if _schedule_for_memory else {}
    return {**cpu_options(BF16_SLICES, platform), **memory, **dots}


def jit_for(compute_dtype, fn, platform: str | None = None, **jit_kwargs):
    """jax.jit(fn) compiled with the options that suit `compute_dtype`'s dot products on `platform` (default: this
    backend)."""
    import jax

    return jax.jit(fn, compiler_options=compiler_options(compute_dtype, platform) or None, **jit_kwargs)


def jit_cache_size(jitted) -> int:
    """Argument signatures a `jax.jit` function has compiled so far (0 where this jax does not say). jax has no public
    count: its jitted functions' `_cache_size` is read here, and only here. The public alternatives count something
    else: jax.monitoring's compile events name the program, not the function, and miss a signature whose program
    was compiled before; counting traces misses a signature compiled again for other shardings."""
    size = getattr(jitted, "_cache_size", None)
    return size() if callable(size) else 0


def jit_by_config(**jit_kwargs):
    """Like functools.partial(jax.jit, **jit_kwargs) for a function whose first argument is a static ModelConfig (or
    a tuple of them, keyed on the first's): each compute dtype gets its own jit with the compiler options that suit
    it. Called inside another jit's trace, it is a plain nested jit (jax takes compiler options on the outermost jit
    only)."""
    def decorate(fn):
        compiled = {}

        def jitted(config, platform: str | None = None):
            """The jitted function a call with `config` runs (compiled for `platform`, default: this backend): the
            memory planner lowers this one."""
            from .models.layers import matmul_dtype

            key = (matmul_dtype(config[0] if isinstance(config, tuple) else config), platform, _schedule_for_memory)
            if key not in compiled:
                compiled[key] = jit_for(key[0], fn, platform, **jit_kwargs)
            return compiled[key]

        @functools.wraps(fn)
        def wrapper(config, *args, **kwargs):
            import jax

            nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
            if nested:
                if None not in compiled:
                    compiled[None] = jax.jit(fn, **jit_kwargs)
                return compiled[None](config, *args, **kwargs)
            return jitted(config)(config, *args, **kwargs)

        wrapper.jitted = jitted
        wrapper.cache_size = lambda: sum(jit_cache_size(f) for f in compiled.values())  # shapes compiled so far
        return wrapper

    return decorate
