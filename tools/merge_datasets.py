"""Concatenate MoST audio-text datasets packed with the same tokenizer, token layout, mode and
feature extractor/codebook into one (samples in input order; the header's task becomes a list).

    python tools/merge_datasets.py --input data/asr_part1 data/asr_part2 --output data/asr
"""

import argparse
import sys

from megatron_most.data.indexed import DatasetFormatError, merge_datasets
from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX", help="dataset prefixes, merged in order")
    p.add_argument("--output", required=True, metavar="PREFIX", help="output prefix")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        header = merge_datasets(args.input, args.output, overwrite=args.overwrite)
    except (ConfigError, DatasetFormatError) as err:
        print(f"merge_datasets.py: error: {err}", file=sys.stderr)
        return 2
    print(
        f"merged {len(args.input)} datasets into {args.output}: {header['samples']} samples, "
        f"{header['tokens']} tokens, {header['audio_seconds'] / 3600:.3f} audio hours, tasks {header['task']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
