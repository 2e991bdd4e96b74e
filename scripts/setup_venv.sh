#!/usr/bin/env bash
# Create the virtual environment and install the project's requirements (called by `make setup`).
#
# torch: a plain `pip install torch` pulls a CUDA build of several GB. We install the CPU build where
# no NVIDIA GPU is visible and the default (CUDA) build where one is. A torch that is already
# importable in the environment is kept, so a GPU user can keep their own CUDA build:
#   make setup VENV_FLAGS=--system-site-packages    # reuse the torch of the surrounding Python
set -euo pipefail
venv=${VENV:-.venv}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
torchvision_version=${TORCHVISION_VERSION:-0.28.0}  # the release built for torch 2.13
torch_cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with $($python --version)"
  "$python" -m venv ${VENV_FLAGS:-} "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') already installed: kept"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing torch==$torch_version (CUDA build)"
  "${pip[@]}" "torch==$torch_version" "torchvision==$torchvision_version"
else
  echo "no NVIDIA GPU: installing torch==$torch_version (CPU build)"
  # Where the PyTorch CPU index cannot be reached (an offline mirror, a local wheelhouse in pip's
  # find-links), pip's own configuration must provide the CPU wheel; we skip the index rather than
  # let pip retry it for every package.
  reachable="import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)"
  if "$venv/bin/python" -c "$reachable" "$torch_cpu_index" 2>/dev/null; then
    "${pip[@]}" "torch==$torch_version" "torchvision==$torchvision_version" \
      --extra-index-url "$torch_cpu_index"
  else
    # torchvision on PyPI is a CUDA build that does not load against a CPU torch, so none is installed:
    # the families whose processors need it (Qwen-VL, InternVL, LLaVA-OneVision) are then unavailable.
    echo "  ($torch_cpu_index unreachable: using pip's configured indexes and find-links; no torchvision)"
    "${pip[@]}" "torch==$torch_version"
  fi
fi

constraints=${CONSTRAINTS-constraints.txt}  # empty: the newest versions requirements.txt allows
"${pip[@]}" -r requirements.txt ${constraints:+-c "$constraints"}

if ! java -version >/dev/null 2>&1; then
  cat >&2 <<'MSG'
warning: no Java runtime found. pycocoevalcap's PTB tokenizer and METEOR need one (CIDEr/BLEU/ROUGE/METEOR
in `python -m eval caption`). Install it with:
  Debian/Ubuntu: sudo apt-get install -y default-jre-headless
  macOS:         brew install openjdk
MSG
fi

# The repo itself, editable: `import recipes.<recipe>.collator`, `data_tools`, `eval` work from any folder.
"${pip[@]}" --no-deps -e .
