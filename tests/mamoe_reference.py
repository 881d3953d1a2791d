"""A plain-PyTorch MAMoE layer (no Megatron), written from MOST_SPEC.md, used as the reference."""

import torch
import torch.nn.functional as F


def swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def route(logits, modality, padding, groups, topk, masking, vanilla):
    """Per-token loop over the routing rule; returns routing scores [T, E] and (idx, weight) lists."""
    num_tokens, num_experts = logits.shape
    scores = []
    for t in range(num_tokens):
        allowed = torch.zeros(num_experts, dtype=torch.bool)
        allowed[list(range(num_experts)) if vanilla else list(groups[int(modality[t])])] = True
        if vanilla:
            p = torch.softmax(logits[t], -1)
        elif masking == "zero_after_softmax":
            p = torch.softmax(logits[t], -1) * allowed
        else:
            p = torch.zeros(num_experts).index_put((allowed.nonzero().view(-1),), torch.softmax(logits[t][allowed], -1))
        scores.append(p)
    scores = torch.stack(scores)
    weights, idx = scores.topk(topk, dim=-1)
    weights = weights * (~padding).unsqueeze(-1)
    return scores, idx, weights


def balance_loss(scores, idx, modality, padding, groups, topk, per_group, seq, batch):
    """DeepSeek sequence-level aux loss: mean over sequences of E/(k T^2) sum_e P_e f_e."""
    num_experts = scores.shape[-1]
    selected = torch.zeros_like(scores).scatter(1, idx, 1.0)
    terms = (
        [(~padding, list(range(num_experts)))]
        if not per_group
        else [((~padding) & (modality == g), list(groups[g])) for g in (0, 1)]
    )
    total = 0.0
    for tokens, experts in terms:
        losses = []
        for b in range(batch):
            rows = [s * batch + b for s in range(seq) if tokens[s * batch + b]]
            if not rows:
                continue
            P = scores[rows][:, experts].sum(0)
            f = selected[rows][:, experts].sum(0)
            losses.append(len(experts) / (topk * len(rows) ** 2) * (P * f).sum())
        if losses:
            total = total + torch.stack(losses).mean()
    return total


def mamoe_forward(h, weights, modality, padding, groups, topk, masking, vanilla, shared, coeff, per_group):
    """h [seq, batch, hidden]; modality/padding [batch, seq]. Returns (output, aux loss)."""
    seq, batch, hidden = h.shape
    x = h.reshape(-1, hidden)  # [tokens, hidden], token t = s * batch + b
    mod = modality.t().reshape(-1)
    pad = padding.t().reshape(-1)
    logits = x.float() @ weights["router"].t()
    scores, idx, w = route(logits, mod, pad, groups, topk, masking, vanilla)
    out = torch.zeros_like(x)
    for e, (fc1, fc2) in enumerate(weights["experts"]):  # loop over experts
        hit = idx == e  # [tokens, topk]
        rows = hit.any(-1).nonzero().view(-1)
        if len(rows):
            gate = (w * hit).sum(-1)[rows].unsqueeze(-1)
            out = out.index_add(0, rows, gate * swiglu(x[rows], fc1, fc2))
    if shared:
        out = out + swiglu(x, *weights["shared"])
    aux = coeff * balance_loss(scores, idx, mod, pad, groups, topk, per_group, seq, batch) if coeff else 0.0
    return out.view(seq, batch, hidden), aux, idx
