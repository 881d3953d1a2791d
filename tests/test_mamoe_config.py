"""Bad MAMoE settings and inputs fail early with a message naming the field and value; expert
placement against hand-worked answers."""

import re

import pytest
import torch

from megatron_most.moe import MAMoEConfig, pack_routing_info
from megatron_most.moe.config import check_expert_parallel
from megatron_most.moe.placement import logical_of_physical, rank_loads
from megatron_most.options import ConfigError
from tests.multiproc import run_distributed

# ---------------------------------------------------------------------------- MAMoEConfig


def test_defaults_are_the_release_split():
    text, audio = MAMoEConfig().groups()
    assert text == tuple(range(32)) and audio == tuple(range(32, 64))


def test_overlapping_groups_rejected():
    with pytest.raises(ConfigError, match=r"experts \[3, 4\] are in both text_experts and audio_experts"):
        MAMoEConfig(num_experts=8, text_experts=(0, 1, 2, 3, 4), audio_experts=(3, 4, 5, 6, 7), topk=2)


def test_expert_in_neither_group_rejected():
    with pytest.raises(ConfigError, match=r"experts \[7\] are in neither group"):
        MAMoEConfig(num_experts=8, text_experts=(0, 1, 2, 3), audio_experts=(4, 5, 6), topk=2)


@pytest.mark.parametrize("field", ["text_experts", "audio_experts"])
def test_index_out_of_range_rejected(field):
    groups = {"text_experts": (0, 1, 2, 3), "audio_experts": (4, 5, 6, 7)}
    groups[field] = groups[field] + (8,)
    with pytest.raises(ConfigError, match=rf"MAMoEConfig\.{field} has indices \[8\] outside 0\.\.7"):
        MAMoEConfig(num_experts=8, topk=2, **groups)


def test_negative_index_rejected():
    with pytest.raises(ConfigError, match=r"text_experts has indices \[-1\] outside 0\.\.7"):
        MAMoEConfig(num_experts=8, text_experts=(-1, 0, 1, 2), audio_experts=(3, 4, 5, 6, 7), topk=2)


@pytest.mark.parametrize("field", ["text_experts", "audio_experts"])
def test_empty_group_rejected(field):
    other = "audio_experts" if field == "text_experts" else "text_experts"
    with pytest.raises(ConfigError, match=rf"MAMoEConfig\.{field} is empty"):
        MAMoEConfig(num_experts=8, topk=1, **{field: (), other: tuple(range(8))})


def test_repeated_index_rejected():
    with pytest.raises(ConfigError, match=r"audio_experts repeats an expert index"):
        MAMoEConfig(num_experts=8, text_experts=(0, 1, 2, 3), audio_experts=(4, 5, 6, 7, 7), topk=2)


def test_topk_larger_than_a_group_rejected():
    # 5 text experts and 3 audio experts: top-4 does not fit the audio group.
    with pytest.raises(ConfigError, match=r"topk=4 is larger than the smallest expert group \(3 experts\)"):
        MAMoEConfig(num_experts=8, text_experts=(0, 1, 2, 3, 4), topk=4)
    # The default 32/32 split of 64 experts: top-33 does not fit.
    with pytest.raises(ConfigError, match=r"topk=33 is larger than the smallest expert group \(32 experts\)"):
        MAMoEConfig(topk=33)
    # Without modality routing only the total counts.
    MAMoEConfig(num_experts=8, text_experts=(0, 1, 2, 3, 4), topk=4, variant="vanilla")
    with pytest.raises(ConfigError, match=r"topk=9 > num_experts=8"):
        MAMoEConfig(num_experts=8, topk=9, variant="vanilla")


@pytest.mark.parametrize(
    "values, pattern",
    [
        (dict(topk=0), r"MAMoEConfig\.topk=0"),
        (dict(num_experts=1, topk=1), r"MAMoEConfig\.num_experts=1"),
        (dict(balance_coeff=-0.1), r"MAMoEConfig\.balance_coeff=-0\.1"),
        (dict(shared_expert_size=-1), r"MAMoEConfig\.shared_expert_size=-1"),
    ],
)
def test_bad_scalars_rejected(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MAMoEConfig(**values)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"MAMoEConfig: unknown field 'top_k'; did you mean 'topk'\?"):
        MAMoEConfig.from_dict({"num_experts": 8, "top_k": 2})
    with pytest.raises(ConfigError, match=r"unknown field 'zzzz'; valid fields: \[.*'text_experts'.*\]"):
        MAMoEConfig.from_dict({"zzzz": 1})


def test_from_dict_accepts_lists():
    # YAML / JSON give lists, not tuples.
    config = MAMoEConfig.from_dict({"num_experts": 8, "text_experts": [7, 0, 1], "topk": 2})
    assert config.groups() == ((0, 1, 7), (2, 3, 4, 5, 6))


