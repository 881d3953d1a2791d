"""Rank the parallel layouts of a MoST preset on N GPUs: memory per GPU, fit, projected step
time, TFLOP/s per GPU and MFU.

    python tools/plan_layout.py --preset deepseek_v2_lite_most --gpus 48 --gpu a100-80g
    python tools/plan_layout.py --preset deepseek_v2_most --gpus 256 --gpu h100-80g --json plans.json

Model and stated inputs: megatron_most/model/planner.py, model/hardware.py.
"""

import argparse
import sys
from pathlib import Path

from megatron_most.model.config import PRESETS, preset
from megatron_most.model.hardware import GPUS
from megatron_most.model.memory import RECOMPUTE
from megatron_most.model.plan_report import format_table, to_json
from megatron_most.model.planner import plan
from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model preset (megatron_most.model.config)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (whole nodes of 8)")
    p.add_argument("--gpu", required=True, help=f"GPU kind: {', '.join(sorted(GPUS))}")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: 8 x GPUs)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch size (default: try 1, 2, 4)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"), help="GEMM precision")
    p.add_argument("--recompute", nargs="+", default=list(RECOMPUTE), choices=RECOMPUTE, help="recompute choices")
    p.add_argument(
        "--placement",
        default=None,
        choices=("balanced", "contiguous", "both"),
        help="expert placement (default: preset's)",
    )
    p.add_argument("--audio-share", type=float, default=0.5, help="share of routed tokens that are audio")
    p.add_argument("--overlap", nargs="*", default=[], choices=("ep", "dp"), help="communication hidden by compute")
    p.add_argument("--top", type=int, default=8, help="rows of the table")
    p.add_argument("--all", action="store_true", help="every plan, not the best schedule per layout")
    p.add_argument("--json", type=Path, default=None, help="write every plan as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    placements = None if args.placement is None else (
        ("balanced", "contiguous") if args.placement == "both" else (args.placement,)
    )  # fmt: skip
    try:
        plans = plan(
            preset(args.preset),
            args.gpus,
            args.gpu,
            args.seq,
            args.global_batch,
            args.micro_batch,
            name=args.preset,
            precision=args.precision,
            recompute=tuple(args.recompute),
            placements=placements,
            audio_share=args.audio_share,
            overlap=tuple(args.overlap),
        )
    except ConfigError as err:
        print(f"plan_layout.py: error: {err}", file=sys.stderr)
        return 2
    print(format_table(plans, args.top, distinct=not args.all))
    if args.json:
        args.json.write_text(to_json(plans))
        print(f"\n{len(plans)} plans written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
