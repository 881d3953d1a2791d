"""Modality-balanced expert placement: which logical expert lives in which expert-parallel slot.

Megatron places experts contiguously: EP rank r holds experts r*n .. r*n+n-1. With the
release's text = 0..31 / audio = 32..63 split that puts all text experts on the first half of
the ranks, so a batch that is 80% text loads them 4x more than the audio ranks. Balanced
placement deals the text experts, then the audio experts, round-robin over the ranks, so every
rank holds the same share of each group (to within one expert). Logical ids stay what the
router, the checkpoints and the HF format use; only the physical slot changes.
"""

from __future__ import annotations

from megatron_most.moe.config import MAMoEConfig, check_expert_parallel


def logical_of_physical(config: MAMoEConfig, ep: int) -> list[int]:
    """Physical slot p (EP rank p // n_local, local index p % n_local) -> logical expert id."""
    check_expert_parallel(config, ep)
    if config.placement == "contiguous" or ep == 1:
        return list(range(config.num_experts))
    text, audio = config.groups()
    per_rank: list[list[int]] = [[] for _ in range(ep)]
    for i, expert in enumerate(text + audio):  # round-robin keeps ranks equal in size
        per_rank[i % ep].append(expert)
    return [expert for rank_experts in per_rank for expert in sorted(rank_experts)]


def rank_loads(tokens_per_expert, slots: list[int], ep: int) -> list[float]:
    """Tokens each EP rank receives, given tokens routed to each logical expert."""
    n_local = len(slots) // ep
    return [float(sum(tokens_per_expert[e] for e in slots[r * n_local : (r + 1) * n_local])) for r in range(ep)]
