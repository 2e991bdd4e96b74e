#!/usr/bin/env bash
# Download bench/requirements.txt as wheels into .whl/ (ignored by git) for a GPU machine that cannot reach PyPI.
# There, install them in front of the image's own packages and run the harness, e.g.:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && python3 -m bench clip_retrieval --pad-text-to 77 --json clip.json
# PYTHON_VERSION is the GPU machine's Python (its image has 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
grep -v '^\s*#' bench/requirements.txt | grep -v '^\s*$' | xargs "$PY" -m pip download -q --no-deps --only-binary=:all: \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
ls -1 .whl
