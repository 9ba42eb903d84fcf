#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (it has torch, transformers, accelerate, tokenizers, safetensors,
# pandas, pyarrow, pytest; no network): downloaded here for its Python 3.12 into .devwheels/ (git-ignored),
# which the device tool carries (`carry: [".devwheels"]`) and bench/device_check.sh installs into a
# scratch dir. Never a torch: the image's own CUDA build is the one to measure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .devwheels && mkdir -p .devwheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d .devwheels pydantic pydantic-core annotated-types typing-inspection duckdb trl datasets dill \
  multiprocess xxhash fsspec filelock jinja2 markupsafe
du -sh .devwheels
