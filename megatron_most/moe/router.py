"""MAMoERouter: Megatron's TopKRouter with the modality-aware routing rule of moe.routing.

It plugs into Megatron's MoE layer through the layer spec (`MoESubmodules.router`) and keeps
TopKRouter's gating, input jitter and z-loss; only `routing` changes. It receives the
per-token routing info (see moe.layer: -1 padding, 0 text, 1 audio) where TopKRouter receives
`padding_mask`.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_most.moe import routing
from megatron_most.moe.config import MAMoEConfig
from megatron_most.moe.modality import AUDIO, PADDING, TEXT
from megatron_most.moe.stats import RoutingStats
from megatron_most.platform import init_device


class MAMoERouter(TopKRouter):
    def __init__(self, config, pg_collection=None, *, mamoe: MAMoEConfig):
        super().__init__(config, pg_collection=pg_collection)
        self.mamoe = mamoe
        self.groups = mamoe.groups()
        allowed = routing.group_masks(mamoe.num_experts, self.groups, device=init_device(config))
        self.register_buffer("allowed", allowed, persistent=False)
        self.stats = RoutingStats(mamoe.num_experts)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """logits [seq, batch, experts]; padding_mask is the routing info [seq, batch] (int8)."""
        seq, batch, num_experts = logits.shape
        info = (
            padding_mask
            if padding_mask is not None
            else torch.zeros(seq, batch, dtype=torch.int8, device=logits.device)
        )
        valid = info.reshape(-1) != PADDING  # [tokens]
        modality = info.reshape(-1).clamp(min=0).long()  # [tokens]
        logits = logits.reshape(-1, num_experts).float()  # [tokens, experts]
        logits = self.apply_z_loss(logits, ~valid)
        probs, routing_map, scores = routing.route(
            logits,
            modality,
            valid,
            self.allowed if self.mamoe.modality_routing else None,
            self.mamoe.topk,
            self.mamoe.masking,
        )
        if self.training and torch.is_grad_enabled() and self.mamoe.balance_coeff > 0:
            probs = self._attach_balance_loss(probs, scores, routing_map, valid, modality, (seq, batch))
        if self.training:  # validation batches are not training traffic
            self.stats.update(routing_map, probs, modality, valid)
        return probs, routing_map

    def _attach_balance_loss(self, probs, scores, routing_map, valid, modality, shape):
        seq, batch = shape
        view = lambda t: t.view(seq, batch, -1)  # noqa: E731 - [tokens, ...] -> [seq, batch, ...]
        group = self.tp_cp_group if self.config.sequence_parallel else None
        if self.mamoe.balance_loss == "global":
            terms = [("load_balancing_loss", valid, None)]
        else:
            text, audio = (torch.tensor(g, device=probs.device) for g in self.groups)
            terms = [
                ("text_load_balancing_loss", valid & (modality == TEXT), text),
                ("audio_load_balancing_loss", valid & (modality == AUDIO), audio),
            ]
        coeff = self.mamoe.balance_coeff
        for name, tokens, experts in terms:
            loss = routing.sequence_balance_loss(
                view(scores), view(routing_map), tokens.view(seq, batch), experts, self.mamoe.topk, group
            )
            probs = self.attach_and_log_load_balancing_loss(probs, coeff, loss * coeff, name, group or self.cp_group)
        return probs
