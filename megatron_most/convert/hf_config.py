"""DeepSeek-V2 config.json <-> MoSTConfig, both directions driven by model.fields' tables.

`config_from_hf` reads the architecture of an HF config into a preset (which keeps what HF does
not describe: MAMoE groups and variant, audio paths, sequence length); `hf_config_fields`
writes a MoSTConfig back as DeepSeek-V2 fields (text vocabulary, routing without modality
masking). The YaRN parameters come as transformers 5's `rope_parameters` (rope_theta inside) or
the hub's `rope_scaling` with a top-level `rope_theta`; both are read, either is written.
Shared experts are the one correspondence that is not a plain row: HF counts them
(`n_shared_experts` x `moe_intermediate_size` wide), MoST gives their total width.

The MoST remote-code format (model_type "most", written by megatron-to-hf) adds `most_extras`:
the padded vocabulary as `vocab_size` with the text vocabulary in `text_vocab_size`, the audio
paths, the expert groups, masking and variant; `config_from_hf` reads them back, so an export
converts back to the same MoSTConfig whatever the preset.
"""

from __future__ import annotations

import dataclasses

from megatron_most.model.config import MoSTConfig
from megatron_most.model.fields import FIELDS, HF_CONSTANTS, KEEP, REQUIRED, Constant, Field
from megatron_most.options import ConfigError


def check_convertible(most: MoSTConfig) -> None:
    """ConfigError for an architecture the DeepSeek-V2 conversion has no tensors or keys for:
    a query LoRA (MoSTConfig.q_lora_rank; HF q_a_proj / q_a_layernorm / q_b_proj have no rows in
    convert.mapping, and writing q_lora_rank null would describe another model)."""
    if most.q_lora_rank is not None:
        raise ConfigError(
            f"MoSTConfig.q_lora_rank={most.q_lora_rank}: checkpoint conversion supports MLA without query LoRA "
            "only (q_lora_rank=None, as DeepSeek-V2-Lite); convert a model without it"
        )


def _rope_params(config: dict) -> dict:
    """The YaRN parameters of either form, rope_theta included."""
    params = config.get("rope_parameters") or config.get("rope_scaling")
    if not params:
        raise ConfigError("config.json has neither rope_parameters nor rope_scaling: DeepSeek-V2 uses YaRN RoPE")
    params = dict(params)
    kind = params.get("rope_type", params.get("type"))
    if kind != "yarn":
        raise ConfigError(f"config.json rope type {kind!r}: only 'yarn' (DeepSeek-V2) is supported")
    if params.get("rope_theta", config.get("rope_theta")) is None:
        raise ConfigError("config.json gives no rope_theta (top level or in rope_parameters)")
    params.setdefault("rope_theta", config.get("rope_theta"))
    return params


def _read(field: Field, config: dict, rope: dict, base: MoSTConfig):
    source = rope if field.in_rope else config
    if field.hf_key in source:
        return field.kind(source[field.hf_key])
    if field.hf_default is REQUIRED:
        where = "YaRN parameters lack" if field.in_rope else "lacks"
        raise ConfigError(f"config.json {where} {field.hf_key!r}")
    return field.get(base) if field.hf_default is KEEP else field.hf_default


def _allowed(constant: Constant, value) -> bool:
    if isinstance(constant.value, bool):
        return bool(value) == constant.value
    if isinstance(constant.value, (int, float)) and value is not None:
        return float(value) == constant.value
    return value == constant.value


def _check_constants(config: dict) -> None:
    for constant in HF_CONSTANTS:
        value = config.get(constant.key, constant.value)
        if constant.why is not None and not _allowed(constant, value):
            raise ConfigError(f"config.json: {constant.key}={value!r}: {constant.why}")
    heads = config.get("num_attention_heads")
    if config.get("num_key_value_heads", heads) != heads:
        raise ConfigError("config.json: num_key_value_heads != num_attention_heads: MLA has one key/value per head")


MOST_EXTRAS = (
    "text_vocab_size",
    "num_units",
    "audio_feature_dim",
    "text_experts",
    "audio_experts",
    "masking",
    "variant",
)


