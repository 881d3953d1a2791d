"""Pretrain MoST on Megatron-Core with Megatron-LM's flags (README: "Pretraining").

    torchrun --nproc_per_node 2 tools/pretrain_most.py --config examples/tiny_cpu/stage1.yaml
    torchrun --nnodes 6 --nproc_per_node 8 ... tools/pretrain_most.py --config examples/most_stage1_a100/stage1.yaml

Exit status: 0 when training finished or was stopped by a signal / exit flag (a checkpoint
was saved), 1 when it stopped on persistent non-finite steps, 2 on a bad configuration.
"""

import sys

from megatron_most.data.indexed import DatasetFormatError
from megatron_most.model.checkpoint import CheckpointKeyError
from megatron_most.options import ConfigError
from megatron_most.training.config import parse
from megatron_most.training.loop import pretrain


def main(argv=None) -> int:
    try:
        config = parse(argv)
        return pretrain(config)
    except (ConfigError, DatasetFormatError, CheckpointKeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
