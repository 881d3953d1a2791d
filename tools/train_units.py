"""Fit the k-means unit codebook on HuBERT features of speech manifests (MoST: layer 11, k=500).

    python tools/train_units.py --input train.jsonl --hubert mhubert-base-25hz --layer 11 --k 500 \\
        --max-hours 100 --output codebook.safetensors

Utterances are shuffled (seeded) and encoded until --max-hours of audio is reached, so a large
corpus costs only the audio the fit uses. Bad manifest lines and unreadable audio are skipped and
counted in the summary (one JSON line on stdout).

--max-frames (default 2,000,000: ~11 h at 50 Hz, 2e6 x 768 fp32 = 6 GB for mHuBERT-base) bounds the
k-means memory: a seeded uniform reservoir sample of that many frames is kept from all encoded audio.
HuBERT runs in fp32 (also on a GPU), like tools/preprocess_audio_text.py, so the codebook is fitted
on the same features the units are later assigned from.
"""

import argparse
import json
import sys

from megatron_most.audio.encoder import add_encoder_argument
from megatron_most.audio.logmel import is_logmel
from megatron_most.data.unit_training import UnitTrainingOptions, train_units
from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, metavar="MANIFEST", help="speech JSONL manifests")
    add_encoder_argument(p, required=True)
    p.add_argument(
        "--layer", type=int, default=None, help="hidden_states index to cluster (default: 11, MoST's; logmel: 0)"
    )
    p.add_argument("--k", type=int, default=500, help="number of units (centroids)")
    p.add_argument("--max-hours", type=float, default=None, help="audio used for the fit (default: all)")
    p.add_argument("--seed", type=int, default=0, help="utterance shuffle and k-means seed")
    p.add_argument("--batch-size", type=int, default=10000, help="MiniBatchKMeans batch size (frames)")
    p.add_argument(
        "--max-frames",
        type=int,
        default=2_000_000,
        help="frames kept for the fit (seeded reservoir sample; bounds memory; default 2,000,000)",
    )
    p.add_argument("--n-init", type=int, default=20, help="k-means++ initialisations (best inertia kept)")
    p.add_argument("--max-iter", type=int, default=100, help="MiniBatchKMeans passes over the frames")
    p.add_argument("--audio-batch", type=int, default=32, help="utterances per audio decode / HuBERT batch")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"), help="HuBERT and DALI device")
    p.add_argument("--output", required=True, help="codebook file (.safetensors)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = train_units(
            UnitTrainingOptions(
                inputs=tuple(args.input),
                hubert=args.hubert,
                output=args.output,
                layer=args.layer if args.layer is not None else 0 if is_logmel(args.hubert) else 11,
                k=args.k,
                max_hours=args.max_hours,
                seed=args.seed,
                batch_size=args.batch_size,
                max_frames=args.max_frames,
                n_init=args.n_init,
                max_iter=args.max_iter,
                audio_batch=args.audio_batch,
                device=args.device,
            )
        )
    except ConfigError as err:
        print(f"train_units.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
