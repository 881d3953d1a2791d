"""Parallel self-check for this machine or cluster: a tiny Megatron MoE GPT at the given layout
must match a single-rank run. Prints one line, PASS or FAIL, with the max differences.

    torchrun --nproc_per_node 4 tools/selfcheck.py --tp 2 --pp 2 --ep 2 --etp 1
"""

import sys

from megatron_most.training.selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
