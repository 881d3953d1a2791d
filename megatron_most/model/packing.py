"""Attention isolation for packed sequences, derived from position ids.

The training dataset (data/dataset.py) packs whole samples into one sequence and restarts the
position ids at 0 at every sample (and at the padding tail). The model turns those restarts into
what its attention implementation uses, on its own device, so the data loader never ships a
dense [seq, seq] mask (4 MiB per item at seq 2048):

- local specs (SDPA core attention): a block-diagonal causal mask (`segment_mask`);
- Transformer Engine: THD packing (`thd_params`): the [batch, seq] rows flattened into one
  sequence of batch * seq tokens with `cu_seqlens` at every restart, which TE's fused attention
  keeps apart. TE's causal kernel ignores a dense mask, so a dense mask on the TE path is refused
  (`attention_inputs`) instead of letting packed samples attend to each other.

MLA's rotary embedding is relative, so a sample scores the same at any offset once it cannot see
its neighbours.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_most.options import ConfigError


def _check(position_ids: torch.Tensor) -> None:
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(position_ids.shape)}")


def is_packed(position_ids: torch.Tensor) -> bool:
    """True when some row's positions restart after its first token (several samples per row)."""
    _check(position_ids)
    return bool((position_ids[:, 1:] == 0).any())


def segment_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Megatron-style mask [batch, 1, seq, seq] (True = masked) that is causal within each run of
    positions starting at 0 and blocks attention across runs; None when no row restarts after
    position 0 (one sample per row: plain causal attention)."""
    if not is_packed(position_ids):
        return None
    starts = position_ids == 0  # [batch, seq]
    segments = torch.cumsum(starts.int(), dim=1)  # [batch, seq] sample index of every position
    seq = position_ids.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).triu_(1)  # [seq, seq]
    across = segments[:, :, None] != segments[:, None, :]  # [batch, seq, seq]
    return (across | future).unsqueeze(1)  # [batch, 1, seq, seq]


def thd_params(position_ids: torch.Tensor) -> PackedSeqParams:
    """PackedSeqParams for the rows of `position_ids` [batch, seq] flattened into one sequence:
    a segment starts at every position 0 and at every row start; cu_seqlens int32 on the ids'
    device (what TE's fused attention reads)."""
    _check(position_ids)
    starts = position_ids == 0  # [batch, seq]
    starts[:, 0] = True  # a row never continues the previous one
    begin = starts.reshape(-1).nonzero().view(-1)  # [segments]
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    cu_seqlens = torch.cat([begin, total]).to(torch.int32)  # [segments + 1]
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def attention_inputs(position_ids, attention_mask, uses_te: bool):
    """(attention_mask, packed_seq_params) for one micro-batch (see the module docstring)."""
    if uses_te:
        if attention_mask is not None:
            raise ConfigError(
                "a dense attention_mask reached the Transformer Engine model, whose causal attention kernel ignores "
                "it: build the dataset with create_attention_mask=False (packed rows then run as THD, from the "
                "position ids)"
            )
        packed = position_ids is not None and is_packed(position_ids)
        return None, thd_params(position_ids) if packed else None
    if attention_mask is None and position_ids is not None:
        attention_mask = segment_mask(position_ids)
    return attention_mask, None
