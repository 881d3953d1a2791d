"""MAMoE all-to-all token dispatcher: Megatron's alltoall dispatcher with expert placement.

The router works in logical expert ids; Megatron's dispatcher sends column p of the routing
map to the EP rank that holds physical slot p. Reordering the columns once (physical slot p
takes logical expert `logical_of_physical[p]`) before dispatch is all placement needs: the
combine step works per token with the stored routing map, so no inverse is required. It runs
unchanged on NCCL and gloo (platform.compat_cpu supplies the CUDA stream stand-ins on CPUs).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


class MAMoEAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None, *, slots: list[int]):
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        identity = slots == sorted(slots)
        self.slots = None if identity else torch.tensor(slots, dtype=torch.long)

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        # routing_map, probs: [tokens, experts] in logical order -> physical slot order
        if self.slots is not None:
            slots = self.slots.to(routing_map.device)
            routing_map, probs = routing_map[:, slots], probs[:, slots]
        return super().dispatch_preprocess(hidden_states, routing_map, probs)
