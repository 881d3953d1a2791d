"""Hugging Face remote code for exported MoST checkpoints.

`configuration_most.py` and `modeling_most.py` are self-contained (torch + transformers only):
an exporter copies them next to the weights and maps them in config.json (`write_remote_code`),
so that `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` runs the full model.

HF tensor names (DeepSeek-V2 hub layout + MoST extras):
    model.embed_tokens.weight            [padded vocab, hidden]  (all rows: text, markers, units, padding)
    lm_head.weight                       [padded vocab, hidden]
    model.norm.weight
    model.audio_projection.weight        [hidden, audio_feature_dim]   (MoST-C continuous path)
    model.audio_projection.bias          [hidden]
    model.layers.L.{input_layernorm,post_attention_layernorm}.weight
    model.layers.L.self_attn.{q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj}.weight
    model.layers.L.self_attn.kv_a_layernorm.weight
    model.layers.L.mlp.{gate_proj,up_proj,down_proj}.weight                 (dense layers)
    model.layers.L.mlp.gate.weight                                          (router, [experts, hidden])
    model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight       (one module per expert)
    model.layers.L.mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight
"""

from __future__ import annotations

import json
import pathlib
import shutil

HERE = pathlib.Path(__file__).resolve().parent
CODE_FILES = ("configuration_most.py", "modeling_most.py")
AUTO_MAP = {
    "AutoConfig": "configuration_most.MoSTHFConfig",
    "AutoModel": "modeling_most.MoSTModel",
    "AutoModelForCausalLM": "modeling_most.MoSTForCausalLM",
}
AUDIO_PROJECTION = ("model.audio_projection.weight", "model.audio_projection.bias")
"""HF names of the continuous-path projection (Megatron: audio_projection.{weight,bias})."""


def hf_config_dict(most, **overrides) -> dict:
    """config.json fields (without auto_map) of the MoST HF model for a MoSTConfig `most`."""
    mamoe = most.mamoe
    text, audio = mamoe.groups()
    shared = mamoe.shared_expert_size if mamoe.has_shared_experts else 0
    if shared % most.moe_ffn_size:
        raise ValueError(
            f"shared_expert_size={shared} is not a multiple of moe_ffn_size={most.moe_ffn_size}: "
            "HF shared experts are n_shared_experts * moe_intermediate_size wide"
        )
    fields = dict(
        model_type="most",
        architectures=["MoSTForCausalLM"],
        vocab_size=most.tokens.padded_size,
        text_vocab_size=most.text_vocab_size,
        num_units=most.num_units,
        audio_feature_dim=most.audio_feature_dim,
        text_experts=list(text),
        audio_experts=list(audio),
        masking=mamoe.masking,
        variant=mamoe.variant,
        hidden_size=most.hidden_size,
        intermediate_size=most.dense_ffn_size,
        num_hidden_layers=most.num_layers,
        num_attention_heads=most.num_attention_heads,
        num_key_value_heads=most.num_attention_heads,
        q_lora_rank=None,
        kv_lora_rank=most.kv_lora_rank,
        qk_nope_head_dim=most.qk_nope_head_dim,
        qk_rope_head_dim=most.qk_rope_head_dim,
        v_head_dim=most.v_head_dim,
        n_routed_experts=mamoe.num_experts,
        num_experts_per_tok=mamoe.topk,
        moe_intermediate_size=most.moe_ffn_size,
        n_shared_experts=shared // most.moe_ffn_size,
        first_k_dense_replace=most.first_k_dense,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rms_norm_eps=most.rms_norm_eps,
        initializer_range=most.init_std,
        tie_word_embeddings=False,
        max_position_embeddings=most.max_position_embeddings,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=most.rope_theta,
            factor=most.rope_factor,
            original_max_position_embeddings=most.original_max_position_embeddings,
            beta_fast=most.beta_fast,
            beta_slow=most.beta_slow,
            mscale=most.mscale,
            mscale_all_dim=most.mscale_all_dim,
        ),
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return fields


def hf_config(most, **overrides):
    """MoSTHFConfig for a MoSTConfig `most`."""
    from megatron_most.convert.hf_most.configuration_most import MoSTHFConfig

    fields = hf_config_dict(most, **overrides)
    fields.pop("model_type")
    return MoSTHFConfig(**fields)


def write_remote_code(out_dir) -> None:
    """Copy the two code files into `out_dir` and add `auto_map` (and model_type "most") to its
    config.json, which must exist already."""
    out = pathlib.Path(out_dir)
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, out / name)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config["model_type"] = "most"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["CODE_FILES", "AUTO_MAP", "AUDIO_PROJECTION", "hf_config_dict", "hf_config", "write_remote_code"]
