"""One entry point for the audio encoders: a transformers HubertModel directory, or `logmel`.

Every tool that turns audio into features or units (train_units, preprocess_audio_text, generate,
evaluate) takes `--audio-encoder` (alias `--hubert`) and opens it here, so a dataset, its codebook
and inference always read the same front end.
"""

from __future__ import annotations

import hashlib
import json

import torch

from megatron_most.audio.hubert import HubertEncoder
from megatron_most.audio.logmel import LogMelEncoder, is_logmel
from megatron_most.options import ConfigError

HELP = (
    "audio encoder: a transformers HubertModel directory (real runs: mHuBERT) or 'logmel' (80-bin log-mel, "
    "per-utterance normalised, stacked to 25 Hz: 320-d; no weights)"
)


def add_encoder_argument(parser, *, required: bool = False) -> None:
    """The tools' one `--audio-encoder` option (alias `--hubert`, stored as `hubert`)."""
    parser.add_argument(
        "--audio-encoder", "--hubert", dest="hubert", metavar="DIR|logmel", required=required, help=HELP
    )


def load_encoder(
    spec: str,
    *,
    layer: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_batch_samples: int = 16000 * 320,
) -> HubertEncoder | LogMelEncoder:
    """The encoder named by `spec`; `layer` is a HuBERT hidden_states index (None = last; log-mel: 0 or None)."""
    if is_logmel(spec):
        if layer not in (None, 0):
            raise ConfigError(f"layer={layer}: the logmel encoder has no layers; drop --layer (or pass 0)")
        return LogMelEncoder(device=device)
    return HubertEncoder(spec, layer=layer, device=device, dtype=dtype, max_batch_samples=max_batch_samples)


def logmel_fingerprint() -> str:
    """Content hash standing in for a model directory's: the front end's defining settings."""
    encoder = LogMelEncoder()
    settings = {"name": "logmel", "n_mels": encoder.n_mels, "stack": encoder.stack, "n_fft": encoder.n_fft,
                "hop": encoder.hop, "eps": encoder.eps, "normalise": "per-utterance"}  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
