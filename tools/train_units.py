"""Fit the k-means unit codebook on HuBERT features of speech manifests (MoST: layer 11, k=500).

    python tools/train_units.py --input train.jsonl --hubert mhubert-base-25hz --layer 11 --k 500 \\
        --max-hours 100 --output codebook.safetensors

Utterances are shuffled (seeded) and encoded until --max-hours of audio is reached, so a large
corpus costs only the audio the fit uses. Bad manifest lines and unreadable audio are skipped and
counted in the summary (one JSON line on stdout).
"""

import argparse
import collections
import json
import random
import sys
import time

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
    from megatron_most.rejects import Rejected

    if args.max_hours is not None and args.max_hours <= 0:
        raise ConfigError(f"--max-hours={args.max_hours}: must be > 0 (or omitted for all audio)")
    rejects = collections.Counter()
    paths = []
    for manifest in args.input:
        for _, sample in read_manifest(manifest, "speech"):
            if isinstance(sample, Rejected):
                rejects[f"manifest: {sample.reason}"] += 1
            else:
                paths.append(sample.audio)
    random.Random(args.seed).shuffle(paths)  # a max-hours budget then takes a random subset of utterances

    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    loader = AudioLoader(AudioOptions(batch_size=args.audio_batch, device="gpu" if gpu else "cpu"))
    encoder = HubertEncoder(args.hubert, layer=args.layer, device="cuda" if gpu else "cpu",
                            dtype=torch.float16 if gpu else torch.float32)
    budget = None if args.max_hours is None else int(args.max_hours * 3600 * encoder.frame_rate)  # frames
    stats = {"utterances": 0, "frames": 0}

    def features():
        for start in range(0, len(paths), args.audio_batch):
            waves = []
            for wave in loader.load(paths[start:start + args.audio_batch]):
                if isinstance(wave, Rejected):
                    rejects[f"audio: {wave.reason.split(':')[0]}"] += 1  # group by kind, not per file
                else:
                    waves.append(wave)
            for feats in encoder(waves) if waves else []:  # [frames, dim] float16
                if budget is not None:
                    feats = feats[:budget - stats["frames"]]
                stats["utterances"] += 1
                stats["frames"] += len(feats)
                yield feats
                if budget is not None and stats["frames"] >= budget:
                    return

    started = time.time()
    codebook = fit_codebook(features(), k=args.k, seed=args.seed, batch_size=args.batch_size, n_init=args.n_init,
                            max_iter=args.max_iter, layer=args.layer, hubert=args.hubert)
    codebook.save(args.output)
    return {"output": args.output, "k": codebook.k, "dim": codebook.dim, "layer": args.layer,
            "utterances": stats["utterances"], "frames": stats["frames"],
            "hours": round(stats["frames"] / encoder.frame_rate / 3600, 4), "seconds": round(time.time() - started, 2),
            "rejected": dict(rejects)}


if __name__ == "__main__":
    sys.exit(main())
