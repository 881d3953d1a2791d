#!/usr/bin/env bash
# Installs everything megatron_most needs on a fresh machine (CPU or GPU), idempotently.
#
#   bash scripts/setup.sh            # the versions CI last passed with (constraints.txt)
#   bash scripts/setup.sh --latest   # the newest releases setup.py's ranges allow
#
# setup.py keeps version ranges (users can upgrade); constraints.txt pins the exact set CI
# proved, so a new upstream release cannot turn a fresh install red overnight. Regenerate it
# after a green --latest run with `bash scripts/freeze_constraints.sh`.
# GPU extras (Transformer Engine): pip install -e '.[gpu]' on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."

latest=0
for arg in "$@"; do
    case "$arg" in
        --latest) latest=1 ;;
        *) echo "setup.sh: unknown argument '$arg' (use --latest or nothing)" >&2; exit 2 ;;
    esac
done

# espeak-ng and sox (with mp3) make real speech for the tests and the demo corpus.
bash scripts/install_speech_tools.sh

pip_args=(--quiet --disable-pip-version-check)
if [ "$latest" -eq 1 ]; then
    # Every library at its newest allowed release, except torch: it is the platform (CPU build
    # here, the user's CUDA build on GPU nodes), so the installed or CI-proved build stays.
    keep=$(mktemp); trap 'rm -f "$keep"' EXIT
    python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" 2>/dev/null >"$keep" \
        || grep -i '^torch==' constraints.txt >"$keep"
    python -m pip install "${pip_args[@]}" --upgrade --upgrade-strategy eager -c "$keep" -e '.[dev]'
else
    python -m pip install "${pip_args[@]}" -c constraints.txt -e '.[dev]'
fi
