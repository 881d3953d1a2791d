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

At one TP and EP rank with Megatron's local modules (the single-process case), the step calls
the weights with plain torch ops instead of the modules: Megatron's linears go through an
autograd Function, amp decorators and process-group lookups per call, and its MoE layer runs
every expert through the token dispatcher; here a routed expert runs on its own tokens only.
A prompt (the first step, empty cache) attends row by row over its unpadded tokens with
`is_causal`, not over the padded batch with a mask.

Shapes: s = new tokens this step, b = batch, T = cached tokens, h = heads of this TP rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_most.moe import pack_routing_info


@dataclasses.dataclass
class LayerCache:
    """One layer's cache: [T, b, kv_lora_rank] latents (after kv_layernorm, which is per token)
    and [T, b, 1, rope] rotated keys."""

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
    direct: bool = False
    """Plain torch ops instead of Megatron's modules (`_direct`)."""

    @classmethod
    def empty(cls, model, batch: int, device) -> DecodeState:
        return cls(
            layers=[LayerCache() for _ in model.decoder.layers],
            valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
            direct=_direct(model),
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def _direct(model) -> bool:
    """Whether the weights can be called with plain torch ops: one tensor- and expert-parallel
    rank (no collective inside a linear or the MoE), Megatron's local modules (not TE's fused
    norm+linear), SwiGLU MLPs and SequentialMLP experts."""
    cfg = model.config
    moe = [layer.mlp for layer in model.decoder.layers if isinstance(layer.mlp, MoELayer)]
    return (
        parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_expert_model_parallel_world_size() == 1
        and parallel_state.get_expert_tensor_parallel_world_size() == 1
        and not getattr(model, "uses_te", False)
        and cfg.gated_linear_unit
        and cfg.activation_func is F.silu
        and getattr(cfg, "activation_func_clamp_value", None) is None
        and getattr(cfg, "glu_linear_offset", 0.0) == 0.0
        and not cfg.rotary_interleaved
        and all(isinstance(m.experts, SequentialMLP) for m in moe)
        and all(m.shared_experts is None or not m.shared_experts.use_shared_expert_gate for m in moe)
    )


def _linear(module, x: torch.Tensor, direct: bool) -> torch.Tensor:
    if direct:
        return F.linear(x, module.weight, module.bias)
    out, bias = module(x)
    return out if bias is None else out + bias


def _swiglu_mlp(mlp, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Megatron's MLP (fc1 -> SwiGLU -> [x per-token scale] -> fc2) as plain ops."""
    h = F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)
    gate, up = h.chunk(2, dim=-1)
    h = F.silu(gate) * up
    if scale is not None:  # routed experts: the router probability, before fc2 as Megatron applies it
        h = (h * scale.unsqueeze(-1)).to(x.dtype)
    return F.linear(h, mlp.linear_fc2.weight, mlp.linear_fc2.bias)


def _moe(moe: MoELayer, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """The MAMoE layer at one EP rank: its router (modality masking, padding routed nowhere), each
    routed expert on its own tokens, the shared experts on all. x [s, b, hidden], routing [b, s]."""
    s, b, width = x.shape
    probs, routing_map = moe.router(x, padding_mask=routing.t().contiguous())  # [s * b, experts]
    flat = x.reshape(-1, width)
    out = torch.zeros_like(flat)
    experts = moe.experts
    logical = getattr(experts, "logical_ids", range(len(experts.local_experts)))  # placement slots
    for expert, e in zip(experts.local_experts, logical, strict=True):
        tokens = routing_map[:, e].nonzero().view(-1)
        if tokens.numel():
            out.index_add_(0, tokens, _swiglu_mlp(expert, flat[tokens], probs[tokens, e]))
    out = out.view(s, b, width)
    return out if moe.shared_experts is None else out + _swiglu_mlp(moe.shared_experts, x)


def _rotary(model, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (YaRN's mscale applied) of MLA's rotary embedding at `positions` [s, b]:
    [s, b, 1, rope] each, once per step (every layer has the same rotary embedding)."""
    rope = model.decoder.layers[0].self_attention.rotary_pos_emb
    out = rope(int(positions.max()) + 1)
    freqs, mscale = out if isinstance(out, tuple) else (out, 1.0)
    freqs = freqs[positions].squeeze(-2)  # freqs: [positions, 1, 1, rope] -> [s, b, 1, rope]
    return (freqs.cos() * mscale).to(dtype), (freqs.sin() * mscale).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Megatron's unfused rotation for MLA (_apply_rotary_pos_emb_bshd, rotary_interleaved=False):
    # de-interleave, then rotate-half. The fused kernel assumes one position per sequence index,
    # which left-padded rows do not have.
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def latent_attention(
    attention, hidden, rotary, cache: LayerCache, allowed, *, direct: bool = False, prompt_rows=None
) -> torch.Tensor:
    """MLA over the cached tokens and `hidden` [s, b, hidden]'s new ones: [s, b, hidden].

    `rotary`: (cos, sin) at the new tokens' positions (`_rotary`). `allowed` [b, 1, s, T_total]
    says which cached slots each new token may attend to. `prompt_rows` (the first step only:
    the cache was empty): each row's real tokens, the last ones of the row; each row then
    attends alone over them, causally (padding outputs are zero: nothing attends to them).
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
        q = _linear(attention.linear_q_proj, hidden, direct)
    else:
        q_latent = _linear(attention.linear_q_down_proj, hidden, direct)
        q = _linear(attention.linear_q_up_proj, attention.q_layernorm(q_latent), direct)
    q_nope, q_rope = q.view(s, b, heads, nope + rope).split([nope, rope], dim=-1)
    kv = _linear(attention.linear_kv_down_proj, hidden, direct)
    latent, rope_key = kv.split([cfg.kv_lora_rank, rope], dim=-1)
    q_rope = _rotate(q_rope, *rotary)
    latents, rope_keys = cache.append(attention.kv_layernorm(latent), _rotate(rope_key.unsqueeze(-2), *rotary))

    kv_up = _linear(attention.linear_kv_up_proj, latents, direct)  # [T, b, h * (nope + v)]
    k_nope, value = kv_up.view(latents.shape[0], b, heads, nope + v_dim).split([nope, v_dim], dim=-1)
    key = torch.cat([k_nope, rope_keys.expand(-1, -1, heads, -1)], dim=-1)
    query = torch.cat([q_nope, q_rope], dim=-1)
    q_, k_, v_ = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, seq, dim]
    if prompt_rows is None:
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=allowed, scale=attention.softmax_scale)
    else:
        out = q_.new_zeros(b, heads, s, v_dim)
        for row, n in enumerate(prompt_rows):
            real = slice(s - n, s)
            out[row, :, real] = F.scaled_dot_product_attention(
                q_[row : row + 1, :, real], k_[row : row + 1, :, real], v_[row : row + 1, :, real],
                is_causal=True, scale=attention.softmax_scale,
            )[0]  # fmt: skip
    return _linear(attention.linear_proj, out.permute(2, 0, 1, 3).reshape(s, b, heads * v_dim), direct)


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
def decode_step(model, state: DecodeState, input_ids, valid, audio_features=None, *, last_only: bool = False):
    """Feed `input_ids` [b, s] (`valid` [b, s]: False = padding) after the cached tokens; the
    cache grows by s slots. Returns the logits of the new positions, [b, s, vocab] (whole vocab),
    or of the last one only, [b, 1, vocab] (`last_only`: what generation reads)."""
    direct = state.direct
    positions = state.next_position[:, None] + valid.long().cumsum(1) - 1  # [b, s]
    positions = positions.clamp(min=0)
    routing = pack_routing_info(model.tokens.modality(input_ids), ~valid)
    allowed = _allowed(state, valid)
    prompt_rows = valid.sum(1).tolist() if state.length == 0 and valid.shape[1] > 1 else None
    if prompt_rows is not None and not bool((valid == (valid.cumsum(1) > 0)).all()):
        prompt_rows = None  # padding inside a row (not left padding only): the masked path
    hidden = model.embed(input_ids, positions, audio_features)  # [s, b, hidden]
    rotary = _rotary(model, positions.t(), hidden.dtype)
    for layer, cache in zip(model.decoder.layers, state.layers, strict=True):
        attended = latent_attention(
            layer.self_attention, layer.input_layernorm(hidden), rotary, cache, allowed,
            direct=direct, prompt_rows=prompt_rows,
        )  # fmt: skip
        hidden = hidden + attended
        normed = layer.pre_mlp_layernorm(hidden)
        if isinstance(layer.mlp, MoELayer):
            if direct:
                hidden = hidden + _moe(layer.mlp, normed, routing)
                continue
            out, bias = layer.mlp(normed, padding_mask=routing)
        elif direct:
            hidden = hidden + _swiglu_mlp(layer.mlp, normed)
            continue
        else:
            out, bias = layer.mlp(normed)
        hidden = hidden + (out if bias is None else out + bias)
    if last_only:
        hidden = hidden[-1:]
    hidden = model.decoder.final_layernorm(hidden)
    if direct:
        logits = F.linear(hidden, model.output_layer.weight)  # [s, b, vocab]
    else:
        logits, _ = model.output_layer(hidden)  # [s, b, vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits)
    state.valid = torch.cat([state.valid, valid], dim=1)
    state.next_position = state.next_position + valid.long().sum(1)
    return logits.transpose(0, 1).float()
