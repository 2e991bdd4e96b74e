#!/usr/bin/env bash
# Download bench/requirements.txt as wheels into .whl/ (ignored by git) for a GPU machine that cannot reach
# PyPI.
# There, install them in front of the image's own packages and run the harness, e.g.:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && python3 -m bench clip_retrieval --pad-text-to 77 --json clip.json
# PYTHON_VERSION is the GPU machine's Python (its image has 3.12); BNB_CUDA the CUDA version of its PyTorch
# (2.11.0+cu130 there: 130), the one bitsandbytes library kept of the ~20 its wheel ships.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# bitsandbytes is tagged manylinux_2_24, which pip matches only when named.
grep -v '^\s*#' bench/requirements.txt | grep -v '^\s*$' \
  | xargs "$PY" -m pip download -q --no-deps --only-binary=:all: \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
# The device tool carries at most 64 MiB: rewrite the bitsandbytes wheel without the other CUDA, ROCm and XPU
# libraries (and their RECORD lines).
"$PY" - "${BNB_CUDA:-130}" .whl/bitsandbytes-*.whl <<'PYTHON'
import re, sys, zipfile
cuda, path = sys.argv[1], sys.argv[2]
drop = re.compile(rf"bitsandbytes/libbitsandbytes_(?!cpu\.so$|cuda{cuda}\.so$)\w+\.so$")
with zipfile.ZipFile(path) as src:
    items = [(info, src.read(info)) for info in src.infolist() if not drop.search(info.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                             if not drop.search(line.split(b",")[0].decode()))
        out.writestr(info, data)
PYTHON
ls -1s .whl
