"""One MAMoE (or Megatron MoE) layer built on its own, for layer tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

from megatron_most.model.spec import decoder_block_spec
from megatron_most.moe import mamoe_block_spec
from megatron_most.platform import fusion_settings


def layer_config(mamoe, *, hidden: int, moe_ffn: int, heads: int = 2, ffn: int | None = None, **overrides):
    """TransformerConfig of a SwiGLU/RMSNorm MoE layer with `mamoe`'s expert settings."""
    return TransformerConfig(
        **{
            "num_layers": 1,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "ffn_hidden_size": ffn or 4 * hidden,
            "moe_ffn_hidden_size": moe_ffn,
            "gated_linear_unit": True,
            "activation_func": F.silu,
            "add_bias_linear": False,
            "normalization": "RMSNorm",
            "params_dtype": torch.float32,
            "moe_layer_freq": 1,
            "hidden_dropout": 0.0,
            **mamoe.megatron_fields(),
            **fusion_settings(),
            **overrides,
        }
    )


def build_layer(config, mamoe=None, layer_number: int = 1):
    """The MoE layer of `config`'s block spec: MAMoE when `mamoe` is given, else Megatron's."""
    block = decoder_block_spec(config)
    if mamoe is not None:
        block = mamoe_block_spec(block, config, mamoe)
    return build_module(block.layer_specs[0].submodules.mlp, config=config, layer_number=layer_number)
