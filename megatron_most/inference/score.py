"""Log-likelihood of token spans under MoST: the score of spoken language modelling (sWUGGY,
sBLIMP, spoken and topic StoryCloze: a file's units, or a continuation's, given what precedes).

    scores = log_likelihood(model, [(ids, first_target), ...])   # [(sum, count), ...]

Sequences of a batch are right-padded (padding comes after every target, so causal attention
never sees it); each returns the summed log-probability of ids[first_target:] given the ids
before them, and how many tokens that is, so callers report the sum or the mean per token.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_most.options import require


@torch.no_grad()
def log_likelihood(model, items: list[tuple[list[int], int]], *, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-probability, tokens scored) of ids[first:] for each (ids, first) item."""
    out = []
    for start in range(0, len(items), batch_size):
        out += _batch(model, items[start : start + batch_size])
    return out


def _batch(model, items) -> list[tuple[float, int]]:
    for i, (ids, first) in enumerate(items):
        require(1 <= first < len(ids), f"item {i}: first target {first} must lie in [1, {len(ids)})")
        require(model.tokens.feature not in ids[first:], f"item {i}: <feat> positions are never scored")
        limit = model.most.max_position_embeddings
        require(len(ids) <= limit, f"item {i}: {len(ids)} tokens exceed the model's {limit} positions")
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), width, dtype=torch.long, device=device)
    scored = torch.zeros(len(items), width, dtype=torch.bool, device=device)  # positions whose token is scored
    for row, (seq, first) in enumerate(items):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
        scored[row, first : len(seq)] = True
    positions = torch.arange(width, device=device)[None].expand(len(items), -1)
    model.eval()
    logits = gather_from_tensor_model_parallel_region(model(ids, positions, None)).float()  # [b, s, vocab]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # the model's distribution (as trained) for positions 1..
    token_logprobs = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, s - 1]
    mask = scored[:, 1:]
    sums = (token_logprobs * mask).sum(-1)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), mask.sum(-1).tolist(), strict=True)]
