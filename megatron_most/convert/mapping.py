"""HF DeepSeek-V2 <-> MoSTModel (TP = PP = EP = 1) names: ONE declarative table.

Each `Rule` names a MoSTModel state-dict key pattern (`{layer}`, `{expert}`), the HF tensor
name pattern(s) it comes from, and how the HF tensors become the Megatron tensor:

    copy     the HF tensor as is (cast to the model dtype)
    swiglu   cat([gate_proj, up_proj], 0) -> linear_fc1 (Megatron's SwiGLU fc1 = [gate; up])
    vocab    HF rows into the first `text_vocab_size` rows; the rows after them (audio markers,
             units, padding) newly initialised: seeded normal(0, init_std)
    new      no DeepSeek-V2 source: seeded normal(0, init_std) (`init="normal"`) or zeros; `hf`
             names the tensor in the MoST remote-code export, from which hf-to-megatron copies
             it back

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

from megatron_most.convert.hf_config import check_convertible
from megatron_most.model.config import MoSTConfig


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
    """Every MoSTModel tensor (TP=PP=EP=1 state-dict key) for `most`, with its rule
    (ConfigError for an architecture the table does not cover: hf_config.check_convertible)."""
    check_convertible(most)
    for rule in RULES:
        for layer in _layers(most, rule.where):
            experts = range(most.mamoe.num_experts) if "{expert}" in rule.megatron else [None]
            for expert in experts:
                yield Item(rule.megatron.format(layer=layer, expert=expert), rule, layer, expert)


def megatron_keys(most: MoSTConfig) -> list[str]:
    return [item.key for item in items(most)]


def choose_source(item: Item, has: Callable[[str], bool]) -> tuple[Source, tuple[str, ...]] | None:
    """The first HF layout of `item` whose tensors all exist. A "new" rule has none in a
    DeepSeek-V2 checkpoint (None: initialise it) but is copied from a MoST-format export, which
    holds it under `hf`. Raises KeyError naming the expected tensors if no layout is complete."""
    if item.rule.kind == "new":
        names = item.hf_names(Source(item.rule.hf))
        return (Source(item.rule.hf), names) if names and all(has(n) for n in names) else None
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
    if rule.kind == "new" and source is None:
        if rule.init == "zeros":
            return torch.zeros(shape, dtype=dtype)
        return _seeded_normal(item.key, shape, most.init_std, seed).to(dtype)
    src, names = source
    if src.stacked:
        tensors = [get_row(n, item.expert) if get_row else get(n)[item.expert] for n in names]
    else:
        tensors = [get(n) for n in names]
    tensors = [t.to(dtype) for t in tensors]
    if rule.kind in ("copy", "new"):  # "new" with a source: a MoST-format export holds it
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


__all__ = [
    "RULES",
    "Rule",
    "Source",
    "Item",
    "items",
    "megatron_keys",
    "choose_source",
    "produce",
]