def test_40_24_partition_accepted():
    config = MAMoEConfig(num_experts=64, text_experts=tuple(range(40)), topk=6)
    assert config.groups() == (tuple(range(40)), tuple(range(40, 64)))
    explicit = MAMoEConfig(num_experts=64, text_experts=tuple(range(40)), audio_experts=tuple(range(40, 64)), topk=6)
    assert explicit.groups() == config.groups()


def test_ablation_variants_by_configuration():
    config = MAMoEConfig(num_experts=8, topk=2, variant="no_shared")
    assert not config.has_shared_experts and config.megatron_fields()["moe_shared_expert_intermediate_size"] is None
    assert MAMoEConfig(num_experts=8, topk=2, variant="vanilla").modality_routing is False


@pytest.mark.parametrize("ep", [3, 5, 7, 128])
def test_expert_parallel_must_divide_experts(ep):
    with pytest.raises(ConfigError, match=rf"expert-parallel size {ep} does not divide MAMoEConfig\.num_experts=64"):
        check_expert_parallel(MAMoEConfig(), ep)
    with pytest.raises(ConfigError, match=rf"expert-parallel size {ep} does not divide"):
        logical_of_physical(MAMoEConfig(), ep)


@pytest.mark.parametrize("ep", [1, 2, 4, 8, 16, 32, 64])
def test_expert_parallel_dividing_experts_accepted(ep):
    check_expert_parallel(MAMoEConfig(), ep)


# ---------------------------------------------------------------------------- pack_routing_info


def test_pack_routing_info_known_answer():
    modality = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    padding = torch.tensor([[False, False, True, True], [False, False, False, True]])
    info = pack_routing_info(modality, padding)
    assert info.dtype == torch.int8
    assert info.tolist() == [[0, 1, -1, -1], [1, 1, 0, -1]]
    assert pack_routing_info(modality).tolist() == modality.tolist()


@pytest.mark.parametrize("bad", [2, -1, 7])
def test_pack_routing_info_rejects_ids_outside_0_1(bad):
    modality = torch.zeros(2, 5, dtype=torch.long)
    modality[1, 3] = bad
    with pytest.raises(ValueError, match=rf"modality_ids contains {bad}: ids must be 0 \(text\) or 1 \(audio\)"):
        pack_routing_info(modality)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_pack_routing_info_rejects_non_integer_ids(dtype):
    with pytest.raises(ValueError, match=rf"modality_ids must be an integer tensor, got {dtype}"):
        pack_routing_info(torch.zeros(2, 5, dtype=dtype))


@pytest.mark.parametrize("shape", [(5,), (2, 5, 1), ()])
def test_pack_routing_info_rejects_non_2d_ids(shape):
    with pytest.raises(ValueError, match=re.escape(f"modality_ids must be [batch, seq], got shape {tuple(shape)}")):
        pack_routing_info(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(5, 2), (2, 4), (1, 5), (2, 5, 1)])
def test_pack_routing_info_rejects_padding_mask_of_other_shape(shape):
    with pytest.raises(ValueError, match=r"padding_mask shape .* does not match modality_ids shape \(2, 5\)"):
        pack_routing_info(torch.zeros(2, 5, dtype=torch.long), torch.zeros(shape, dtype=torch.bool))


# ---------------------------------------------------------------------------- placement


def _per_rank(slots, ep):
    n = len(slots) // ep
    return [slots[r * n : (r + 1) * n] for r in range(ep)]


def test_balanced_placement_32_32_ep8():
    config = MAMoEConfig(num_experts=64, topk=6, placement="balanced")
    slots = logical_of_physical(config, 8)
    assert sorted(slots) == list(range(64))  # a permutation
    for rank, experts in enumerate(_per_rank(slots, 8)):
        assert sum(e < 32 for e in experts) == 4 and sum(e >= 32 for e in experts) == 4, (rank, experts)
    # Hand-worked: text dealt round-robin, then audio: rank r holds r, r+8, r+16, r+24 and their +32.
    assert _per_rank(slots, 8)[0] == [0, 8, 16, 24, 32, 40, 48, 56]
    assert _per_rank(slots, 8)[7] == [7, 15, 23, 31, 39, 47, 55, 63]


def test_balanced_placement_40_24_ep8():
    config = MAMoEConfig(num_experts=64, text_experts=tuple(range(40)), topk=6, placement="balanced")
    slots = logical_of_physical(config, 8)
    assert sorted(slots) == list(range(64))
    for rank, experts in enumerate(_per_rank(slots, 8)):
        assert sum(e < 40 for e in experts) == 5 and sum(e >= 40 for e in experts) == 3, (rank, experts)


def test_balanced_placement_follows_non_contiguous_groups():
    text = (0, 1, 2, 5)
    config = MAMoEConfig(num_experts=8, text_experts=text, topk=2, placement="balanced")
    slots = logical_of_physical(config, 2)
    assert sorted(slots) == list(range(8))
    for experts in _per_rank(slots, 2):
        assert sum(e in text for e in experts) == 2 and len(experts) == 4


