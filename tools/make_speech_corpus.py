"""Make a speech+text corpus with espeak-ng (training voices vs held-out voices, a sentencepiece tokenizer).

    python tools/make_speech_corpus.py --out runs/quickstart/corpus --train 4000 --test 150

See megatron_most/data/espeak_corpus.py for what is written. A re-run speaks only missing audio.
"""

import argparse
import json
import sys

from megatron_most.data.espeak_corpus import CorpusOptions, make_corpus
from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=4000, help="training utterances")
    p.add_argument("--test", type=int, default=150, help="utterances per test split (seen / held-out voices)")
    p.add_argument("--text", type=int, default=20000, help="text-only training sentences")
    p.add_argument("--tokenizer-vocab", type=int, default=300, help="sentencepiece pieces (0: no tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="parallel espeak-ng processes")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        opts = CorpusOptions(out=args.out, train=args.train, test=args.test, text=args.text,
                             tokenizer_vocab=args.tokenizer_vocab, seed=args.seed, workers=args.workers)  # fmt: skip
        summary = make_corpus(opts, progress=not args.no_progress)
    except ConfigError as err:
        print(f"make_speech_corpus.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
