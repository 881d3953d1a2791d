"""model/fields.py is the one table of config correspondences: every MoSTConfig field has a row
or a stated reason not to, and both config.json directions invert each other through it."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_most.convert.hf_config import config_from_hf, hf_config_fields
from megatron_most.model.config import MoSTConfig, preset
from megatron_most.model.fields import FIELDS

NOT_IN_HF = {
    "mamoe": "MAMoE groups/masking/variant have no DeepSeek-V2 field (rows cover num_experts, topk, balance_coeff)",
    "num_units": "audio vocabulary: MoST remote-code config only",
    "audio_feature_dim": "continuous audio path: MoST remote-code config only",
    "seq_length": "a training setting, capped by max_position_embeddings on import",
    "validate_inputs": "a runtime check",
}


def test_every_config_field_has_a_row_or_a_reason():
    rows = {f.most for f in FIELDS if not f.most.startswith("mamoe.")}
    fields = {f.name for f in dataclasses.fields(MoSTConfig)}
    assert fields - rows == set(NOT_IN_HF), sorted(fields - rows)
    assert rows <= fields, sorted(rows - fields)


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v2_lite_most", "tiny"])
@pytest.mark.parametrize("rope", ["parameters", "scaling"])
def test_hf_config_round_trip(name, rope):
    most = preset(name)
    back = config_from_hf(hf_config_fields(most, rope=rope), most)
    assert back == most.replace(seq_length=min(most.seq_length, most.max_position_embeddings))


def test_transformer_config_reads_the_table():
    most = preset("tiny").replace(qk_nope_head_dim=24, rope_factor=8.0, first_k_dense=2, init_std=0.01)
    config = most.transformer_config()
    assert (config.qk_head_dim, config.rotary_scaling_factor, config.init_method_std) == (24, 8.0, 0.01)
    assert config.moe_layer_freq == [0, 0] + [1] * (most.num_layers - 2)
