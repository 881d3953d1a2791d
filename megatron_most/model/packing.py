"""Attention isolation for packed sequences, derived from position ids.

The training dataset (data/dataset.py) packs whole samples into one sequence and restarts the
position ids at 0 at every sample (and at the padding tail). The model turns those restarts into
a block-diagonal causal mask on its own device, so the data loader never ships a dense
[seq, seq] mask (4 MiB per item at seq 2048). MLA's rotary embedding is relative, so a sample
scores the same at any offset once it cannot see its neighbours.
"""

from __future__ import annotations

import torch


def segment_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Megatron-style mask [batch, 1, seq, seq] (True = masked) that is causal within each run of
    positions starting at 0 and blocks attention across runs; None when no row restarts after
    position 0 (one sample per row: plain causal attention)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(position_ids.shape)}")
    starts = position_ids == 0  # [batch, seq]
    if not starts[:, 1:].any():
        return None
    segments = torch.cumsum(starts.int(), dim=1)  # [batch, seq] sample index of every position
    seq = position_ids.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).triu_(1)  # [seq, seq]
    across = segments[:, :, None] != segments[:, None, :]  # [batch, seq, seq]
    return (across | future).unsqueeze(1)  # [batch, 1, seq, seq]
