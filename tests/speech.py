"""Test fixtures for the audio-text data path: real speech from espeak-ng, small random HuBERT, tokenizers.

Everything is generated locally (no downloads): espeak-ng speaks sentences, sox converts them to
the usual containers at several sample rates and channel counts, transformers builds a small
random HubertModel, sentencepiece / tokenizers train tiny tokenizers on the same sentences.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "speech and text share one mixture of experts",
    "a modality aware router sends audio to audio experts",
    "she sells sea shells by the sea shore",
    "pack large audio corpora into indexed binary files",
    "tensor expert and pipeline parallel training",
    "the weather today is cold and windy",
    "please transcribe the following sentence",
    "numbers like seven and twelve are spoken too",
    "hello world this is a small test corpus",
    "an open implementation on megatron core",
    "every good sample is still packed",
]

ROOT = Path(__file__).resolve().parents[1]
_TOOLS_CHECKED = False

FORMATS = (  # (extension, sample rate, channels): the usual containers at rates other than 16 kHz
    ("wav", 16000, 1),
    ("flac", 22050, 2),
    ("ogg", 44100, 1),
    ("mp3", 24000, 1),
    ("wav", 8000, 2),
)


def ensure_speech_tools() -> None:
    """espeak-ng and sox able to write mp3, installed by the project's one script if missing."""
    global _TOOLS_CHECKED
    if not _TOOLS_CHECKED:
        subprocess.run(["bash", str(ROOT / "scripts" / "install_speech_tools.sh")], check=True)
        _TOOLS_CHECKED = True


def speak(text: str, path: Path, *, rate: int = 16000, channels: int = 1, speed: int = 175, voice: str = "en") -> Path:
    """Speak `text` with espeak-ng and write it to `path` (container from the suffix) at rate/channels."""
    ensure_speech_tools()
    path = Path(path)
    raw = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(
        ["sox", str(raw), "-r", str(rate), "-c", str(channels), str(path)], check=True, stderr=subprocess.DEVNULL
    )
    raw.unlink()
    return path


def make_corpus(directory: Path, n: int = 10, *, seed: int = 0, formats=FORMATS) -> Path:
    """Write n spoken sentences (cycling through `formats`) and a JSONL manifest; return the manifest.

    Manifest lines: {"id", "audio" (absolute path), "text", "speaker"}.
    """
    directory = Path(directory)
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    manifest = directory / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i in range(n):
            text = SENTENCES[i % len(SENTENCES)] if i < len(SENTENCES) else " ".join(rng.sample(SENTENCES, 2))
            ext, rate, channels = formats[i % len(formats)]
            voice = ("en", "en-us")[i % 2]
            path = speak(text, directory / "audio" / f"utt{i:04d}.{ext}", rate=rate, channels=channels, voice=voice)
            f.write(json.dumps({"id": f"utt{i:04d}", "audio": str(path), "text": text, "speaker": voice}) + "\n")
    return manifest


def make_text_corpus(path: Path, n: int = 20, *, seed: int = 0) -> Path:
    """A text-only JSONL corpus ({"id", "text"})."""
    rng = random.Random(seed)
    with Path(path).open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"txt{i:04d}", "text": " ".join(rng.sample(SENTENCES, 3))}) + "\n")
    return Path(path)


def tiny_hubert(directory: Path, *, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """Save a small random transformers HubertModel (real conv front end: 320x downsampling, 16 kHz)."""
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    config = HubertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        conv_dim=(32, 32, 32, 32, 32, 32, 32),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=False,
        feat_extract_norm="group",
    )
    HubertModel(config).eval().save_pretrained(directory)
    return Path(directory)


def sentencepiece_model(directory: Path, *, vocab_size: int = 120) -> Path:
    """Train a tiny sentencepiece model on the corpus sentences; return the .model path."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "sp_train.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(directory / "sp"),
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return directory / "sp.model"


def hf_tokenizer(directory: Path, *, vocab_size: int = 150) -> Path:
    """Train a tiny byte-level BPE and save it as a Hugging Face tokenizer directory with <bos>/<eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return Path(directory)


def main(argv=None) -> int:
    """`python -m tests.speech corpus OUT [--utterances N] [--hubert-dim D]`: the fixtures as files
    for examples/tiny_cpu/prepare_data.sh: OUT/speech.jsonl (+ audio/), OUT/text.jsonl,
    OUT/sp.model (sentencepiece) and OUT/hubert (small random HubertModel of width D)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("command", choices=["corpus"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--utterances", type=int, default=100)
    parser.add_argument("--hubert-dim", type=int, default=32)
    args = parser.parse_args(argv)
    out = args.out.resolve()  # manifests hold absolute audio paths
    out.mkdir(parents=True, exist_ok=True)
    make_corpus(out, args.utterances).rename(out / "speech.jsonl")
    make_text_corpus(out / "text.jsonl", n=4 * args.utterances)
    sentencepiece_model(out).rename(out / "sp.model")
    tiny_hubert(out / "hubert", hidden=args.hubert_dim)
    print(f"wrote {out}: speech.jsonl ({args.utterances} utterances), text.jsonl, sp.model, hubert/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
