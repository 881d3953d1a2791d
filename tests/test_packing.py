"""Packed rows: the block-diagonal mask (local specs) and THD PackedSeqParams (Transformer Engine)
both come from the position ids, agree with each other, and a dense mask never reaches TE."""

from __future__ import annotations

import pytest
import torch

from megatron_most.model.packing import attention_inputs, segment_mask, thd_params
from megatron_most.options import ConfigError

POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])


def test_thd_params_known_answer():
    params = thd_params(POSITIONS)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8, 12]
    assert params.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q)
    assert (params.max_seqlen_q, params.max_seqlen_kv) == (4, 4)


def test_a_row_start_always_starts_a_segment():
    # a row that does not begin at position 0 (a cut sample) must not continue the previous row
    assert thd_params(torch.tensor([[0, 1, 2], [5, 6, 0]])).cu_seqlens_q.tolist() == [0, 3, 5, 6]


def _mask_from_cu_seqlens(cu, total):
    """Dense [total, total] 'may attend' matrix of THD segments: causal inside each segment."""
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    return allowed


def test_thd_segments_equal_the_block_diagonal_mask():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = []
        for _ in range(3):
            lengths, left = [], 10
            while left:
                lengths.append(int(torch.randint(1, left + 1, (1,), generator=gen)))
                left -= lengths[-1]
            rows.append(torch.cat([torch.arange(n) for n in lengths]))
        positions = torch.stack(rows)  # [3, 10]
        thd = _mask_from_cu_seqlens(thd_params(positions).cu_seqlens_q, positions.numel())
        dense = segment_mask(positions)
        if dense is None:  # one sample per row: plain causal
            dense = torch.ones(10, 10, dtype=torch.bool).triu(1).expand(3, 1, 10, 10)
        expected = torch.block_diag(*(~dense[b, 0] for b in range(3)))  # rows never see each other
        assert torch.equal(thd, expected)


def test_attention_inputs_per_spec():
    plain = torch.arange(6).expand(2, 6)
    mask, packed = attention_inputs(POSITIONS, None, uses_te=False)
    assert torch.equal(mask, segment_mask(POSITIONS)) and packed is None
    assert attention_inputs(plain, None, uses_te=False) == (None, None)
    mask, packed = attention_inputs(POSITIONS, None, uses_te=True)
    assert mask is None and packed.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8, 12]
    assert attention_inputs(plain, None, uses_te=True) == (None, None)
    with pytest.raises(ConfigError, match="create_attention_mask=False"):
        attention_inputs(POSITIONS, segment_mask(POSITIONS), uses_te=True)
