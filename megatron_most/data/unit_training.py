"""Fit the k-means unit codebook on HuBERT features of speech manifests (tools/train_units.py).

Utterances are shuffled (seeded) and encoded until `max_hours` of audio is reached, so a large
corpus costs only the audio the fit uses. Bad manifest lines and unreadable audio are skipped and
counted in the summary. `max_frames` bounds the k-means memory (a seeded uniform reservoir sample of
that many frames is kept, fit_codebook). HuBERT runs in fp32 (also on a GPU), like preprocessing, so
the codebook is fitted on the same features the units are later assigned from.

Messages name the tool's flags (--max-hours, --k, ...): the tool is this module's command line.
"""

from __future__ import annotations

import collections
import random
import time
from pathlib import Path

import torch

from megatron_most.audio.encoder import load_encoder
from megatron_most.audio.loading import AudioLoader, AudioOptions
from megatron_most.audio.logmel import is_logmel
from megatron_most.audio.units import fit_codebook
from megatron_most.data.manifest import read_manifest
from megatron_most.options import ConfigError, options
from megatron_most.platform import choose_device
from megatron_most.rejects import Rejected


@options
class UnitTrainingOptions:
    inputs: tuple[str, ...]
    """Speech JSONL manifests."""
    hubert: str
    """Audio encoder: a transformers HubertModel directory or "logmel" (audio/logmel.py)."""
    output: str
    """Codebook file (.safetensors)."""
    layer: int | None = 11
    """hidden_states index to cluster (MoST: 11); the logmel encoder has only 0 (None means 0)."""
    k: int = 500
    """Number of units (centroids)."""
    max_hours: float | None = None
    """Audio used for the fit (None: all)."""
    seed: int = 0
    """Utterance shuffle and k-means seed."""
    batch_size: int = 10000
    """MiniBatchKMeans batch size (frames)."""
    max_frames: int = 2_000_000
    """Frames kept for the fit (seeded reservoir sample; ~11 h at 50 Hz, 6 GB for mHuBERT-base)."""
    n_init: int = 20
    """k-means++ initialisations (best inertia kept)."""
    max_iter: int = 100
    """MiniBatchKMeans passes over the frames."""
    audio_batch: int = 32
    """Utterances per audio decode / HuBERT batch."""
    device: str = "auto"
    """auto | cpu | gpu: HuBERT and DALI device."""

    def __post_init__(self):
        if self.max_hours is not None and self.max_hours <= 0:
            raise ConfigError(f"--max-hours={self.max_hours}: must be > 0 (or omitted for all audio)")
        if self.max_frames < self.k:
            raise ConfigError(
                f"--max-frames={self.max_frames}: must be >= --k={self.k} (k-means needs a frame per "
                "centroid); e.g. 2000000"
            )
        if not is_logmel(self.hubert) and not (Path(self.hubert) / "config.json").is_file():
            raise ConfigError(
                f"--hubert={self.hubert!r}: no config.json there; pass a transformers HubertModel "
                "directory (save_pretrained output) or 'logmel'"
            )


def train_units(opts: UnitTrainingOptions) -> dict:
    """Fit the codebook, save it to `opts.output`; return the run's summary (counts, hours, rejects)."""
    device = choose_device(opts.device, field="--device")
    rejects = collections.Counter()
    paths = _audio_paths(opts, rejects)

    # fp32 as in preprocessing: units are assigned on fp32-computed features, so fit on those too
    encoder = load_encoder(opts.hubert, layer=opts.layer, device=device, dtype=torch.float32)
    # reject clips shorter than the encoder's receptive field per file; the encoder would fail the batch
    loader = AudioLoader(
        AudioOptions(batch_size=opts.audio_batch, device=opts.device, min_samples=max(400, encoder.min_samples))
    )
    budget = None if opts.max_hours is None else int(opts.max_hours * 3600 * encoder.frame_rate)  # frames
    stats = {"utterances": 0, "frames": 0}

    def features():
        for start in range(0, len(paths), opts.audio_batch):
            waves = []
            for wave in loader.load(paths[start : start + opts.audio_batch]):
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
        k=opts.k,
        seed=opts.seed,
        batch_size=opts.batch_size,
        max_frames=opts.max_frames,
        n_init=opts.n_init,
        max_iter=opts.max_iter,
        layer=opts.layer,
        hubert=opts.hubert,
    )
    codebook.save(opts.output)
    return {
        "output": opts.output,
        "k": codebook.k,
        "dim": codebook.dim,
        "layer": opts.layer,
        "utterances": stats["utterances"],
        "frames": stats["frames"],
        "fit_frames": min(stats["frames"], opts.max_frames),
        "hours": round(stats["frames"] / encoder.frame_rate / 3600, 4),
        "seconds": round(time.time() - started, 2),
        "rejected": dict(rejects),
    }


def _audio_paths(opts: UnitTrainingOptions, rejects: collections.Counter) -> list[str]:
    """The manifests' audio files, shuffled (seeded); bad lines are counted in `rejects`."""
    paths = []
    for manifest in opts.inputs:
        for _, sample in read_manifest(manifest, "speech"):
            if isinstance(sample, Rejected):
                rejects[f"manifest: {sample.reason}"] += 1
            else:
                paths.append(sample.audio)
    random.Random(opts.seed).shuffle(paths)  # a max-hours budget then takes a random subset of utterances
    return paths
