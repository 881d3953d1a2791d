"""HF DeepSeek-V2 <-> MoSTModel (TP = PP = EP = 1) names: ONE declarative table.

Each `Rule` names a MoSTModel state-dict key pattern (`{layer}`, `{expert}`), the HF tensor
name pattern(s) it comes from, and how the HF tensors become the Megatron tensor:

    copy     the HF tensor as is (cast to the model dtype)
    swiglu   cat([gate_proj, up_proj], 0) -> linear_fc1 (Megatron's SwiGLU fc1 = [gate; up])
    vocab    HF rows into the first `text_vocab_size` rows; the rows after them (audio markers,
             units, padding) newly initialised: seeded normal(0, init_std)
    new      no DeepSeek-V2 source: seeded normal(0, init_std) (`init="normal"`) or zeros; `hf`
             names the tensor in the MoST remote-code export (megatron-to-hf) only

`alternatives` lists other HF layouts of the same tensor, tried in order when the first is
absent (transformers' fused in-memory experts: `experts.gate_up_proj[E]`, `experts.down_proj[E]`;
those rules carry `stacked=True`: the HF tensor is indexed by the expert).

`where` says which layers a rule applies to: "all", "dense" (layers < first_k_dense), "moe",
"shared" (MoE layers with shared experts), or "model" (no layer).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable, Iterator

import torch

from megatron_most.model.config import MoSTConfig
from megatron_most.options import ConfigError


@dataclasses.dataclass(frozen=True)
class Source:
    """One HF layout of a tensor: names (one, or gate+up for swiglu) and how to combine."""

    names: tuple[str, ...]
    stacked: bool = False
    """The HF tensor(s) hold all experts stacked on dim 0; take row `{expert}`."""


@dataclasses.dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...] = ()
    kind: str = "copy"  # copy | swiglu | vocab | new
    where: str = "all"  # all | dense | moe | shared | model | audio_features
    alternatives: tuple[Source, ...] = ()
    init: str = "normal"  # for kind "new": normal | zeros
    fields: str = ""
    """HF config fields that set the shape (named in shape errors)."""

    def sources(self) -> tuple[Source, ...]:
        return (Source(self.hf),) + self.alternatives if self.hf else ()


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."

RULES: tuple[Rule, ...] = (
    Rule(
        "embedding.word_embeddings.weight",
        ("model.embed_tokens.weight",),
        "vocab",
        "model",
        fields="vocab_size x hidden_size",
    ),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", "model", fields="vocab_size x hidden_size"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), where="model", fields="hidden_size"),
    Rule("audio_projection.weight", ("model.audio_projection.weight",), "new", "audio_features"),
    Rule("audio_projection.bias", ("model.audio_projection.bias",), "new", "audio_features", init="zeros"),
    Rule(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",), fields="hidden_size"),
    Rule(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), fields="hidden_size"),
    Rule(
        _M + "self_attention.linear_q_proj.weight",
        (_L + "self_attn.q_proj.weight",),
        fields="num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim), hidden_size",
    ),
    Rule(
        _M + "self_attention.linear_kv_down_proj.weight",
        (_L + "self_attn.kv_a_proj_with_mqa.weight",),
        fields="kv_lora_rank + qk_rope_head_dim, hidden_size",
    ),
    Rule(_M + "self_attention.kv_layernorm.weight", (_L + "self_attn.kv_a_layernorm.weight",), fields="kv_lora_rank"),
    Rule(
        _M + "self_attention.linear_kv_up_proj.weight",
        (_L + "self_attn.kv_b_proj.weight",),
        fields="num_attention_heads x (qk_nope_head_dim + v_head_dim), kv_lora_rank",
    ),
    Rule(
        _M + "self_attention.linear_proj.weight",
        (_L + "self_attn.o_proj.weight",),
        fields="hidden_size, num_attention_heads x v_head_dim",
    ),
    Rule(
        _M + "mlp.linear_fc1.weight",
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        "swiglu",
        "dense",
        fields="intermediate_size, hidden_size",
    ),
    Rule(
        _M + "mlp.linear_fc2.weight",
        (_L + "mlp.down_proj.weight",),
        where="dense",
        fields="hidden_size, intermediate_size",
    ),
    Rule(_M + "mlp.router.weight", (_L + "mlp.gate.weight",), where="moe", fields="n_routed_experts, hidden_size"),
    Rule(
        _M + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
        (_L + "mlp.experts.{expert}.gate_proj.weight", _L + "mlp.experts.{expert}.up_proj.weight"),
        "swiglu",
        "moe",
        alternatives=(Source((_L + "mlp.experts.gate_up_proj",), stacked=True),),
        fields="moe_intermediate_size, hidden_size (n_routed_experts experts)",
    ),
    Rule(
        _M + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
        (_L + "mlp.experts.{expert}.down_proj.weight",),
        where="moe",
        alternatives=(Source((_L + "mlp.experts.down_proj",), stacked=True),),
        fields="hidden_size, moe_intermediate_size (n_routed_experts experts)",
    ),
    Rule(
        _M + "mlp.shared_experts.linear_fc1.weight",
        (_L + "mlp.shared_experts.gate_proj.weight", _L + "mlp.shared_experts.up_proj.weight"),
        "swiglu",
        "shared",
        fields="n_shared_experts x moe_intermediate_size, hidden_size",
    ),
    Rule(
        _M + "mlp.shared_experts.linear_fc2.weight",
        (_L + "mlp.shared_experts.down_proj.weight",),
        where="shared",
        fields="hidden_size, n_shared_experts x moe_intermediate_size",
    ),
)

IGNORED_HF = (re.compile(r".*\.rotary_emb\.inv_freq$"),)
"""HF tensors that carry no weights (old checkpoints store RoPE buffers)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One Megatron tensor: its rule instantiated for a layer/expert."""

    key: str
    rule: Rule
    layer: int | None = None
    expert: int | None = None

    def hf_names(self, source: Source) -> tuple[str, ...]:
        fill = {"layer": self.layer, "expert": self.expert}
        return tuple(n.format(**fill) for n in source.names)


def _layers(most: MoSTConfig, where: str) -> list[int | None]:
    moe = range(most.first_k_dense, most.num_layers)
    return {
        "model": [None],
        "audio_features": [None] if most.audio_feature_dim else [],
        "all": list(range(most.num_layers)),
        "dense": list(range(most.first_k_dense)),
        "moe": list(moe),
        "shared": list(moe) if most.mamoe.has_shared_experts else [],
    }[where]


def items(most: MoSTConfig) -> Iterator[Item]:
    """Every MoSTModel tensor (TP=PP=EP=1 state-dict key) for `most`, with its rule."""
    for rule in RULES:
        for layer in _layers(most, rule.where):
            experts = range(most.mamoe.num_experts) if "{expert}" in rule.megatron else [None]
            for expert in experts:
                yield Item(rule.megatron.format(layer=layer, expert=expert), rule, layer, expert)


def megatron_keys(most: MoSTConfig) -> list[str]:
    return [item.key for item in items(most)]


def choose_source(item: Item, has: Callable[[str], bool]) -> tuple[Source, tuple[str, ...]] | None:
    """The first HF layout of `item` whose tensors all exist; None for a "new" rule.
    Raises KeyError naming the expected tensors if no layout is complete."""
    if item.rule.kind == "new":
        return None
    tried = []
    for source in item.rule.sources():
        names = item.hf_names(source)
        if all(has(n) for n in names):
            return source, names
        tried.append([n for n in names if not has(n)])
    raise KeyError(f"{item.key}: HF tensor(s) {tried[0]} not found (needed for {item.rule.fields or 'this weight'})")


def _seeded_normal(key: str, shape, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.randn(shape, generator=gen) * std


def produce(
    item: Item,
    source,
    get: Callable[[str], torch.Tensor],
    shape,
    dtype,
    most: MoSTConfig,
    seed: int = 0,
    get_row: Callable[[str, int], torch.Tensor] | None = None,
):
    """The Megatron tensor of `item` ([shape], dtype) from HF tensors read with `get(name)`
    (`get_row(name, i)`, if given, reads one expert of a stacked tensor).
    `source` is choose_source's result. Swiglu returns [gate, up] (the writer's fc1 chunks)."""
    rule = item.rule
    if rule.kind == "new":
        if rule.init == "zeros":
            return torch.zeros(shape, dtype=dtype)
        return _seeded_normal(item.key, shape, most.init_std, seed).to(dtype)
    src, names = source
    if src.stacked:
        tensors = [get_row(n, item.expert) if get_row else get(n)[item.expert] for n in names]
    else:
        tensors = [get(n) for n in names]
    tensors = [t.to(dtype) for t in tensors]
    if rule.kind == "copy":
        return tensors[0].contiguous()
    if rule.kind == "swiglu":
        if len(tensors) == 1:  # a fused [gate; up] alternative
            half = tensors[0].shape[0] // 2
            return [tensors[0][:half].contiguous(), tensors[0][half:].contiguous()]
        return [t.contiguous() for t in tensors]
    if rule.kind == "vocab":
        rows = tensors[0]
        if rows.shape[0] == shape[0]:
            return rows.contiguous()
        table = torch.empty(shape, dtype=dtype)
        table[: rows.shape[0]] = rows
        table[rows.shape[0] :] = _seeded_normal(item.key, (shape[0] - rows.shape[0], *shape[1:]), most.init_std, seed)
        return table
    raise ValueError(f"unknown rule kind {rule.kind!r} for {item.key}")


# ---------------------------------------------------------------------------------------------
# config.json -> MoSTConfig


def _rope(config: dict) -> dict:
    """YaRN parameters from either form: the hub's `rope_scaling` (+ top-level rope_theta) or
    transformers 5's `rope_parameters` (rope_theta inside)."""
    params = config.get("rope_parameters") or config.get("rope_scaling")
    if not params:
        raise ConfigError("config.json has neither rope_parameters nor rope_scaling: DeepSeek-V2 uses YaRN RoPE")
    params = dict(params)
    kind = params.get("rope_type", params.get("type"))
    if kind != "yarn":
        raise ConfigError(f"config.json rope type {kind!r}: only 'yarn' (DeepSeek-V2) is supported")
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json gives no rope_theta (top level or in rope_parameters)")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in params:
            raise ConfigError(f"config.json YaRN parameters lack {key!r}")
    return dict(
        rope_theta=float(theta),
        rope_factor=float(params["factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        mscale=float(params.get("mscale", 1.0)),
        mscale_all_dim=float(params.get("mscale_all_dim", 0.0)),
    )


def config_from_hf(config: dict, base: MoSTConfig) -> MoSTConfig:
    """`base` (a preset: MAMoE groups/variant, audio paths, seq_length) with the architecture of
    an HF DeepSeek-V2 config.json. Raises ConfigError on a config this converter cannot map."""

    def need(key):
        if key not in config:
            raise ConfigError(f"config.json lacks {key!r}")
        return config[key]

    checks = [
        (
            config.get("q_lora_rank") is None,
            f"q_lora_rank={config.get('q_lora_rank')}: MoST's MLA has no query LoRA (DeepSeek-V2-Lite: null)",
        ),
        (
            config.get("topk_method", "greedy") == "greedy",
            f"topk_method={config.get('topk_method')!r}: only 'greedy' is supported",
        ),
        (not config.get("norm_topk_prob", False), "norm_topk_prob=true: MAMoE does not renormalise top-k weights"),
        (
            float(config.get("routed_scaling_factor", 1.0)) == 1.0,
            f"routed_scaling_factor={config.get('routed_scaling_factor')}: only 1.0 is supported",
        ),
        (
            config.get("scoring_func", "softmax") == "softmax",
            f"scoring_func={config.get('scoring_func')!r}: only softmax is supported",
        ),
        (
            config.get("num_key_value_heads", config.get("num_attention_heads")) == config.get("num_attention_heads"),
            "num_key_value_heads != num_attention_heads: MLA has one key/value per head",
        ),
        (
            not config.get("tie_word_embeddings", False),
            "tie_word_embeddings=true: MoSTModel keeps separate input/output tables",
        ),
        (config.get("hidden_act", "silu") == "silu", f"hidden_act={config.get('hidden_act')!r}: only silu (SwiGLU)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config.json: {message}")
    experts = int(need("n_routed_experts"))
    moe_ffn = int(need("moe_intermediate_size"))
    n_shared = int(config.get("n_shared_experts") or 0)
    num_layers = int(need("num_hidden_layers"))
    first_dense = int(config.get("first_k_dense_replace", 0))
    if int(config.get("moe_layer_freq", 1)) != 1:
        raise ConfigError(
            f"config.json moe_layer_freq={config['moe_layer_freq']}: only 1 (every layer after the dense ones)"
        )
    mamoe_changes = dict(num_experts=experts, topk=int(need("num_experts_per_tok")))
    if base.mamoe.variant != "no_shared":
        mamoe_changes["shared_expert_size"] = n_shared * moe_ffn
    try:
        mamoe = dataclasses.replace(base.mamoe, **mamoe_changes)
    except ConfigError as e:
        raise ConfigError(
            f"config.json (n_routed_experts={experts}, num_experts_per_tok={mamoe_changes['topk']}) does not fit the "
            f"preset's MAMoE settings: {e}"
        ) from e
    max_pos = int(need("max_position_embeddings"))
    changes = dict(
        num_layers=num_layers,
        hidden_size=int(need("hidden_size")),
        num_attention_heads=int(need("num_attention_heads")),
        text_vocab_size=int(need("vocab_size")),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        max_position_embeddings=max_pos,
        first_k_dense=first_dense,
        dense_ffn_size=int(need("intermediate_size")),
        moe_ffn_size=moe_ffn,
        rms_norm_eps=float(config.get("rms_norm_eps", base.rms_norm_eps)),
        init_std=float(config.get("initializer_range", base.init_std)),
        seq_length=min(base.seq_length, max_pos),
        mamoe=mamoe,
        **_rope(config),
    )
    try:
        return base.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"config.json does not give a valid MoSTConfig: {e}") from e


# ---------------------------------------------------------------------------------------------
# MoSTConfig -> config.json (the ONE field mapping; config_from_hf inverts it)


def hf_config_fields(most: MoSTConfig, *, rope: str = "parameters", **overrides) -> dict:
    """DeepSeek-V2 config.json architecture fields of `most` (no architectures / model_type /
    dtype): the text vocabulary, routing without modality masking. `rope="parameters"` writes
    transformers 5's `rope_parameters`, `rope="scaling"` the hub's `rope_scaling` + top-level
    `rope_theta`. Used for the plain export, the MoST remote-code config and the test reference."""
    mamoe = most.mamoe
    shared = mamoe.shared_expert_size if mamoe.has_shared_experts else 0
    if shared % most.moe_ffn_size:
        raise ConfigError(
            f"MAMoEConfig.shared_expert_size={shared} is not a multiple of moe_ffn_size={most.moe_ffn_size}: HF shared "
            "experts are n_shared_experts x moe_intermediate_size wide; choose a multiple"
        )
    yarn = dict(
        factor=most.rope_factor,
        original_max_position_embeddings=most.original_max_position_embeddings,
        beta_fast=most.beta_fast,
        beta_slow=most.beta_slow,
        mscale=most.mscale,
        mscale_all_dim=most.mscale_all_dim,
    )
    if rope == "parameters":
        rope_fields = dict(rope_parameters=dict(rope_type="yarn", rope_theta=most.rope_theta, **yarn))
    elif rope == "scaling":
        rope_fields = dict(rope_theta=most.rope_theta, rope_scaling=dict(type="yarn", **yarn))
    else:
        raise ValueError(f"rope={rope!r}: choose 'parameters' or 'scaling'")
    fields = dict(
        vocab_size=most.text_vocab_size,
        hidden_size=most.hidden_size,
        intermediate_size=most.dense_ffn_size,
        moe_intermediate_size=most.moe_ffn_size,
        num_hidden_layers=most.num_layers,
        num_attention_heads=most.num_attention_heads,
        num_key_value_heads=most.num_attention_heads,
        n_shared_experts=shared // most.moe_ffn_size,
        n_routed_experts=mamoe.num_experts,
        num_experts_per_tok=mamoe.topk,
        first_k_dense_replace=most.first_k_dense,
        moe_layer_freq=1,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=mamoe.balance_coeff,
        seq_aux=True,
        q_lora_rank=None,
        kv_lora_rank=most.kv_lora_rank,
        qk_nope_head_dim=most.qk_nope_head_dim,
        qk_rope_head_dim=most.qk_rope_head_dim,
        v_head_dim=most.v_head_dim,
        hidden_act="silu",
        max_position_embeddings=most.max_position_embeddings,
        initializer_range=most.init_std,
        rms_norm_eps=most.rms_norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        attention_dropout=0.0,
        **rope_fields,
    )
    fields.update(overrides)
    return fields


__all__ = [
    "RULES",
    "Rule",
    "Source",
    "Item",
    "items",
    "megatron_keys",
    "choose_source",
    "produce",
    "config_from_hf",
    "hf_config_fields",
]
