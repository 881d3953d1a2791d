"""Incremental decoding of a MoSTModel with a latent key/value cache for Multi-Latent Attention.

As DeepSeek-V2 does, each layer caches what MLA compresses keys and values into, not the keys
and values themselves: per token the kv latent (`kv_lora_rank` wide, before the up-projection)
and the rotary key part (`qk_rope_head_dim`, already rotated), shared by all heads. For
DeepSeek-V2-Lite that is 512 + 64 numbers per token and layer instead of 16 heads x (192 + 128).
Keys and values are up-projected from the cache at each step.

The step runs the model's own modules (norms, projections, MAMoE/dense MLPs, output layer) in
the order of Megatron's TransformerLayer; only attention is recomposed here, because Megatron's
local MLA has no cache. Rotary positions come per token, so left-padded rows of a batch keep
the positions they would have alone.

Shapes: s = new tokens this step, b = batch, T = cached tokens, h = heads of this TP rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_most.moe import pack_routing_info


@dataclasses.dataclass
class LayerCache:
    """One layer's cache: [T, b, kv_lora_rank] latents and [T, b, 1, rope] rotated keys."""

    latent: torch.Tensor | None = None
    rope_key: torch.Tensor | None = None

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat([self.latent, latent])
            self.rope_key = torch.cat([self.rope_key, rope_key])
        return self.latent, self.rope_key


@dataclasses.dataclass
class DecodeState:
    """The cache of a whole batch: per-layer latents, which cached slots hold real tokens
    (`valid` [b, T]: left padding is never attended to) and each row's next position."""

    layers: list[LayerCache]
    valid: torch.Tensor
    next_position: torch.Tensor  # [b]

    @classmethod
    def empty(cls, model, batch: int, device) -> DecodeState:
        return cls(
            layers=[LayerCache() for _ in model.decoder.layers],
            valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def _rotary(attention, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rotary angles of MLA's embedding (YaRN or plain RoPE) at `positions` [s, b]: [s, b, 1, rope]."""
    rope = attention.rotary_pos_emb
    out = rope(int(positions.max()) + 1)
    freqs, mscale = out if isinstance(out, tuple) else (out, 1.0)
    return freqs[positions].squeeze(-2), mscale  # freqs: [positions, 1, 1, rope] -> [s, b, 1, rope]


def _rotate(x: torch.Tensor, freqs: torch.Tensor, mscale: float, config) -> torch.Tensor:
    # Megatron's unfused rotation (MLA's de-interleave included); the fused kernel assumes
    # one position per sequence index, which left-padded rows do not have.
    return _apply_rotary_pos_emb_bshd(
        x,
        freqs,
        rotary_interleaved=config.rotary_interleaved,
        multi_latent_attention=config.multi_latent_attention,
        mscale=mscale,
    )


def latent_attention(attention, hidden, positions, cache: LayerCache, allowed) -> torch.Tensor:
    """MLA over the cached tokens and `hidden` [s, b, hidden]'s new ones: [s, b, hidden].

    `allowed` [b, 1, s, T_total] says which cached slots each new token may attend to.
    """
    cfg = attention.config
    heads, nope, rope, v_dim = (
        attention.num_attention_heads_per_partition,
        cfg.qk_head_dim,
        cfg.qk_pos_emb_head_dim,
        cfg.v_head_dim,
    )
    s, b = hidden.shape[:2]
    if cfg.q_lora_rank is None:
        q, _ = attention.linear_q_proj(hidden)
    else:
        q_latent, _ = attention.linear_q_down_proj(hidden)
        q, _ = attention.linear_q_up_proj(attention.q_layernorm(q_latent))
    q_nope, q_rope = q.view(s, b, heads, nope + rope).split([nope, rope], dim=-1)
    kv, _ = attention.linear_kv_down_proj(hidden)
    latent, rope_key = kv.split([cfg.kv_lora_rank, rope], dim=-1)
    freqs, mscale = _rotary(attention, positions)
    q_rope = _rotate(q_rope, freqs, mscale, cfg)
    latents, rope_keys = cache.append(latent, _rotate(rope_key.unsqueeze(-2), freqs, mscale, cfg))

    kv_up, _ = attention.linear_kv_up_proj(attention.kv_layernorm(latents))  # [T, b, h * (nope + v)]
    k_nope, value = kv_up.view(latents.shape[0], b, heads, nope + v_dim).split([nope, v_dim], dim=-1)
    key = torch.cat([k_nope, rope_keys.expand(-1, -1, heads, -1)], dim=-1)
    query = torch.cat([q_nope, q_rope], dim=-1)
    q_, k_, v_ = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, seq, dim]
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=allowed, scale=attention.softmax_scale)
    out, bias = attention.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, heads * v_dim))
    return out if bias is None else out + bias


def _allowed(state: DecodeState, new_valid: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, T] attention permissions after appending `new_valid` [b, s]: causal over cache
    slots, never to padding (a padded query still sees itself, so no row of softmax is empty)."""
    valid = torch.cat([state.valid, new_valid], dim=1)  # [b, T]
    total, s = valid.shape[1], new_valid.shape[1]
    query_slot = torch.arange(total - s, total, device=valid.device)[:, None]  # [s, 1]
    key_slot = torch.arange(total, device=valid.device)[None, :]  # [1, T]
    causal = key_slot <= query_slot
    allowed = causal & (valid[:, None, :] | (key_slot == query_slot))  # [b, s, T]
    return allowed[:, None]


@torch.no_grad()
def decode_step(model, state: DecodeState, input_ids, valid, audio_features=None) -> torch.Tensor:
    """Feed `input_ids` [b, s] (`valid` [b, s]: False = padding) after the cached tokens; the
    cache grows by s slots. Returns the logits of the new positions, [b, s, vocab] (whole vocab)."""
    positions = state.next_position[:, None] + valid.long().cumsum(1) - 1  # [b, s]
    positions = positions.clamp(min=0)
    routing = pack_routing_info(model.tokens.modality(input_ids), ~valid)
    allowed = _allowed(state, valid)
    hidden = model.embed(input_ids, positions, audio_features)  # [s, b, hidden]
    for layer, cache in zip(model.decoder.layers, state.layers, strict=True):
        attended = latent_attention(layer.self_attention, layer.input_layernorm(hidden), positions.t(), cache, allowed)
        hidden = hidden + attended
        normed = layer.pre_mlp_layernorm(hidden)
        mlp = layer.mlp(normed, padding_mask=routing) if isinstance(layer.mlp, MoELayer) else layer.mlp(normed)
        out, bias = mlp
        hidden = hidden + (out if bias is None else out + bias)
    hidden = model.decoder.final_layernorm(hidden)
    logits, _ = model.output_layer(hidden)  # [s, b, vocab / tp]
    logits = gather_from_tensor_model_parallel_region(logits)
    state.valid = torch.cat([state.valid, valid], dim=1)
    state.next_position = state.next_position + valid.long().sum(1)
    return logits.transpose(0, 1).float()
