"""Modality ids: the one vocabulary for which tokens are text and which are audio.

Every token carries a modality id. Which token ids are audio is a property of the vocabulary
(`model.vocab.TokenLayout.modality`); this module holds the ids, their names and the per-token
*routing info* MAMoE layers read: one int8 [batch, seq] tensor with -1 for padding, else the
modality id.
"""

from __future__ import annotations

import torch

TEXT, AUDIO = 0, 1
"""Modality ids (index into NAMES; rows of the routing statistics)."""
NAMES = ("text", "audio")
PADDING = -1
"""Routing info of a padding token: no routed expert, left out of the balance loss and stats."""


def pack_routing_info(modality_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Combine modality ids [batch, seq] (TEXT / AUDIO) and an optional padding mask [batch, seq]
    (True = padding) into the routing info [batch, seq] int8 that MAMoE layers read."""
    if modality_ids.dim() != 2:
        raise ValueError(f"modality_ids must be [batch, seq], got shape {tuple(modality_ids.shape)}")
    if modality_ids.dtype.is_floating_point or modality_ids.dtype == torch.bool:
        raise ValueError(f"modality_ids must be an integer tensor, got {modality_ids.dtype}")
    bad = (modality_ids != TEXT) & (modality_ids != AUDIO)
    if bad.any():
        value = modality_ids[bad][0].item()
        raise ValueError(f"modality_ids contains {value}: ids must be {TEXT} (text) or {AUDIO} (audio)")
    info = modality_ids.to(torch.int8)
    if padding_mask is not None:
        if padding_mask.shape != modality_ids.shape:
            raise ValueError(
                f"padding_mask shape {tuple(padding_mask.shape)} does not match modality_ids "
                f"shape {tuple(modality_ids.shape)}"
            )
        info = info.masked_fill(padding_mask.bool(), PADDING)
    return info
