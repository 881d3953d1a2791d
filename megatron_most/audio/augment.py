"""SpecAugment-style masking of continuous audio features (Park et al. 2019, without time warping).

Each span of <feat> frames (one utterance) gets `time_masks` runs of up to `time_width` frames and
`freq_masks` bands of up to `freq_width` feature channels set to 0. Features are normalised per
utterance (log-mel) or roughly centred (HuBERT), so 0 is the mean: the mask removes information
without adding an outlier. Stacked features (`groups` frames concatenated, e.g. log-mel at 25 Hz =
4 x 80 bins) mask the same bins in every stacked frame, as masking the unstacked spectrogram would.

Deterministic: the caller passes a numpy Generator (the dataset seeds it per item), so a resumed
run masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from megatron_most.options import options, require


@options
class SpecAugment:
    time_masks: int = 0
    """Time masks per utterance (span of <feat> frames)."""
    time_width: int = 5
    """Longest time mask, in frames (capped at a fifth of the span)."""
    freq_masks: int = 0
    """Frequency masks per utterance."""
    freq_width: int = 10
    """Widest frequency mask, in channels of one stacked frame (bins of a log-mel frame)."""
    groups: int = 1
    """Frames stacked in one feature vector (log-mel at 25 Hz: 4); 1 for HuBERT."""

    def __post_init__(self):
        for name in ("time_masks", "time_width", "freq_masks", "freq_width"):
            require(getattr(self, name) >= 0, f"spec_augment_{name}={getattr(self, name)}: must be >= 0")
        require(self.groups >= 1, f"spec_augment_groups={self.groups}: must be >= 1 (frames stacked per vector)")

    @property
    def active(self) -> bool:
        return bool(self.time_masks and self.time_width) or bool(self.freq_masks and self.freq_width)


def spec_augment(features: np.ndarray, lengths: np.ndarray, opts: SpecAugment, rng: np.random.Generator) -> np.ndarray:
    """features [frames, dim] (spans back to back, `lengths` [spans] frames each) -> masked copy."""
    dim = features.shape[1]
    require(dim % opts.groups == 0, f"spec_augment_groups={opts.groups} does not divide the feature size {dim}")
    bins = dim // opts.groups
    out = features.copy()
    view = out.reshape(len(out), opts.groups, bins)  # [frames, groups, bins]
    start = 0
    for length in lengths.tolist():
        span = view[start : start + length]  # [length, groups, bins]
        for _ in range(opts.time_masks):
            width = int(rng.integers(0, min(opts.time_width, length // 5) + 1))
            t0 = int(rng.integers(0, length - width + 1))
            span[t0 : t0 + width] = 0.0
        for _ in range(opts.freq_masks):
            width = int(rng.integers(0, min(opts.freq_width, bins) + 1))
            f0 = int(rng.integers(0, bins - width + 1))
            span[:, :, f0 : f0 + width] = 0.0
        start += length
    return out
