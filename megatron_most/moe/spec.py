"""Layer specs with MAMoE: Megatron's decoder block spec with its MoE layers turned into MAMoE.

Router, dispatcher and experts plug in through Megatron's ModuleSpec/build_module points;
the dense layers, attention and norms are whatever `model.spec.decoder_block_spec` chose
(Transformer Engine on GPUs, local modules elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_most.moe.config import MAMoEConfig
from megatron_most.moe.experts import placed_experts
from megatron_most.moe.layer import MAMoELayer
from megatron_most.moe.placement import logical_of_physical
from megatron_most.moe.router import MAMoERouter
from megatron_most.options import ConfigError


def mamoe_block_spec(block, config, mamoe: MAMoEConfig):
    """`block` (a decoder block spec for this pipeline stage, e.g. `model.spec.decoder_block_spec`)
    with every MoE layer a MAMoE layer."""
    if config.num_moe_experts != mamoe.num_experts:
        raise ConfigError(
            f"TransformerConfig.num_moe_experts={config.num_moe_experts} but MAMoEConfig.num_experts="
            f"{mamoe.num_experts}: build the config with mamoe.megatron_fields()"
        )
    slots = logical_of_physical(mamoe, parallel_state.get_expert_model_parallel_world_size())
    return dataclasses.replace(block, layer_specs=[_to_mamoe(layer, mamoe, slots) for layer in block.layer_specs])


def _to_mamoe(layer_spec: ModuleSpec, mamoe: MAMoEConfig, slots: list[int]) -> ModuleSpec:
    mlp = layer_spec.submodules.mlp
    if mlp.module is not MoELayer:
        return layer_spec
    experts = mlp.submodules.experts  # SequentialMLP, TEGroupedMLP or GroupedMLP: checkpoint by logical id
    experts = dataclasses.replace(
        experts, module=placed_experts(experts.module), params={**experts.params, "slots": slots}
    )
    submodules = dataclasses.replace(
        mlp.submodules, experts=experts, router=functools.partial(MAMoERouter, mamoe=mamoe)
    )
    moe = dataclasses.replace(
        mlp, module=MAMoELayer, submodules=submodules, params={**mlp.params, "mamoe": mamoe, "slots": slots}
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=moe))
