"""Write the quickstart's report (OUT/report.md, loss curves and routing heatmap PNGs); print its last line.

python tools/quickstart_report.py --out runs/quickstart --minutes 18
"""

import argparse
import sys
from pathlib import Path

from megatron_most.eval.quickstart import write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the quickstart's output folder")
    p.add_argument("--minutes", type=float, required=True, help="how long the whole command took")
    args = p.parse_args(argv)
    _, line = write_report(Path(args.out), args.minutes)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
