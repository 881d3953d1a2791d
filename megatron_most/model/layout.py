"""Layout arithmetic for a MoST model: how its layers and tensors split at a parallel layout.

Pure checks and counts on the configuration (no process group, no model): the estimator,
the converter and training refuse a layout here before any shard is read or any group waits.
"""

from __future__ import annotations

import math

from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_most.model.config import MoSTConfig
from megatron_most.options import ConfigError, require
from megatron_most.platform.layout import ParallelLayout


def stage_layers(
    most: MoSTConfig, layout: ParallelLayout, first: int | None = None, last: int | None = None
) -> list[tuple[int, int]]:
    """[start, end) decoder layers of each pipeline stage, by Megatron's own split functions."""

    n, pp = most.num_layers, layout.pp
    require(pp <= n, f"pipeline-parallel size {pp} exceeds the {n} decoder layers: lower --pp")
    overrides = {}
    if pp > 1 and first is not None:
        overrides["num_layers_in_first_pipeline_stage"] = first
    if pp > 1 and last is not None:
        overrides["num_layers_in_last_pipeline_stage"] = last
    try:
        config = most.transformer_config(layout, **overrides)
        spans = []
        for rank in range(pp):
            start = get_transformer_layer_offset(config, pp_rank=rank) if pp > 1 else 0
            spans.append((start, start + get_num_layers_to_build(config, pp_rank=rank)))
    except (ValueError, AssertionError) as err:
        raise ConfigError(
            f"{n} layers do not split over pp={pp} (first stage {first}, last stage {last}): {err}"
        ) from err
    covered = [i for a, b in spans for i in range(a, b)]
    require(
        covered == list(range(n)) and all(b > a for a, b in spans),
        f"pipeline split {spans} of {n} layers over pp={pp} is not a partition with a layer on every stage",
    )
    return spans


def check_layout(most: MoSTConfig, layout: ParallelLayout) -> None:
    """ConfigError unless every tensor Megatron splits divides evenly at `layout`."""
    layout.check_experts(most.mamoe.num_experts)
    tp, etp = layout.tp, layout.expert_tp
    checks = [
        ("num_attention_heads", most.num_attention_heads, tp, "--tp"),
        ("dense_ffn_size", most.dense_ffn_size, tp, "--tp"),
        ("moe_ffn_size", most.moe_ffn_size, etp, "--etp"),
    ]
    if most.mamoe.has_shared_experts:
        checks.append(("mamoe.shared_expert_size", most.mamoe.shared_expert_size, tp, "--tp"))
    rows = most.tokens.padded_size
    checks.append(("tokens.padded_size (padded vocabulary)", rows, tp, "--tp"))
    for field, value, size, flag in checks:
        require(
            value % size == 0,
            f"MoSTConfig.{field}={value} is not divisible by {flag.lstrip('-')}={size}: change {flag}",
        )


def default_world_size(layout: ParallelLayout) -> int:
    """Smallest world size the layout fits: lcm(tp*pp, etp*ep*pp) (one dense or expert replica)."""
    return math.lcm(layout.tp * layout.pp, layout.expert_tp * layout.ep * layout.pp)
