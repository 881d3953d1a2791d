"""MAMoE: the Modality-Aware Mixture of Experts as a Megatron-Core router, dispatcher and layer.

Floor 2 (above `platform`, beside `audio`): it imports Megatron-Core, `options` and `platform`
only. The routing rule is in `moe/routing.py`, the modality ids in `moe/modality.py`; a block
spec from `model` goes in through `mamoe_block_spec`'s argument.
"""

from megatron_most.moe.config import MAMoEConfig
from megatron_most.moe.layer import MAMoELayer
from megatron_most.moe.modality import AUDIO, NAMES, PADDING, TEXT, pack_routing_info
from megatron_most.moe.router import MAMoERouter
from megatron_most.moe.spec import mamoe_block_spec

__all__ = [
    "AUDIO",
    "NAMES",
    "PADDING",
    "TEXT",
    "MAMoEConfig",
    "MAMoELayer",
    "MAMoERouter",
    "mamoe_block_spec",
    "pack_routing_info",
]
