"""The MAMoE ablation at quickstart scale: each variant x seed trained the same, one table and one plot.

    bash scripts/quickstart.sh                       # once: the corpus and packed data it trains on
    python tools/ablation.py --quickstart runs/quickstart --out runs/ablation --seeds 3 --iters 120

Writes OUT/ablation.md (mean ± std over seeds), OUT/ablation.json and OUT/ablation.png; runs already
finished under OUT are reused. See megatron_most/eval/ablation.py for the figures.
"""

import argparse
import sys
from pathlib import Path

from megatron_most.eval.ablation import VARIANTS, ablation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quickstart", default="runs/quickstart", help="a finished quickstart folder (corpus/, packed/)")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iters", type=int, default=120, help="training steps per run")
    p.add_argument("--config", default="examples/quickstart/small.yaml", help="training config")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    args = p.parse_args(argv)
    if not (Path(args.quickstart) / "packed" / "asr.json").is_file():
        print(
            f"ablation.py: {args.quickstart}/packed has no packed data; run bash scripts/quickstart.sh first",
            file=sys.stderr,
        )
        return 2
    ablation(Path(args.quickstart), Path(args.out), seeds=args.seeds, iters=args.iters, variants=args.variants,
             config=args.config)  # fmt: skip
    print(f"wrote {Path(args.out) / 'ablation.md'} and ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