def most_extras(most: MoSTConfig) -> dict:
    """config.json fields the MoST format adds to (or, for vocab_size, changes in) DeepSeek-V2's."""
    text, audio = most.mamoe.groups()
    return dict(
        vocab_size=most.tokens.padded_size,
        text_vocab_size=most.text_vocab_size,
        num_units=most.num_units,
        audio_feature_dim=most.audio_feature_dim,
        text_experts=list(text),
        audio_experts=list(audio),
        masking=most.mamoe.masking,
        variant=most.mamoe.variant,
    )


def _read_most_extras(config: dict) -> tuple[dict, dict]:
    """(MoSTConfig changes, MAMoEConfig changes) of a MoST-format config.json."""
    missing = [key for key in MOST_EXTRAS if key not in config]
    if missing:
        raise ConfigError(f"config.json has model_type 'most' but lacks {missing}: not a megatron-to-hf MoST export")
    model = {key: config[key] for key in ("text_vocab_size", "num_units", "audio_feature_dim")}
    mamoe = {key: config[key] for key in ("masking", "variant")}
    mamoe.update(text_experts=tuple(config["text_experts"]), audio_experts=tuple(config["audio_experts"]))
    return model, mamoe


def config_from_hf(config: dict, base: MoSTConfig) -> MoSTConfig:
    """`base` (a preset) with the architecture of an HF DeepSeek-V2 config.json, or everything
    of a MoST-format one. Raises ConfigError on a config this converter cannot map."""
    _check_constants(config)
    rope = _rope_params(config)
    values = {f.most: _read(f, config, rope, base) for f in FIELDS if f.hf is not None and f.read}
    mamoe_changes = {k.removeprefix("mamoe."): values.pop(k) for k in list(values) if k.startswith("mamoe.")}
    variant = base.mamoe.variant
    if config.get("model_type") == "most":
        model_extras, mamoe_extras = _read_most_extras(config)
        values.update(model_extras)  # text_vocab_size replaces the padded vocab_size
        mamoe_changes.update(mamoe_extras)
        variant = mamoe_extras["variant"]
    if variant != "no_shared":
        mamoe_changes["shared_expert_size"] = int(config.get("n_shared_experts") or 0) * values["moe_ffn_size"]
    try:
        mamoe = dataclasses.replace(base.mamoe, **mamoe_changes)
    except ConfigError as e:
        raise ConfigError(
            f"config.json (n_routed_experts={mamoe_changes['num_experts']}, num_experts_per_tok="
            f"{mamoe_changes['topk']}) does not fit the preset's MAMoE settings: {e}"
        ) from e
    try:
        return base.replace(**values, mamoe=mamoe, seq_length=min(base.seq_length, values["max_position_embeddings"]))
    except ConfigError as e:
        raise ConfigError(f"config.json does not give a valid MoSTConfig: {e}") from e


def hf_config_fields(most: MoSTConfig, *, rope: str = "parameters", **overrides) -> dict:
    """DeepSeek-V2 config.json architecture fields of `most` (no architectures / model_type /
    dtype). `rope="parameters"` writes transformers 5's `rope_parameters`, `rope="scaling"` the
    hub's `rope_scaling` + top-level `rope_theta`. Used for the plain export, the MoST
    remote-code config and the test reference."""
    if rope not in ("parameters", "scaling"):
        raise ValueError(f"rope={rope!r}: choose 'parameters' or 'scaling'")
    check_convertible(most)
    mamoe = most.mamoe
    shared = mamoe.shared_expert_size if mamoe.has_shared_experts else 0
    if shared % most.moe_ffn_size:
        raise ConfigError(
            f"MAMoEConfig.shared_expert_size={shared} is not a multiple of moe_ffn_size={most.moe_ffn_size}: HF shared "
            "experts are n_shared_experts x moe_intermediate_size wide; choose a multiple"
        )
    fields = {c.key: c.value for c in HF_CONSTANTS}
    yarn = {}
    for field in FIELDS:
        if field.hf is not None:
            (yarn if field.in_rope else fields)[field.hf_key] = field.get(most)
    fields.update(num_key_value_heads=most.num_attention_heads, n_shared_experts=shared // most.moe_ffn_size)
    theta = yarn.pop("rope_theta")
    if rope == "parameters":
        fields["rope_parameters"] = dict(rope_type="yarn", rope_theta=theta, **yarn)
    else:
        fields.update(rope_theta=theta, rope_scaling=dict(type="yarn", **yarn))
    fields.update(overrides)
    return fields


__all__ = ["MOST_EXTRAS", "check_convertible", "config_from_hf", "hf_config_fields", "most_extras"]
