#!/usr/bin/env bash
# Train the tiny preset on 2 CPU ranks (gloo) at EP2; extra flags override the YAML.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f data/tiny_cpu/packed/asr.json ] || bash examples/tiny_cpu/prepare_data.sh
torchrun --nproc_per_node 2 tools/pretrain_most.py --config examples/tiny_cpu/stage1.yaml "$@"
