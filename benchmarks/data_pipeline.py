"""Audio-text data pipeline throughput: packing speed, time outside HuBERT, training-read speed.

1. Generates an espeak-ng corpus (wav/flac/ogg/mp3 at 8..44.1 kHz, tests/speech.make_corpus).
2. Packs it in units mode with tools/preprocess_audio_text.py's pipeline (megatron_most.data.preprocess):
   a HuBERT with the real mHuBERT-base shape (12 layers, hidden 768, conv front end 512 channels;
   random weights from transformers' HubertConfig defaults) unless --hubert DIR gives a real one, a
   random 500-centroid codebook (throughput does not depend on the centroid values), a small
   sentencepiece tokenizer.
3. Reads the packed dataset through megatron_most.data.dataset.AudioTextDataset (built by
   BlendedMegatronDatasetBuilder, seq 2048, default settings: no dense
   attention mask, MoSTModel derives the block-diagonal mask from the reset position ids) at random indices, one thread.

Reported: audio hours packed per wall-clock minute (whole run: model loading, decoding, HuBERT,
units, rendering, writing, merging); the share of that wall time not spent inside the HuBERT
forward calls (summed over workers, divided by workers x wall; target <= 15%); training items
(packed sequences) read per second (target >= 5000).

    python -m benchmarks.data_pipeline [--utterances 200] [--hubert DIR] [--workers 1] [--device cpu]

from the repository root (the corpus comes from tests/speech.py; megatron_most is the installed package).

The last line printed is `pack: X audio-h/min, non-model share Y%, read Z samples/s`.
Measured here (2 CPU cores shared with other jobs, random mHuBERT-base shape, 200 utterances =
16.1 audio minutes, workers 1): `pack: 0.064 audio-h/min, non-model share 1.6%, read 9990 samples/s`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import HubertConfig, HubertModel

from megatron_most.audio.units import UnitCodebook
from megatron_most.data.blend import build_datasets
from megatron_most.data.dataset import AudioTextDatasetConfig
from megatron_most.data.preprocess import preprocess
from megatron_most.data.preprocess_plan import PreprocessOptions
from tests import speech

warnings.filterwarnings("ignore")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utterances", type=int, default=200, help="espeak-ng utterances in the corpus")
    p.add_argument("--hubert", default=None, help="a real HubertModel directory (default: random mHuBERT-base shape)")
    p.add_argument("--workers", type=int, default=1, help="preprocessing worker processes")
    p.add_argument("--shard-size", type=int, default=1000, help="manifest lines per shard")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"), help="resampling + HuBERT device")
    p.add_argument("--seq-length", type=int, default=2048, help="training sequence length for the read test")
    p.add_argument("--reads", type=int, default=20000, help="random item reads")
    p.add_argument("--workdir", default=None, help="keep corpus and outputs here (default: a temp dir)")
    return p.parse_args(argv)


def make_inputs(work: Path, args) -> dict:
    manifest = work / "corpus" / "manifest.jsonl"
    if not manifest.exists() or sum(1 for _ in manifest.open()) != args.utterances:
        start = time.perf_counter()
        speech.make_corpus(work / "corpus", args.utterances)
        print(f"corpus: {args.utterances} utterances in {time.perf_counter() - start:.0f} s", flush=True)
    hubert = args.hubert
    if hubert is None:
        hubert = work / "hubert_base_random"
        if not (hubert / "config.json").exists():
            torch.manual_seed(0)
            HubertModel(HubertConfig()).eval().save_pretrained(hubert)  # defaults = HuBERT base shape
    dim = HubertConfig.from_pretrained(str(hubert)).hidden_size
    codebook = work / f"codebook_{dim}.safetensors"
    if not codebook.exists():
        torch.manual_seed(0)
        UnitCodebook(torch.randn(500, dim), layer=None).save(codebook)
    return dict(
        manifest=manifest,
        hubert=str(hubert),
        codebook=str(codebook),
        tokenizer=str(speech.sentencepiece_model(work / "sp")),
    )


def pack(work: Path, inputs: dict, args) -> dict:
    opts = PreprocessOptions(
        inputs=(str(inputs["manifest"]),),
        task="asr",
        output_prefix=str(work / "out" / "asr"),
        tokenizer=inputs["tokenizer"],
        hubert=inputs["hubert"],
        units=inputs["codebook"],
        workers=args.workers,
        shard_size=args.shard_size,
        device=args.device,
        overwrite=True,
        progress=False,
    )
    start = time.perf_counter()
    header = preprocess(opts)
    header["total_seconds"] = time.perf_counter() - start  # including planning (tokenizer, hashes)
    return header


def read_speed(prefix: str, header: dict, args) -> tuple[float, int]:
    torch.set_num_threads(1)
    config = AudioTextDatasetConfig(
        random_seed=1234,
        sequence_length=args.seq_length,
        blend=([prefix], None),
        split="100,0,0",
        text_vocab_size=header["text_vocab_size"],
        num_units=header["num_units"],
    )
    train, _, _ = build_datasets(config, [None, None, None])
    order = np.random.default_rng(0).integers(0, len(train), args.reads)
    for i in order[:100]:  # warm the page cache and lazy state
        train[int(i)]
    start = time.perf_counter()
    for i in order:
        train[int(i)]
    return args.reads / (time.perf_counter() - start), len(train)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = make_inputs(work, args)
        header = pack(work, inputs, args)
        hours = header["audio_seconds"] / 3600
        wall = header["total_seconds"]
        non_model = 1.0 - header["model_seconds"] / (wall * args.workers)
        reads, items = read_speed(str(work / "out" / "asr"), header, args)
        print(
            json.dumps(
                {
                    k: header[k]
                    for k in (
                        "samples",
                        "tokens",
                        "audio_seconds",
                        "rejected",
                        "model_seconds",
                        "wall_seconds",
                        "total_seconds",
                    )
                }
            )
        )
        print(
            f"HuBERT {inputs['hubert']}; {header['samples']} samples, {hours * 60:.1f} audio min packed in "
            f"{wall:.1f} s ({header['model_seconds']:.1f} s in HuBERT forward); {items} training items of "
            f"{args.seq_length} tokens"
        )
        print(
            f"pack: {hours / (wall / 60):.3f} audio-h/min, non-model share {100 * non_model:.1f}%, "
            f"read {reads:.0f} samples/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
