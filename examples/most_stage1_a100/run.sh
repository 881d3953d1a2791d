#!/usr/bin/env bash
# Stage 1 on 6 nodes x 8 A100s with torchrun: run this on every node with NODE_RANK set
# (0..5) and MASTER_ADDR naming node 0. Extra flags override the YAML.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes 6 --nproc_per_node 8 --node_rank "${NODE_RANK:?set NODE_RANK}" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    tools/pretrain_most.py --config examples/most_stage1_a100/stage1.yaml "$@"
