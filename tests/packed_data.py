"""Synthetic packed audio-text datasets in the tiny preset's token layout, written with the
real writer (AudioTextWriter): ASR with continuous features, TTS with units, and text. The
samples are returned too, as ground truth for the dataset tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_most.data.indexed import AudioTextWriter
from megatron_most.model.vocab import TokenLayout

T, K, DIM, SEQ = 256, 32, 16, 64  # the layout of model.config.tiny()
LAYOUT = TokenLayout(T, K)
BOS, EOS = 1, 2


def _asr(rng):
    """<bos> prompt (<boa> <feat>*f <eoa>){1,2} <eos> <bos> text <eos>; features for every <feat>."""
    tokens, feats = [BOS, *rng.integers(3, T, rng.integers(1, 5))], []
    lengths = []
    for _ in range(rng.integers(1, 3)):
        f = int(rng.integers(1, 12))
        tokens += [LAYOUT.boa] + [LAYOUT.feature] * f + [LAYOUT.eoa]
        feats.append(rng.standard_normal((f, DIM)).astype(np.float16))
        lengths.append(f)
    tokens += [EOS, BOS]
    prompt = len(tokens)
    tokens += [*rng.integers(3, T, rng.integers(1, 15)), EOS]
    mask = [0] * prompt + [1] * (len(tokens) - prompt)
    if rng.random() < 0.5:  # a stored mask of 1 at <feat> must still give no loss there
        mask = [1 if t == LAYOUT.feature else m for t, m in zip(tokens, mask)]
    return tokens, mask, np.concatenate(feats), lengths


def _tts(rng):
    tokens = [BOS, *rng.integers(3, T, rng.integers(1, 8)), EOS, BOS, LAYOUT.boa]
    prompt = len(tokens) - 1
    tokens += [*(LAYOUT.first_unit + rng.integers(0, K, rng.integers(3, 40))), LAYOUT.eoa, EOS]
    return tokens, [0] * prompt + [1] * (len(tokens) - prompt), None, []


def _text(rng):
    """All tokens targets, <bos> included: only packing stops the loss at a sample's last token."""
    tokens = [BOS, *rng.integers(3, T, rng.integers(1, 30)), EOS]
    return tokens, [1] * len(tokens), None, []


def _write(prefix, samples, *, feature_dim, num_units=K, text_vocab_size=T, task="test"):
    writer = AudioTextWriter(prefix, feature_dim=feature_dim)
    for tokens, mask, feats, _ in samples:
        writer.add(np.array(tokens), np.array(mask), feats)
    writer.finalize(
        {
            "task": task,
            "mode": "features" if feature_dim else "units",
            "text_vocab_size": text_vocab_size,
            "num_units": num_units,
        }
    )


def write_tiny_blend(root, *, seed: int = 0, sizes=(80, 80, 120), tasks=("asr", "tts", "text")) -> dict:
    """asr/tts/text prefixes under `root` (tasks named in their headers): {name: (prefix, samples)}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    makers = {"asr": _asr, "tts": _tts, "text": _text}
    out = {}
    for name, n, task in zip(("asr", "tts", "text"), sizes, tasks):
        samples = [makers[name](rng) for _ in range(n)]
        dim = DIM if name == "asr" else 0
        _write(root / name, samples, feature_dim=dim, num_units=0 if name == "text" else K, task=task)
        out[name] = (str(root / name), samples)
    return out
