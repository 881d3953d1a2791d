#!/usr/bin/env bash
# The one-GPU check: run it once on a node with one NVIDIA GPU (A100/H100/H200, CUDA 12) after
# `bash scripts/setup.sh`. It prints one PASS/FAIL/SKIP line per item and a summary; about
# 2-5 minutes. Items: `bash scripts/gpu_check.sh --list`.
#
#   bash scripts/gpu_check.sh [--install] [--only ITEM[,ITEM]] [--workdir DIR]
#
# --install first installs the GPU extras that are missing (Transformer Engine built for the
# installed torch, NVIDIA DALI); without it, items that need them SKIP and say how to install.
# Exit status: 0 nothing failed, 1 an item failed, 2 no GPU (or bad arguments).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
install=0
args=()
for arg in "$@"; do
    case "$arg" in
        --install) install=1 ;;
        --list) exec "$PY" -m megatron_most.training.gpu_check --list ;;
        *) args+=("$arg") ;;
    esac
done

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no GPU: torch.cuda.is_available() is False on this machine" \
         "(nvidia-smi: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo 'not found'));" \
         "run this script on a node with an NVIDIA GPU and a CUDA build of torch"
    exit 2
fi

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
if [ "$install" -eq 1 ]; then
    # TE's torch extension compiles against the installed torch: no build isolation.
    has transformer_engine.pytorch || timeout 1800 "$PY" -m pip install --no-build-isolation \
        'transformer_engine[pytorch,core_cu12]>=2.9,<2.12' \
        || echo "gpu_check: Transformer Engine did not install (no wheel or no network); TE items will SKIP"
    has nvidia.dali || timeout 600 "$PY" -m pip install nvidia-dali-cuda120 \
        || echo "gpu_check: DALI did not install; the DALI item will SKIP"
fi

timeout 900 "$PY" -m megatron_most.training.gpu_check "${args[@]}"
