"""MoST language-model loss: masked next-token cross-entropy, reported for text and unit targets."""

from __future__ import annotations

import torch

from megatron_most.model.vocab import TokenLayout


def lm_loss(per_token_loss: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None, tokens: TokenLayout):
    """per_token_loss, labels, loss_mask: [batch, seq]. Returns (mean loss, report).

    <feat> placeholders are never targets (the model cannot emit a feature frame). The report
    holds the loss over text targets and over unit targets (TTS) separately, as sums and counts
    so that they average correctly over micro-batches and ranks.
    """
    mask = torch.ones_like(per_token_loss) if loss_mask is None else loss_mask.to(per_token_loss.dtype)
    mask = mask * (labels != tokens.feature)
    per_token_loss = per_token_loss.float()
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    unit = tokens.is_unit(labels).to(mask.dtype) * mask
    text = mask - unit
    report = {
        "loss": loss.detach().clone(),
        "text loss sum": (per_token_loss * text).sum().detach(),
        "text tokens": text.sum().detach(),
        "unit loss sum": (per_token_loss * unit).sum().detach(),
        "unit tokens": unit.sum().detach(),
    }
    return loss, report
