#!/usr/bin/env bash
# Installs everything megatron_most needs on a fresh machine (CPU or GPU), idempotently.
# GPU extras (Transformer Engine): pip install -e '.[gpu]' on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# espeak-ng and sox make real speech for the tests and the demo corpus (Debian/Ubuntu).
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng sox libsox-fmt-all >/dev/null
fi
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
