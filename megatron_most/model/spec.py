"""Decoder block specs: Transformer Engine modules on GPUs that have it, local modules elsewhere.

The local spec is Megatron's own `get_gpt_decoder_block_spec(use_transformer_engine=False)`
with its norms swapped for `model.norm.Norm` (supports sequence parallelism) and its core
attention for `model.attention.SDPACoreAttention` (takes MLA's separate value head width).

One checkpoint layout for both: the TE spec fuses MLA's kv norm into `linear_kv_up_proj` (and
the query norm into `linear_q_up_proj`) and a dense layer's pre-MLP norm into `linear_fc1`, so
its checkpoints name them `...linear_kv_up_proj.layer_norm_weight` and
`...mlp.linear_fc1.layer_norm_weight`. The local spec keeps separate norm modules and saves them
under those TE names (`TE_CHECKPOINT_NAMES`, Megatron's `sharded_state_dict_keys_map`), so a
checkpoint saved on a CPU loads into the TE model on a GPU and back, and the converter, the
exporter and the estimator, which build the local model, read and write the GPU layout.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP
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


TE_CHECKPOINT_NAMES = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
"""Local module prefix -> the TE spec's checkpoint prefix, every MLA layer."""
TE_DENSE_CHECKPOINT_NAMES = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
"""The same for dense (non-MoE) layers, whose TE MLP fuses the pre-MLP norm."""


def decoder_block_spec(config: TransformerConfig, *, vp_stage: int | None = None, use_te: bool | None = None):
    """The block spec for this pipeline stage (dense and MoE layers per config.moe_layer_freq)."""
    use_te = has_transformer_engine() if use_te is None else use_te
    if not use_te and config.moe_grouped_gemm:
        # Grouped GEMM is TE's TEGroupedMLP; Megatron's local alternative needs the grouped_gemm
        # CUDA package. Local specs use SequentialMLP (same checkpoint keys); only the spec reads the flag.
        config = copy.copy(config)
        config.moe_grouped_gemm = False
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    if use_te:
        return spec
    spec = replace_module(replace_module(spec, WrappedTorchNorm, Norm), DotProductAttention, SDPACoreAttention)
    spec = _replicated_kv_down(spec)
    return dataclasses.replace(spec, layer_specs=[_te_checkpoint_names(layer) for layer in spec.layer_specs])


def _te_checkpoint_names(layer: ModuleSpec) -> ModuleSpec:
    """Save the local layer's separate norms under the TE spec's fused names."""
    names = {}
    if layer.submodules.self_attention.module is LocalMLASelfAttention:
        names.update(TE_CHECKPOINT_NAMES)
    if layer.submodules.mlp.module is MLP:
        names.update(TE_DENSE_CHECKPOINT_NAMES)
    names.update(layer.submodules.sharded_state_dict_keys_map)
    return dataclasses.replace(
        layer, submodules=dataclasses.replace(layer.submodules, sharded_state_dict_keys_map=names)
    )


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
