"""Core attention for Multi-Latent Attention on Megatron's local (non-TE) specs.

MLA hands its core attention `k_channels`/`v_channels` (query/key and value head widths
differ: 128+64 vs 128 in DeepSeek-V2-Lite); Megatron 0.16.1's local DotProductAttention
refuses those arguments. `SDPACoreAttention` takes the same constructor and runs torch's
scaled_dot_product_attention with MLA's softmax scale (YaRN mscale included), which is also
faster on CPUs than the local softmax path.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPACoreAttention: apply_query_key_layer_scaling is not supported; set it to False")
        if v_channels is not None:  # the output width follows the value heads
            self.hidden_size_per_attention_head = v_channels
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        # query/key: [seq, batch, heads, qk_dim]; value: [seq, batch, heads, v_dim]
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [batch, heads, seq, dim]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and q.size(2) > 1 and mask_type == AttnMaskType.causal
        if causal and q.size(2) != k.size(2):
            raise NotImplementedError("SDPACoreAttention: causal attention needs as many keys as queries")
        mask = None if attention_mask is None else ~attention_mask  # Megatron: True = masked out
        dropout = self.attention_dropout.p if self.training else 0.0
        fork = dropout > 0 and not self.config.sequence_parallel  # as DotProductAttention does
        with tensor_parallel.get_cuda_rng_tracker().fork() if fork else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)  # [seq, batch, heads * v_dim]
