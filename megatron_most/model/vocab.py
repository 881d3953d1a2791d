"""Token layout of MoST: text vocabulary, audio markers, the feature placeholder, HuBERT units.

    [0, text)                 text tokens of the base tokenizer
    text + 0                  <boa>   begin of audio   (modality 0, like the release's markers)
    text + 1                  <eoa>   end of audio     (modality 0)
    text + 2                  <feat>  one continuous-path audio frame (modality 1, never a target)
    text + 3 .. text + 3 + K  [Hu0]..[Hu{K-1}] discrete units (modality 1, predicted: TTS)

The embedding table is padded to a multiple of 128 rows so every tensor-parallel rank holds the
same number of rows. Unlike Megatron-LM's multiple of 128 x TP, the padding does not depend on
the layout, so a checkpoint reshards to any TP size (any power of two up to 128). Padded rows
are never produced by data and never targets.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_most.moe.modality import AUDIO, TEXT
from megatron_most.options import ConfigError


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    text_vocab_size: int
    num_units: int
    audio: bool = True
    """False for a text-only model: no markers, no units, the table is the text vocabulary."""
    divisible_by: int = 128

    @property
    def boa(self) -> int:
        return self.text_vocab_size

    @property
    def eoa(self) -> int:
        return self.text_vocab_size + 1

    @property
    def feature(self) -> int:
        return self.text_vocab_size + 2

    @property
    def first_unit(self) -> int:
        return self.text_vocab_size + 3

    @property
    def size(self) -> int:
        """Ids in use (text + markers + units), before padding."""
        return self.first_unit + self.num_units if self.audio else self.text_vocab_size

    @property
    def padded_size(self) -> int:
        return -(-self.size // self.divisible_by) * self.divisible_by

    def unit(self, k):
        """Token id of unit k (int or tensor)."""
        return self.first_unit + k

    def is_unit(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.first_unit) & (ids < self.size)

    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token modality id (moe.modality): AUDIO for unit tokens and feature frames, TEXT
        otherwise (markers included). The one token -> modality rule of the project."""
        audio = self.is_unit(ids) | (ids == self.feature)
        return torch.where(audio, AUDIO, TEXT).long()

    def validate(self, ids: torch.Tensor, max_length: int, feature_spans: torch.Tensor | None = None) -> None:
        """Check a batch of token ids [batch, seq]; raise ValueError naming the sample and field.

        `feature_spans` ([num_spans], frames per audio span in batch order) is checked against the
        number of <feat> placeholders between each <boa>/<eoa> pair.
        """
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if ids.shape[1] > max_length:
            raise ValueError(
                f"input_ids: sequence length {ids.shape[1]} exceeds the configured seq_length {max_length}"
            )
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            sample, pos = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"input_ids sample {sample} position {pos}: token id {int(ids[sample, pos])} is outside the vocabulary "
                f"(text {self.text_vocab_size} + 3 audio markers + {self.num_units} units = {self.size} ids)"
            )
        spans = iter(feature_spans.tolist() if feature_spans is not None else [])
        for sample, row in enumerate(ids.tolist()):
            for span, (start, end) in enumerate(_audio_spans(row, self.boa, self.eoa, sample)):
                frames = sum(1 for t in row[start + 1 : end] if t == self.feature)
                if frames == 0 or feature_spans is None:
                    continue
                expected = next(spans, None)
                if expected is None:
                    raise ValueError(
                        f"sample {sample} audio span {span}: {frames} <feat> placeholders but no audio features left "
                        "(audio_lengths has fewer spans than the batch)"
                    )
                if expected != frames:
                    raise ValueError(
                        f"sample {sample} audio span {span} (positions {start}..{end}): {frames} <feat> placeholders "
                        f"but audio_lengths gives {expected} feature frames"
                    )
        if next(spans, None) is not None:
            raise ValueError("audio_lengths has more spans than the batch has <boa> <feat>... <eoa> spans")


def _audio_spans(row: list[int], boa: int, eoa: int, sample: int):
    start = None
    for pos, token in enumerate(row):
        if token == boa:
            if start is not None:
                raise ValueError(
                    f"sample {sample}: <boa> at position {pos} opens a span inside the span opened at {start}"
                )
            start = pos
        elif token == eoa:
            if start is None:
                raise ValueError(f"sample {sample}: <eoa> at position {pos} has no matching <boa>")
            yield start, pos
            start = None
    if start is not None:
        raise ValueError(f"sample {sample}: <boa> at position {start} has no closing <eoa>")


def check_vocab(text_vocab_size: int, num_units: int) -> None:
    if text_vocab_size < 1:
        raise ConfigError(f"text_vocab_size={text_vocab_size}: must be >= 1")
    if num_units < 0:
        raise ConfigError(f"num_units={num_units}: must be >= 0 (0 disables the discrete audio path)")
