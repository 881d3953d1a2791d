#!/usr/bin/env bash
# Installs everything megatron_most needs on a fresh machine (CPU or GPU), idempotently.
# GPU extras (Transformer Engine, DALI for CUDA): pip install -e '.[gpu]' on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
