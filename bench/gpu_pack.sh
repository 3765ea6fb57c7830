#!/usr/bin/env bash
# Pack what `python -m bench gpu` needs on a lent GPU machine with no network into one folder to carry:
#   bash bench/gpu_pack.sh [DIR]      # default .gpu-carry (add it to .git/info/exclude; carry it with the device tool)
# DIR/assets.tar.xz: .gpu-assets/ (configs, tokenizers, SST-2 and E2E files; Gemma 3's 33 MB tokenizer.json packs to
# a few MB, which keeps the working tree that travels under its 64 MiB), DIR/wheels/: the packages the 2026-11 GPU
# image lacks, for its Python 3.12. There, before `python3 -m bench gpu ...`:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/pydeps DIR/wheels/*.whl
#   tar xJf DIR/assets.tar.xz && export PYTHONPATH=/tmp/pydeps:$PWD/src:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu-carry}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out/wheels"
"$py" -m bench gpu _assets
tar cJf "$out/assets.tar.xz" .gpu-assets
rm -rf .gpu-assets
pip_dl=("$py" -m pip download -q --no-deps -d "$out/wheels" --python-version 3.12 --only-binary=:all:
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any)
"${pip_dl[@]}" optuna alembic colorlog mako sqlalchemy nltk plotly gguf
"$py" -m pip wheel -q --no-deps -w "$out/wheels" rouge_score==0.1.2  # sdist only on PyPI: built here, pure Python
du -sh "$out"