@pytest.mark.parametrize("ep", [1, 2, 4, 8, 64])
def test_contiguous_placement_is_identity(ep):
    config = MAMoEConfig(num_experts=64, text_experts=tuple(range(40)), topk=6, placement="contiguous")
    assert logical_of_physical(config, ep) == list(range(64))


def test_ep1_placement_is_identity():
    assert logical_of_physical(MAMoEConfig(placement="balanced"), 1) == list(range(64))


def test_rank_loads_known_answer():
    tokens = [1, 10, 100, 1000, 5, 50]
    # rank 0 holds logical experts 4, 0, 2; rank 1 holds 1, 5, 3
    assert rank_loads(tokens, [4, 0, 2, 1, 5, 3], 2) == [106.0, 1060.0]
    assert rank_loads(tokens, list(range(6)), 3) == [11.0, 1100.0, 55.0]
    assert rank_loads(tokens, [5, 4, 3, 2, 1, 0], 6) == [50.0, 5.0, 1000.0, 100.0, 10.0, 1.0]


# ---------------------------------------------------------------------------- layer input checks

SEQ, BATCH, HIDDEN = 6, 3, 16


def _layer_input_errors():
    from megatron_most.platform import ParallelLayout, initialize
    from tests import mamoe_layers

    initialize(ParallelLayout(), num_experts=8)
    mamoe = MAMoEConfig(num_experts=8, topk=2, shared_expert_size=16)
    config = mamoe_layers.layer_config(mamoe, hidden=HIDDEN, moe_ffn=8, ffn=32)
    layer = mamoe_layers.build_layer(config, mamoe)
    h = torch.randn(SEQ, BATCH, HIDDEN)

    def error(info):
        try:
            layer(h, padding_mask=info)
        except ValueError as err:
            return str(err)
        return None

    return {
        "longer": error(pack_routing_info(torch.zeros(BATCH, SEQ + 1, dtype=torch.long))),
        "shorter": error(pack_routing_info(torch.zeros(BATCH, SEQ - 2, dtype=torch.long))),
        "batch": error(pack_routing_info(torch.zeros(BATCH + 1, SEQ, dtype=torch.long))),
        "seq_major": error(pack_routing_info(torch.zeros(SEQ, BATCH, dtype=torch.long))),  # [seq, batch] by mistake
        "bool_mask": error(torch.zeros(BATCH, SEQ, dtype=torch.bool)),  # Megatron's padding mask, not routing info
        "none": error(None),
        "ok": error(pack_routing_info(torch.zeros(BATCH, SEQ, dtype=torch.long))),
    }


@pytest.fixture(scope="module")
def layer_errors():
    return run_distributed(_layer_input_errors, 1, timeout_s=300)[0]


def test_layer_rejects_routing_info_of_wrong_sequence_length(layer_errors):
    assert layer_errors["longer"] is not None
    assert "[seq=7, batch=3]" in layer_errors["longer"] and "[seq=6, batch=3]" in layer_errors["longer"]
    assert "[seq=4, batch=3]" in layer_errors["shorter"] and "[seq=6, batch=3]" in layer_errors["shorter"]


def test_layer_rejects_routing_info_of_wrong_batch_or_layout(layer_errors):
    assert "[seq=6, batch=4]" in layer_errors["batch"] and "[seq=6, batch=3]" in layer_errors["batch"]
    assert "[seq=3, batch=6]" in layer_errors["seq_major"]


def test_layer_rejects_missing_or_non_int8_routing_info(layer_errors):
    assert "must be int8 from pack_routing_info" in layer_errors["bool_mask"]
    assert "got no modality ids" in layer_errors["none"]
    assert layer_errors["ok"] is None


def test_unset_group_is_the_complement_of_the_set_one():
    from megatron_most.moe import MAMoEConfig

    config = MAMoEConfig(num_experts=8, audio_experts=(0, 1, 2, 3), topk=2)
    assert config.groups() == ((4, 5, 6, 7), (0, 1, 2, 3))


def test_expert_indices_must_be_integers():
    from megatron_most.moe import MAMoEConfig
    from megatron_most.options import ConfigError

    with pytest.raises(ConfigError, match=r"text_experts must hold integer expert indices, got \[0.0"):
        MAMoEConfig(num_experts=8, text_experts=(0.0, 1.0, 2.0, 3.0), topk=2)


def test_lists_from_json_become_tuples():
    from megatron_most.moe import MAMoEConfig

    config = MAMoEConfig.from_dict({"num_experts": 8, "text_experts": [0, 1, 2, 3], "topk": 2})
    assert config.text_experts == (0, 1, 2, 3)
    hash(config)  # frozen configs stay hashable
