"""Decoder block specs: Transformer Engine modules on GPUs that have it, local modules elsewhere.

The local spec is Megatron's own `get_gpt_decoder_block_spec(use_transformer_engine=False)`
with its norms swapped for `model.norm.Norm` (supports sequence parallelism) and its core
attention for `model.attention.SDPACoreAttention` (takes MLA's separate value head width).
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_most.model.attention import SDPACoreAttention
from megatron_most.model.linear import LocalMLASelfAttention, ReplicatedLinear
from megatron_most.model.norm import Norm
from megatron_most.platform import has_transformer_engine


def map_spec(spec, visit):
    """Rebuild a spec tree (ModuleSpec / submodules dataclasses / lists), applying `visit` to
    every node after its children; `visit` returns the node or its replacement."""
    if isinstance(spec, (list, tuple)):
        spec = type(spec)(map_spec(s, visit) for s in spec)
    elif isinstance(spec, ModuleSpec):
        spec = dataclasses.replace(
            spec, module=map_spec(spec.module, visit), submodules=map_spec(spec.submodules, visit)
        )
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = dataclasses.replace(
            spec, **{f.name: map_spec(getattr(spec, f.name), visit) for f in dataclasses.fields(spec)}
        )
    return visit(spec)


def replace_module(spec, old: type, new: type):
    """Return `spec` with every `old` module class set to `new`."""
    return map_spec(spec, lambda node: new if node is old else node)


def decoder_block_spec(config: TransformerConfig, *, vp_stage: int | None = None, use_te: bool | None = None):
    """The block spec for this pipeline stage (dense and MoE layers per config.moe_layer_freq)."""
    use_te = has_transformer_engine() if use_te is None else use_te
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    if use_te:
        return spec
    spec = replace_module(replace_module(spec, WrappedTorchNorm, Norm), DotProductAttention, SDPACoreAttention)
    return _replicated_kv_down(spec)


def _replicated_kv_down(spec):
    """MLA's kv down-projection as ReplicatedLinear, in the attention module that accepts it
    (see model.linear)."""

    def visit(node):
        if isinstance(node, MLASelfAttentionSubmodules) and node.linear_kv_down_proj is ColumnParallelLinear:
            return dataclasses.replace(node, linear_kv_down_proj=ReplicatedLinear)
        if isinstance(node, ModuleSpec) and node.module is MLASelfAttention:
            return dataclasses.replace(node, module=LocalMLASelfAttention)
        return node

    return map_spec(spec, visit)
