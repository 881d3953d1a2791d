"""Decoder block specs: Transformer Engine modules on GPUs that have it, local modules elsewhere.

The local spec is Megatron's own `get_gpt_decoder_block_spec(use_transformer_engine=False)`
with its norms swapped for `model.norm.Norm`, which supports sequence parallelism.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_most.model.norm import Norm
from megatron_most.platform import has_transformer_engine


def replace_module(spec, old: type, new: type):
    """Return `spec` (a ModuleSpec / submodules dataclass tree) with every `old` module set to `new`."""
    if spec is old:
        return new
    if isinstance(spec, (list, tuple)):
        return type(spec)(replace_module(s, old, new) for s in spec)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(
            spec,
            module=replace_module(spec.module, old, new),
            submodules=replace_module(spec.submodules, old, new),
        )
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: replace_module(getattr(spec, f.name), old, new) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


def decoder_block_spec(config: TransformerConfig, *, vp_stage: int | None = None, use_te: bool | None = None):
    """The block spec for this pipeline stage (dense and MoE layers per config.moe_layer_freq)."""
    use_te = has_transformer_engine() if use_te is None else use_te
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    return spec if use_te else replace_module(spec, WrappedTorchNorm, Norm)
