"""One table of MoSTConfig fields: their DeepSeek-V2 config.json keys and MLATransformerConfig
fields, with the converters between them (as `convert.mapping.RULES` is for tensors).

    MoSTConfig field      config.json key              MLATransformerConfig field
    qk_nope_head_dim      qk_nope_head_dim             qk_head_dim
    first_k_dense         first_k_dense_replace        moe_layer_freq ([0] * k + [1] * rest)
    rope_factor           rope.factor                  rotary_scaling_factor
    ...

`rope.x` keys live in the YaRN parameters: transformers 5's `rope_parameters` (rope_theta
inside) or the hub's `rope_scaling` (rope_theta at the top level). `HF_CONSTANTS` are the
config.json settings MoST's architecture fixes; reading a config that differs is refused.
`MoSTConfig.transformer_config` and `convert.mapping`'s `config_from_hf` / `hf_config_fields`
are all driven by these tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

REQUIRED = object()
"""hf_default: config.json must have the key."""
KEEP = object()
"""hf_default: a missing key keeps the preset's value."""


@dataclasses.dataclass(frozen=True)
class Field:
    most: str
    """MoSTConfig attribute ("mamoe.x": a field of its MAMoEConfig)."""
    hf: str | None
    """DeepSeek-V2 config.json key ("rope.x": inside the YaRN parameters); None: not in HF."""
    megatron: str | None
    """MLATransformerConfig field; None: set elsewhere (vocabulary, MAMoE's megatron_fields)."""
    kind: type = int
    """Type of the value (config.json numbers are read through it)."""
    hf_default: Any = REQUIRED
    """Value when config.json lacks the key: REQUIRED, KEEP (the preset's) or a value."""
    read: bool = True
    """False: written to config.json but never read back (the preset's value is kept)."""
    to_megatron: Callable[[Any, Any], Any] | None = None
    """(value, MoSTConfig) -> the Megatron value, when it is not the value itself."""

    @property
    def in_rope(self) -> bool:
        return self.hf is not None and self.hf.startswith("rope.")

    @property
    def hf_key(self) -> str:
        return self.hf.removeprefix("rope.")

    def get(self, most):
        """This field's value in a MoSTConfig."""
        owner = most.mamoe if self.most.startswith("mamoe.") else most
        return getattr(owner, self.most.removeprefix("mamoe."))


def _moe_layers(first_k_dense: int, most) -> list[int]:
    return [0] * first_k_dense + [1] * (most.num_layers - first_k_dense)


FIELDS = (
    Field("num_layers", "num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size", "hidden_size"),
    Field("num_attention_heads", "num_attention_heads", "num_attention_heads"),
    Field("text_vocab_size", "vocab_size", None),
    # Query LoRA: config.json's q_lora_rank is an HF_CONSTANTS row (conversion supports None only).
    Field("q_lora_rank", None, "q_lora_rank"),
    Field("kv_lora_rank", "kv_lora_rank", "kv_lora_rank"),
    Field("qk_nope_head_dim", "qk_nope_head_dim", "qk_head_dim"),
    Field("qk_rope_head_dim", "qk_rope_head_dim", "qk_pos_emb_head_dim"),
    Field("v_head_dim", "v_head_dim", "v_head_dim"),
    Field("max_position_embeddings", "max_position_embeddings", None),
    Field("first_k_dense", "first_k_dense_replace", "moe_layer_freq", hf_default=0, to_megatron=_moe_layers),
    Field("dense_ffn_size", "intermediate_size", "ffn_hidden_size"),
    Field("moe_ffn_size", "moe_intermediate_size", "moe_ffn_hidden_size"),
    Field("rms_norm_eps", "rms_norm_eps", "layernorm_epsilon", float, KEEP),
    Field("init_std", "initializer_range", "init_method_std", float, KEEP),
    Field("rope_theta", "rope.rope_theta", "rotary_base", float),
    Field("rope_factor", "rope.factor", "rotary_scaling_factor", float),
    Field(
        "original_max_position_embeddings", "rope.original_max_position_embeddings", "original_max_position_embeddings"
    ),
    Field("beta_fast", "rope.beta_fast", "beta_fast", float, 32.0),
    Field("beta_slow", "rope.beta_slow", "beta_slow", float, 1.0),
    Field("mscale", "rope.mscale", "mscale", float, 1.0),
    Field("mscale_all_dim", "rope.mscale_all_dim", "mscale_all_dim", float, 0.0),
    Field("mamoe.num_experts", "n_routed_experts", None),
    Field("mamoe.topk", "num_experts_per_tok", None),
    Field("mamoe.balance_coeff", "aux_loss_alpha", None, float, read=False),
)
"""Shared experts are not a row: HF counts them (n_shared_experts x moe_intermediate_size wide),
MoST gives a width and a variant; convert.mapping converts them."""


@dataclasses.dataclass(frozen=True)
class Constant:
    key: str
    """config.json key."""
    value: Any
    """The only value MoST's architecture allows."""
    why: str | None
    """Why another value is refused; None: written, never checked on read."""


HF_CONSTANTS = (
    Constant(
        "q_lora_rank",
        None,
        "checkpoint conversion supports MLA without query LoRA only (DeepSeek-V2-Lite: null); "
        "MoSTConfig.q_lora_rank models (DeepSeek-V2) train and plan, but do not convert",
    ),
    Constant("topk_method", "greedy", "only 'greedy' is supported"),
    Constant("norm_topk_prob", False, "MAMoE does not renormalise top-k weights"),
    Constant("routed_scaling_factor", 1.0, "only 1.0 is supported"),
    Constant("scoring_func", "softmax", "only softmax is supported"),
    Constant("tie_word_embeddings", False, "MoSTModel keeps separate input/output tables"),
    Constant("hidden_act", "silu", "only silu (SwiGLU)"),
    Constant("moe_layer_freq", 1, "only 1 (every layer after the dense ones)"),
    Constant("n_group", 1, None),
    Constant("topk_group", 1, None),
    Constant("seq_aux", True, None),
    Constant("attention_bias", False, None),
    Constant("attention_dropout", 0.0, None),
)


def megatron_fields(most) -> dict:
    """MLATransformerConfig fields of the FIELDS rows that have one."""
    out = {}
    for field in FIELDS:
        if field.megatron is not None:
            value = field.get(most)
            out[field.megatron] = field.to_megatron(value, most) if field.to_megatron else value
    return out
