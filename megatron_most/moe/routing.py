"""The MAMoE routing rule and its balance loss, as plain tensor functions.

Every token carries a modality (0 text, 1 audio); routed experts are split into a text and an
audio group. Router logits cover all experts; a token may only reach experts of its own group:

  zero_after_softmax   (the release)  scores = softmax(logits) with the other group's scores zeroed
  renormalize_in_group                scores = softmax(logits with the other group's set to -inf)

then the top-k scores are the routing weights, not renormalised (DeepSeek norm_topk_prob=False).
The vanilla variant skips the masking. Padding tokens get zero weight and are left out of the
balance loss and the statistics.
"""

from __future__ import annotations

import torch


def group_masks(num_experts: int, groups: tuple[tuple[int, ...], ...], device=None) -> torch.Tensor:
    """[num_groups, num_experts] bool: row g marks the experts a token of modality g may use."""
    masks = torch.zeros(len(groups), num_experts, dtype=torch.bool, device=device)
    for g, experts in enumerate(groups):
        masks[g, list(experts)] = True
    return masks


def route(
    logits: torch.Tensor,  # [tokens, experts], fp32
    modality: torch.Tensor,  # [tokens], long in {0, 1}
    valid: torch.Tensor,  # [tokens], bool: False for padding
    allowed: torch.Tensor | None,  # [2, experts] bool, or None for vanilla routing
    topk: int,
    masking: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (probs [tokens, experts], routing_map [tokens, experts] bool, scores [tokens, experts])."""
    if allowed is None:
        scores = torch.softmax(logits, dim=-1)
    elif masking == "zero_after_softmax":
        scores = torch.softmax(logits, dim=-1) * allowed[modality]
    else:
        scores = torch.softmax(logits.masked_fill(~allowed[modality], float("-inf")), dim=-1)
    weights, experts = torch.topk(scores, topk, dim=-1)
    weights = weights * valid.unsqueeze(-1)  # padding contributes nothing
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, experts, True)
    probs = torch.zeros_like(scores).scatter(1, experts, weights)
    return probs, routing_map, scores


def sequence_balance_loss(
    scores: torch.Tensor,  # [seq, batch, experts]
    routing_map: torch.Tensor,  # [seq, batch, experts] bool
    tokens: torch.Tensor,  # [seq, batch] bool: the tokens this loss balances
    experts: torch.Tensor | None,  # long indices of the experts balanced, or None for all
    topk: int,
    reduce_group=None,
) -> torch.Tensor:
    """DeepSeek's sequence-level aux loss, E/(k T^2) sum_e P_e f_e averaged over sequences.

    P_e sums scores and f_e counts selections of expert e over the sequence's `tokens`; T is
    their number. Under sequence parallelism each rank holds a slice of every sequence: counts
    are summed over `reduce_group` and the returned loss is this rank's share (linear in P), so
    the shares add up to the full loss and gradients reach each rank's own scores.
    """
    if experts is not None:
        scores, routing_map = scores[..., experts], routing_map[..., experts]
    weight = tokens.unsqueeze(-1).to(scores.dtype)
    prob_sum = (scores * weight).sum(0)  # [batch, experts]
    with torch.no_grad():
        counts = (routing_map.to(scores.dtype) * weight).sum(0)  # [batch, experts]
        num_tokens = tokens.to(scores.dtype).sum(0)  # [batch]
        if reduce_group is not None and torch.distributed.get_world_size(reduce_group) > 1:
            stats = torch.cat([counts, num_tokens.unsqueeze(-1)], dim=-1)
            torch.distributed.all_reduce(stats, group=reduce_group)
            counts, num_tokens = stats[:, :-1], stats[:, -1]
    has_tokens = num_tokens > 0
    scale = scores.shape[-1] / (topk * num_tokens.clamp(min=1) ** 2)  # [batch]
    per_sequence = scale * (prob_sum * counts).sum(-1)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)
