"""What both --verify directions share: sample inputs (text, and text + audio for MoST) and the
logit comparison that prints the max abs difference and PASS/FAIL."""

from __future__ import annotations

import math

import torch

from megatron_most.model.config import MoSTConfig

DEFAULT_TOLERANCE = 1e-3
"""Max abs logit difference allowed, relative to max(1, max |reference logit|)."""


class VerifyError(RuntimeError):
    """The converted model does not reproduce the source's logits."""


def has_audio(most: MoSTConfig) -> bool:
    """Whether `most` needs the MoST check (audio tokens or modality routing)."""
    return most.tokens.audio or most.mamoe.modality_routing


def most_check_name(most: MoSTConfig) -> str:
    """The MoST check's name: "text+audio", or "text+routing" for a model without audio tokens."""
    return "text+audio" if most.tokens.audio else "text+routing"


def sample_batch(most: MoSTConfig, batch: int, seq: int, seed: int = 0, text_ids: torch.Tensor | None = None):
    """(input_ids [batch, seq], audio_features [frames, audio_feature_dim] or None).

    Text positions take `text_ids` (repeated) or seeded random text tokens. A model with audio
    gets in every row a run of unit tokens (discrete path) and a <boa> <feat>... <eoa> span
    (continuous path), in alternating order, with seeded random features for the <feat> frames."""
    tokens = most.tokens
    gen = torch.Generator().manual_seed(seed)
    if text_ids is None or text_ids.numel() == 0:
        text = torch.randint(0, most.text_vocab_size, (batch * seq,), generator=gen)
    else:
        text = text_ids.reshape(-1).repeat(-(-batch * seq // text_ids.numel()))
    text = iter(text.tolist())
    units = max(1, seq // 4) if most.num_units else 0
    frames = max(1, seq // 5) if most.audio_feature_dim else 0
    rows, total_frames = [], 0
    for r in range(batch):
        pieces = []
        if units:
            pieces.append(tokens.unit(torch.randint(0, most.num_units, (units,), generator=gen)).tolist())
        if frames:
            pieces.append([tokens.boa, *[tokens.feature] * frames, tokens.eoa])
            total_frames += frames
        if r % 2:
            pieces.reverse()
        audio = sum(len(p) for p in pieces)
        if audio + len(pieces) + 1 > seq:
            raise ValueError(f"verify sequence length {seq} is too short for the audio spans of the sample batch")
        gap = (seq - audio) // (len(pieces) + 1)
        row = [next(text) for _ in range(gap)]
        for piece in pieces:
            row += piece + [next(text) for _ in range(gap)]
        row += [next(text) for _ in range(seq - len(row))]
        rows.append(row)
    ids = torch.tensor(rows, dtype=torch.long)
    features = torch.randn(total_frames, most.audio_feature_dim, generator=gen) if frames else None
    return ids, features


def compare(expected: torch.Tensor, got: torch.Tensor, what: str, tolerance: float = DEFAULT_TOLERANCE, log=print):
    """Max abs difference of two logit tensors and whether it is within tolerance; prints a line."""
    expected, got = expected.float(), got.float()
    if expected.shape != got.shape:
        log(f"verify ({what}): logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)} FAIL")
        return math.inf, False
    diff = (got - expected).abs().max().item()
    peak = expected.abs().max().item()
    ok = bool(torch.isfinite(got).all()) and math.isfinite(diff) and diff <= tolerance * max(1.0, peak)
    log(f"verify ({what}): max abs logit diff {diff:.3e} (max |logit| {peak:.3f}) {'PASS' if ok else 'FAIL'}")
    return diff, ok


def round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round `model`'s floating parameters to `dtype` in place (kept in their own dtype)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))


__all__ = ["DEFAULT_TOLERANCE", "VerifyError", "has_audio", "most_check_name", "sample_batch", "compare", "round_to"]
