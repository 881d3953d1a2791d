"""Routed experts stored by logical expert id whatever their placement.

Megatron's SequentialMLP labels the checkpoint shard of local expert i on EP rank r as global
expert r*n_local + i. With modality-balanced placement that slot holds logical expert
`slots[r*n_local + i]`, so this subclass labels it that way: checkpoints stay in logical order
and reload under any EP size or placement.
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group


class PlacedSequentialMLP(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection=None, *, slots: list[int]):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        first = self.ep_group.rank() * num_local_experts
        self.logical_ids = slots[first : first + num_local_experts]
        """Logical expert id of each local expert, in local order."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # Same layout as SequentialMLP.sharded_state_dict; only the expert index differs.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        num_experts = self.ep_group.size() * self.num_local_experts
        state = {}
        for local, (expert, logical) in enumerate(zip(self.local_experts, self.logical_ids)):
            local_prefix = f"{prefix}local_experts.{local}."
            if singleton:
                sharded_prefix, offsets = f"{prefix}experts.{logical}.", sharded_offsets
            else:
                sharded_prefix = f"{prefix}experts."
                offsets = (*sharded_offsets, (len(sharded_offsets), logical, num_experts))
            expert_state = expert.sharded_state_dict(local_prefix, offsets, metadata)
            replace_prefix_for_sharding(expert_state, local_prefix, sharded_prefix)
            for sharded in expert_state.values():  # replicated along expert-data-parallel ranks
                sharded.replica_id = (*sharded.replica_id[:2], self.dp_group.rank())
            state.update(expert_state)
        return state
