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

from megatron_most.convert.hf_config import hf_config_fields, most_extras
from megatron_most.convert.hf_most.configuration_most import MoSTHFConfig
from megatron_most.convert.mapping import RULES

HERE = pathlib.Path(__file__).resolve().parent
CODE_FILES = ("configuration_most.py", "modeling_most.py")
AUTO_MAP = {
    "AutoConfig": "configuration_most.MoSTHFConfig",
    "AutoModel": "modeling_most.MoSTModel",
    "AutoModelForCausalLM": "modeling_most.MoSTForCausalLM",
}
AUDIO_PROJECTION = tuple(r.hf[0] for r in RULES if r.megatron in ("audio_projection.weight", "audio_projection.bias"))
"""HF names of the continuous-path projection (Megatron: audio_projection.{weight,bias}), from the table."""


def hf_config_dict(most, **overrides) -> dict:
    """config.json fields (without auto_map) of the MoST HF model for a MoSTConfig `most`: the
    DeepSeek-V2 fields of hf_config.hf_config_fields with the padded vocabulary and the MoST extras."""
    fields = dict(model_type="most", architectures=["MoSTForCausalLM"], **hf_config_fields(most))
    fields.update(most_extras(most))
    fields.update(overrides)
    return fields


def hf_config(most, **overrides):
    """MoSTHFConfig for a MoSTConfig `most`."""
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
