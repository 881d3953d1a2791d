"""What both conversion directions share.

- the dtype tables: `DTYPES` (the --dtype names) and `HF_DTYPE_NAMES` (config.json's torch_dtype);
- most_config.json, the MoSTConfig next to a converted checkpoint: written by hf-to-megatron
  (`write_most_config`), read by megatron-to-hf (`load_most_config`);
- `build_template`: MoSTModel's sharded state dict at TP = PP = EP = 1 on the meta device, the
  template hf-to-megatron writes and megatron-to-hf reads the torch_dist checkpoint with;
- `load_into`: a converted checkpoint loaded into a model at the current layout (the --verify
  of both directions);
- conversion.json, the record of what a converted checkpoint was made from: written by
  hf-to-megatron (`write_record`), read by megatron-to-hf (`read_record`) for the source's special
  token ids and generation config;
- `ExportError`, raised by megatron-to-hf and the modules under it (reader, hf_writer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_most.model.checkpoint import load_values
from megatron_most.model.config import CONFIG_NAME, MoSTConfig, read_config, write_config
from megatron_most.model.most import build_meta_model

RECORD_NAME = "conversion.json"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""config.json's special token ids, carried from the source through conversion.json."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""The DTYPES as config.json's torch_dtype names them."""


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format."""


def build_template(most: MoSTConfig, dtype: torch.dtype | None = None):
    """MoSTModel's sharded state dict at TP = PP = EP = 1 on the meta device; floating tensors
    in `dtype` if given (the dtype the checkpoint is written in)."""
    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    if sizes != (1, 1, 1) or torch.distributed.get_world_size() != 1:
        raise RuntimeError(
            f"the converter runs as one process at TP=PP=EP=1 (got TP/PP/EP {sizes}, world {torch.distributed.get_world_size()})"
        )
    template = build_meta_model(most).sharded_state_dict()
    if dtype is None:
        return template

    def cast(value):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and value.data.is_floating_point():
            data = value.data.to(dtype)
            if isinstance(value, ShardedTensor):
                return dataclasses.replace(value, data=data, dtype=dtype)
            return dataclasses.replace(value, data=data)
        return value

    return dict_list_map_inplace(cast, template)


def write_most_config(directory, most: MoSTConfig) -> None:
    """most_config.json next to a converted checkpoint (model.config.write_config)."""
    write_config(directory, most)


def load_most_config(megatron_dir) -> MoSTConfig:
    """The MoSTConfig of a checkpoint; ExportError naming the file when it has none."""
    try:
        return read_config(megatron_dir)
    except FileNotFoundError as e:
        raise ExportError(f"{e}; hf-to-megatron and training write it") from e


def write_record(directory, record: dict) -> None:
    (Path(directory) / RECORD_NAME).write_text(json.dumps(record, indent=1))


def read_record(megatron_dir) -> dict:
    """conversion.json of a converted checkpoint, or {} (a checkpoint trained from scratch)."""
    path = Path(megatron_dir) / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def load_into(model, out_dir) -> None:
    """Load the converted checkpoint into `model` at the current layout (resharded, cast to the
    model's dtype)."""
    values = load_values(model, Path(out_dir))
    model.load_state_dict(values, strict=False)


__all__ = [
    "CONFIG_NAME",
    "RECORD_NAME",
    "SPECIAL_TOKENS",
    "read_record",
    "write_record",
    "DTYPES",
    "HF_DTYPE_NAMES",
    "ExportError",
    "build_template",
    "write_most_config",
    "load_most_config",
    "load_into",
]
