"""Communication model of a MoST training step: bytes each GPU sends and the link they cross.

Ranks are ordered as Megatron orders them (TP fastest, then EP / DP, PP slowest) and packed
`gpus_per_node` to a node, so a group of consecutive ranks stays on NVLink while it fits in a
node and crosses InfiniBand otherwise. Collectives are rings: an all-gather or reduce-scatter
of B bytes over n ranks moves B (n - 1) / n per GPU; an all-to-all sends (n - 1) / n of its
buffer, the share addressed to other nodes over InfiniBand and the rest over NVLink. Time =
bytes / (link bandwidth x LINK_EFFICIENCY); nothing overlaps compute unless asked (`overlap`).

Per micro-batch and layer (t = micro_batch x seq_len tokens, h = hidden, bf16):
    TP (with SP)  forward 2 all-gathers + 2 reduce-scatters of t x h x 2 bytes, backward again
    EP            forward dispatch + combine all-to-all of the tokens' topk copies
                  (t / tp x topk x h x 2 bytes per GPU), backward again; the busiest EP rank
                  receives `imbalance` x the mean (expert placement, `placement_imbalance`)
    PP            one send of t / tp x h x 2 bytes per stage boundary each way
Per step:
    DP            distributed optimizer: reduce-scatter of fp32 grads and all-gather of bf16
                  weights over the data-parallel group (dense) or expert-data-parallel group
                  (routed experts)
"""

from __future__ import annotations

import dataclasses

from megatron_most.model.hardware import GPU, LINK_EFFICIENCY
from megatron_most.moe.placement import logical_of_physical, rank_loads


def _ring(size: int) -> float:
    return (size - 1) / size if size > 1 else 0.0


def span_seconds(nbytes: float, size: int, stride: int, gpu: GPU) -> float:
    """Time of a ring collective moving `nbytes` (n-1)/n per GPU over `size` ranks `stride` apart."""
    if size <= 1:
        return 0.0
    within = size * stride <= gpu.gpus_per_node
    bandwidth = (gpu.nvlink_gbs if within else gpu.ib_gbs) * 1e9 * LINK_EFFICIENCY
    return nbytes * _ring(size) / bandwidth


def all_to_all_seconds(nbytes: float, size: int, stride: int, gpu: GPU) -> float:
    """Time of an all-to-all sending `nbytes` from each GPU, spread evenly over `size` ranks."""
    if size <= 1:
        return 0.0
    local = max(1, min(size, gpu.gpus_per_node // stride))  # peers in this node, self included
    to_nvlink = nbytes * (local - 1) / size
    to_ib = nbytes * (size - local) / size
    efficiency = 1e9 * LINK_EFFICIENCY
    return to_nvlink / (gpu.nvlink_gbs * efficiency) + to_ib / (gpu.ib_gbs * efficiency)


def placement_imbalance(mamoe, ep: int, audio_share: float, placement: str | None = None) -> float:
    """Tokens the busiest EP rank receives over the mean, when `audio_share` of the routed tokens
    are audio and each modality spreads evenly over its group's experts (vanilla routing spreads
    every token over all experts: 1.0). Uses moe.placement's own slot map."""
    if ep == 1 or not mamoe.modality_routing:
        return 1.0
    config = mamoe if placement is None else dataclasses.replace(mamoe, placement=placement)
    text, audio = config.groups()
    share = [0.0] * config.num_experts
    for group, weight in ((text, 1 - audio_share), (audio, audio_share)):
        for expert in group:
            share[expert] = weight / len(group)
    loads = rank_loads(share, logical_of_physical(config, ep), ep)
    return max(loads) / (sum(loads) / ep)


def tp_seconds(tokens: int, hidden: int, tp: int, gpu: GPU) -> float:
    """One layer, one micro-batch, forward + backward: 8 SP collectives of tokens x hidden bf16."""
    return 8 * span_seconds(tokens * hidden * 2, tp, 1, gpu)


def ep_seconds(tokens: int, most, tp: int, ep: int, etp: int, imbalance: float, gpu: GPU) -> float:
    """One MoE layer, one micro-batch, forward + backward: 4 all-to-alls of the local tokens'
    topk copies (+ the expert-TP all-gather / reduce-scatter of them when etp > 1)."""
    copies = tokens / tp * most.mamoe.topk * most.hidden_size * 2
    seconds = 4 * all_to_all_seconds(copies * imbalance, ep, etp, gpu)
    return seconds + 4 * span_seconds(copies * etp, etp, 1, gpu)


def pp_seconds(tokens: int, hidden: int, tp: int, pp: int, gpu: GPU) -> float:
    """One micro-batch's activation send + gradient receive at a stage boundary (inter-node)."""
    if pp == 1:
        return 0.0
    return 2 * tokens * hidden * 2 / tp / (gpu.ib_gbs * 1e9 * LINK_EFFICIENCY)


def dp_seconds(
    dense_params: int, expert_params: int, dp: int, expert_dp: int, tp: int, ep_span: int, gpu: GPU
) -> float:
    """Per step: reduce-scatter fp32 grads + all-gather bf16 weights, dense over DP (ranks tp
    apart), routed experts over expert DP (ranks etp x ep apart)."""
    return span_seconds(dense_params * 6, dp, tp, gpu) + span_seconds(expert_params * 6, expert_dp, ep_span, gpu)
