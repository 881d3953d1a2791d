"""Routed experts stored by logical expert id whatever their placement.

Megatron's expert modules (SequentialMLP, TEGroupedMLP for grouped GEMM, the legacy GroupedMLP)
label the checkpoint shard of local expert i on EP rank r as global expert r*n_local + i. With
modality-balanced placement that physical slot holds logical expert `slots[r*n_local + i]`, so
the placed variant of each class relabels its sharded state dict: every entry's offset along the
expert axis (or, in Megatron's singleton-shard layout, the expert index in the key) becomes the
logical id. Checkpoints stay in logical order and reload under any EP size, placement or expert
implementation. `placed_experts(cls)` makes that variant of any expert class.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_most.options import ConfigError


def relabel_experts(state: dict, axis: int, logical: dict[int, int], prefix: str, singleton: bool) -> dict:
    """`state` with physical expert indices replaced by logical ones (`logical[physical]`):
    along global-offset axis `axis`, or in the `{prefix}experts.{index}.` part of the keys when
    `singleton` (one checkpoint entry per expert)."""
    pattern = re.compile(rf"^{re.escape(prefix)}experts\.(\d+)\.")

    def fix(entry):
        if isinstance(entry, ShardedTensorFactory):
            build = entry.build_fn
            rebuilt = functools.partial(_relabel_built, build, fix)
            return dataclasses.replace(entry, key=_key(entry.key), build_fn=rebuilt)
        if not isinstance(entry, (ShardedTensor, ShardedObject)):
            return entry
        if singleton:
            return dataclasses.replace(entry, key=_key(entry.key))
        offset = list(entry.global_offset)
        offset[axis] = logical[offset[axis]]
        return dataclasses.replace(entry, global_offset=tuple(offset))

    def _key(key: str) -> str:
        if not singleton:
            return key
        match = pattern.match(key)
        if match is None:
            raise ConfigError(
                f"balanced expert placement cannot relabel the singleton-shard checkpoint key {key!r}; "
                "use MAMoEConfig.placement='contiguous' with this checkpoint format"
            )
        return f"{prefix}experts.{logical[int(match.group(1))]}." + key[match.end() :]

    return dict_list_map_outplace(fix, state)


def _relabel_built(build, fix, *args, **kwargs):
    return dict_list_map_outplace(fix, build(*args, **kwargs))


class _Placed:
    """Mixin for a Megatron expert class: `slots` maps physical slot -> logical expert id."""

    def __init__(self, *args, slots: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        n_local = self.num_local_experts
        first = self.ep_group.rank() * n_local
        self.logical_ids = slots[first : first + n_local]
        """Logical expert id of each local expert, in local order."""
        self._logical = dict(enumerate(slots))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        singleton = bool((metadata or {}).get("singleton_local_shards", False))
        return relabel_experts(state, len(sharded_offsets), self._logical, prefix, singleton)


@functools.cache
def placed_experts(cls: type) -> type:
    """The variant of expert class `cls` that checkpoints by logical expert id."""
    return type(f"Placed{cls.__name__}", (_Placed, cls), {"__doc__": f"{cls.__name__} under expert placement."})
