"""A log-mel front end for the audio paths, beside HuBERT: Whisper's 80-bin features, normalised per
utterance and stacked to 25 Hz.

Why it exists: a randomly initialised HuBERT (all a machine without downloads can build) carries
almost nothing a decoder can learn from, while log-mel features do; so small runs (the quickstart,
CPU studies) train on these, and real runs point `--audio-encoder` at a pretrained mHuBERT.

    waveform 16 kHz -> |STFT|^2 (n_fft 400 = 25 ms Hann window, hop 160 = 10 ms, 100 Hz)
      -> 80 Slaney mel filters (0-8 kHz) -> log10, floored at max - 8 (Whisper's dynamic range)
      -> per-utterance mean/variance normalisation of each mel bin (removes channel and speaker level)
      -> `stack` consecutive frames concatenated: [frames / stack, 80 * stack] (4 -> 25 Hz, 320-d)

Same interface as HubertEncoder: `encoder(waves)` -> one float16 [frames, dim] CPU tensor per
waveform, and `feature_dim`, `frame_rate`, `min_samples`, `num_frames`. It has no layers, so its
only hidden_states index is 0.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from megatron_most.options import ConfigError

NAME = "logmel"
"""What `--audio-encoder` takes to select this front end instead of a HubertModel directory."""


class LogMelEncoder:
    sample_rate = 16000
    n_fft = 400
    hop = 160
    depth = 0  # hidden_states indices: only 0 (no transformer layers)

    def __init__(self, *, n_mels: int = 80, stack: int = 4, device: str | torch.device = "cpu", eps: float = 1e-5):
        if n_mels < 1 or stack < 1:
            raise ConfigError(f"LogMelEncoder n_mels={n_mels}, stack={stack}: both must be >= 1 (Whisper: 80, 4)")
        self.n_mels, self.stack, self.eps = n_mels, stack, eps
        self.device = torch.device(device)
        filters = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=self.sample_rate / 2,
            sampling_rate=self.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.filters = torch.tensor(filters.T, dtype=torch.float32, device=self.device)  # [mels, freqs]
        self.window = torch.hann_window(self.n_fft, device=self.device)
        self.feature_dim = n_mels * stack
        self.frame_rate = self.sample_rate / (self.hop * stack)  # 25 Hz with stack 4
        self.min_samples = self.hop * stack  # one output frame

    def num_frames(self, num_samples: int) -> int:
        """Output frames for a waveform of `num_samples`: STFT frames (centred) // stack."""
        return (num_samples // self.hop + 1) // self.stack

    @torch.inference_mode()
    def __call__(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        out = []
        for i, wave in enumerate(waves):
            if wave.ndim != 1 or len(wave) < self.min_samples:
                raise ValueError(
                    f"LogMelEncoder: wave {i} has shape {tuple(wave.shape)}; need 1-D mono with "
                    f">= {self.min_samples} samples at {self.sample_rate} Hz"
                )
            out.append(self.encode(torch.as_tensor(np.asarray(wave, dtype=np.float32), device=self.device)))
        return out

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """[samples] float32 -> [frames, n_mels * stack] float16 on the CPU."""
        log_mel = self.log_mel(wave)  # [frames100, mels]
        mean = log_mel.mean(dim=0, keepdim=True)
        std = log_mel.std(dim=0, keepdim=True, unbiased=False)
        normed = (log_mel - mean) / (std + self.eps)
        frames = normed.shape[0] // self.stack
        stacked = normed[: frames * self.stack].reshape(frames, self.feature_dim)  # frame t = rows t*s..t*s+s-1
        return stacked.to(torch.float16).cpu()

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel spectrogram [frames, n_mels] before its (x + 4) / 4 scaling (per-utterance
        normalisation follows instead)."""
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True)  # [freqs, frames]
        power = spec.abs() ** 2
        mel = self.filters @ power  # [mels, frames]
        log = torch.clamp(mel, min=1e-10).log10()
        log = torch.maximum(log, log.max() - 8.0)
        return log.T


def is_logmel(spec: str | None) -> bool:
    return spec == NAME
