"""Parameters, training FLOPs and per-GPU memory of a MoST preset at a parallel layout.

Counts the real MoSTModel built on the meta device (no weights are allocated), in one process:

    python tools/estimate.py --preset deepseek_v2_lite_most --tp 2 --pp 2 --ep 4
    python tools/estimate.py --preset tiny --json

Definitions and approximations: megatron_most/model/estimate.py (Estimate).
"""

import argparse
import json
import sys

from megatron_most.model.config import PRESETS, preset
from megatron_most.model.estimate import estimate, format_table
from megatron_most.options import ConfigError
from megatron_most.platform.layout import ParallelLayout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model preset (megatron_most.model.config)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    p.add_argument(
        "--gpus",
        "--world-size",
        dest="gpus",
        type=int,
        default=None,
        help="number of GPUs (default: the smallest that fits, lcm(tp*pp, etp*ep*pp))",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for attention FLOPs (default: the preset's seq_length)",
    )
    p.add_argument("--micro-batch", type=int, default=1, help="micro-batch size (sequences) for FLOPs per micro-batch")
    p.add_argument("--first-stage-layers", type=int, default=None, help="Megatron's num_layers_in_first_pipeline_stage")
    p.add_argument("--last-stage-layers", type=int, default=None, help="Megatron's num_layers_in_last_pipeline_stage")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # MoE with TP needs sequence parallelism in Megatron-Core; SP changes no parameter.
        layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=args.tp > 1)
        result = estimate(
            preset(args.preset),
            layout,
            name=args.preset,
            world_size=args.gpus,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            first_stage_layers=args.first_stage_layers,
            last_stage_layers=args.last_stage_layers,
        )
    except ConfigError as err:
        print(f"estimate.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
