#!/usr/bin/env bash
# The paper's ablation table (MAMoE vs VanillaMoE vs NoShared, and the masking / balance-loss options)
# at quickstart scale: 3 seeds per variant on the quickstart corpus; table and plot in runs/ablation/.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f runs/quickstart/packed/asr.json ] || bash scripts/quickstart.sh
python tools/ablation.py --quickstart runs/quickstart --out runs/ablation --seeds 3 --iters "${ABLATION_ITERS:-120}" "$@"
