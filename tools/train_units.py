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
import collections
import json
import random
import sys
import time
from pathlib import Path

from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, metavar="MANIFEST", help="speech JSONL manifests")
    p.add_argument("--hubert", required=True, help="transformers HubertModel directory")
    p.add_argument("--layer", type=int, default=11, help="hidden_states index to cluster (MoST: 11)")
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
        summary = train(args)
    except ConfigError as err:
        print(f"train_units.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def train(args) -> dict:
    import torch

    from megatron_most.audio.hubert import HubertEncoder
    from megatron_most.audio.loading import AudioLoader, AudioOptions
    from megatron_most.audio.units import fit_codebook
    from megatron_most.data.manifest import read_manifest
    from megatron_most.platform import choose_device
    from megatron_most.rejects import Rejected

    if args.max_hours is not None and args.max_hours <= 0:
        raise ConfigError(f"--max-hours={args.max_hours}: must be > 0 (or omitted for all audio)")
    if args.max_frames < args.k:
        raise ConfigError(
            f"--max-frames={args.max_frames}: must be >= --k={args.k} (k-means needs a frame per "
            "centroid); e.g. 2000000"
        )
    if not (Path(args.hubert) / "config.json").is_file():
        raise ConfigError(
            f"--hubert={args.hubert!r}: no config.json there; pass a transformers HubertModel "
            "directory (save_pretrained output)"
        )
    device = choose_device(args.device, field="--device")
    rejects = collections.Counter()
    paths = []
    for manifest in args.input:
        for _, sample in read_manifest(manifest, "speech"):
            if isinstance(sample, Rejected):
                rejects[f"manifest: {sample.reason}"] += 1
            else:
                paths.append(sample.audio)
    random.Random(args.seed).shuffle(paths)  # a max-hours budget then takes a random subset of utterances

    # fp32 as in preprocessing: units are assigned on fp32-computed features, so fit on those too
    encoder = HubertEncoder(args.hubert, layer=args.layer, device=device, dtype=torch.float32)
    # reject clips shorter than the encoder's receptive field per file; the encoder would fail the batch
    loader = AudioLoader(
        AudioOptions(batch_size=args.audio_batch, device=args.device, min_samples=max(400, encoder.min_samples))
    )
    budget = None if args.max_hours is None else int(args.max_hours * 3600 * encoder.frame_rate)  # frames
    stats = {"utterances": 0, "frames": 0}

    def features():
        for start in range(0, len(paths), args.audio_batch):
            waves = []
            for wave in loader.load(paths[start : start + args.audio_batch]):
                if isinstance(wave, Rejected):
                    rejects[f"audio: {wave.reason.split(':')[0]}"] += 1  # group by kind, not per file
                else:
                    waves.append(wave)
            for feats in encoder(waves) if waves else []:  # [frames, dim] float16
                if budget is not None:
                    feats = feats[: budget - stats["frames"]]
                stats["utterances"] += 1
                stats["frames"] += len(feats)
                yield feats
                if budget is not None and stats["frames"] >= budget:
                    return

    started = time.time()
    codebook = fit_codebook(
        features(),
        k=args.k,
        seed=args.seed,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        n_init=args.n_init,
        max_iter=args.max_iter,
        layer=args.layer,
        hubert=args.hubert,
    )
    codebook.save(args.output)
    return {
        "output": args.output,
        "k": codebook.k,
        "dim": codebook.dim,
        "layer": args.layer,
        "utterances": stats["utterances"],
        "frames": stats["frames"],
        "fit_frames": min(stats["frames"], args.max_frames),
        "hours": round(stats["frames"] / encoder.frame_rate / 3600, 4),
        "seconds": round(time.time() - started, 2),
        "rejected": dict(rejects),
    }


if __name__ == "__main__":
    sys.exit(main())
