"""MAMoE: the Modality-Aware Mixture of Experts as a Megatron-Core router, dispatcher and layer.

The routing rule itself is in `moe/routing.py`.
"""

from megatron_most.moe.config import AUDIO, TEXT, MAMoEConfig
from megatron_most.moe.layer import MAMoELayer, pack_routing_info
from megatron_most.moe.router import MAMoERouter
from megatron_most.moe.spec import mamoe_block_spec

__all__ = ["AUDIO", "TEXT", "MAMoEConfig", "MAMoELayer", "MAMoERouter", "mamoe_block_spec", "pack_routing_info"]
