"""One checkpoint layout for the Transformer Engine and the local specs.

The local MoST model (CPU, converter, exporter, estimator) must save every tensor under the key
Megatron's TE spec gives it, so checkpoints move between CPU and GPU runs. The TE keys below are
data, read off Megatron-Core 0.16.1's `megatron/core/models/gpt/gpt_layer_specs.py`,
`get_gpt_layer_with_transformer_engine_spec(multi_latent_attention=True, qk_layernorm=True)`:
`input_layernorm=TENorm`; MLA with `linear_q_proj` (no query LoRA), `linear_kv_down_proj=TELinear`
(duplicated), `linear_kv_up_proj=TELayerNormColumnParallelLinear` (kv norm fused:
`layer_norm_weight`), `linear_proj`; dense layers have `pre_mlp_layernorm=IdentityOp` and an MLP
whose `linear_fc1` is a TELayerNormColumnParallelLinear (pre-MLP norm fused); MoE layers keep
`pre_mlp_layernorm=TENorm`, the router, experts (TEGroupedMLP and SequentialMLP share the
`experts.experts.linear_fc{1,2}` keys) and shared experts. `_extra_state` objects are TE's FP8
metadata and are not tensors of the model.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from tests.multiproc import run_distributed

TE_ATTENTION = (
    "input_layernorm.weight",
    "self_attention.linear_q_proj.weight",
    "self_attention.linear_kv_down_proj.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight",
    "self_attention.linear_kv_up_proj.weight",
    "self_attention.linear_proj.weight",
)
TE_DENSE_MLP = ("mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
TE_MOE_MLP = (
    "pre_mlp_layernorm.weight",
    "mlp.router.weight",
    "mlp.experts.experts.linear_fc1.weight",
    "mlp.experts.experts.linear_fc2.weight",
    "mlp.shared_experts.linear_fc1.weight",
    "mlp.shared_experts.linear_fc2.weight",
)
TE_MODEL = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
    "audio_projection.weight",
    "audio_projection.bias",
)


def te_keys(num_layers: int, first_k_dense: int) -> set[str]:
    keys = set(TE_MODEL)
    for layer in range(num_layers):
        mlp = TE_DENSE_MLP if layer < first_k_dense else TE_MOE_MLP
        keys.update(f"decoder.layers.{layer}.{name}" for name in TE_ATTENTION + mlp)
    return keys


def _local_keys():
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_most.model.config import preset
    from megatron_most.model.most import build_model, single_rank_groups

    most = preset("tiny")
    with single_rank_groups(most):
        model = build_model(most, most.transformer_config(), use_te=False)
        values = nested_values(model.sharded_state_dict())
    keys = set()
    for value in values:
        if isinstance(value, ShardedObject):
            continue
        keys.add(value.key)
    return keys, most.num_layers, most.first_k_dense


def test_local_model_saves_the_te_spec_keys():
    keys, layers, dense = run_distributed(_local_keys, 1)[0]
    expected = te_keys(layers, dense)
    assert keys == expected, (sorted(keys - expected), sorted(expected - keys))


def _roundtrip(tmp):
    """Local checkpoint -> load without TE extra state; a missing real tensor is named."""
    import pytest
    from megatron.core import dist_checkpointing

    from megatron_most.model.checkpoint import CheckpointKeyError, load_values
    from megatron_most.model.config import preset
    from megatron_most.model.most import build_model, single_rank_groups

    most = preset("tiny")
    with single_rank_groups(most):
        model = build_model(most, most.transformer_config(), use_te=False)
        state = model.sharded_state_dict()
        # drop every _extra_state object from what is saved: a TE model's extra state is absent too
        saved = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
        (tmp / "no_extra").mkdir()
        dist_checkpointing.save(saved, str(tmp / "no_extra"))
        values = load_values(model, tmp / "no_extra")
        same = all(torch.equal(values[n], p) for n, p in model.named_parameters())
        partial = {k: v for k, v in saved.items() if "router" not in k}
        (tmp / "no_router").mkdir()
        dist_checkpointing.save(partial, str(tmp / "no_router"))
        with pytest.raises(CheckpointKeyError, match="router"):
            load_values(model, tmp / "no_router")
    return same


def test_loading_tolerates_only_missing_te_extra_state(tmp_path):
    assert run_distributed(_roundtrip, 1, args=(tmp_path,))[0]


def _grouped_expert_entries(ep_rank: int, n_local: int, n_experts: int, swiglu: bool):
    """What TEGroupedMLP / SequentialMLP put in a sharded state dict for this EP rank's experts,
    made with Megatron's own helpers (expert axis 0, global index ep_rank * n_local + i)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    state = {}
    for i in range(n_local):
        physical = ep_rank * n_local + i
        weight = torch.full((4, 3), float(physical))
        tensor = ShardedTensor_from_rank_offsets(
            f"experts.linear_fc{1 if swiglu else 2}.weight", weight, physical, n_experts
        )
        state[f"weight{i}"] = apply_swiglu_sharded_factory(tensor, ((0, physical, n_experts),)) if swiglu else tensor
    return state


def ShardedTensor_from_rank_offsets(key, data, physical, n_experts):  # noqa: N802 - mirrors Megatron's name
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(
        key, data, (0, physical, n_experts), replica_id=(0, 0, 0), prepend_axis_num=1
    )


def test_placed_experts_relabel_grouped_gemm_shards_by_logical_id():
    """Balanced placement with grouped-GEMM experts: every shard (plain and SwiGLU factory) lands
    at its logical expert's offset. Known answer: slots [0, 2, 1, 3] at EP2."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_most.moe.experts import relabel_experts

    slots = [0, 2, 1, 3]  # physical slot -> logical expert: rank 0 holds 0 and 2, rank 1 holds 1 and 3
    for swiglu in (False, True):
        for rank in (0, 1):
            state = _grouped_expert_entries(rank, 2, 4, swiglu)
            relabelled = relabel_experts(state, 0, dict(enumerate(slots)), "", singleton=False)
            for i in range(2):
                entry = relabelled[f"weight{i}"]
                built = entry.build_fn(entry.key, entry.data, entry.replica_id, None) if swiglu else entry
                assert isinstance(entry, ShardedTensorFactory if swiglu else ShardedTensor)
                for tensor in built if isinstance(built, list) else [built]:
                    assert tensor.global_offset[0] == slots[rank * 2 + i], (swiglu, rank, i, tensor.global_offset)
                    assert float(tensor.data.flatten()[0]) == rank * 2 + i  # the weights themselves stay
