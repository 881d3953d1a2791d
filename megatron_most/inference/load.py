"""A trained MoST for inference: from a pretraining save folder (the iteration its tracker names)
or any torch_dist checkpoint folder (an iter_* folder, the converter's output), at the layout
of this process (TP and EP under torchrun, or one rank), resharded on load: a PP- or
VPP-trained checkpoint runs whole on every rank here.

    model = load_model("runs/stage1")          # after platform.initialize(ParallelLayout(tp=.., ep=..))

The model's shape comes from the most_config.json written with the checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron.core import parallel_state

from megatron_most.model.checkpoint import CheckpointError, load_sharded, weights_folder
from megatron_most.model.config import CONFIG_NAME, MoSTConfig, read_config
from megatron_most.model.most import MoSTModel, build_model
from megatron_most.options import require
from megatron_most.platform import ParallelLayout


def checkpoint_config(path) -> tuple[Path, MoSTConfig]:
    """(the torch_dist folder, its MoSTConfig); no process group needed."""
    folder = weights_folder(path)
    for where in (folder, folder.parent):
        if (where / CONFIG_NAME).is_file():
            return folder, read_config(where)
    raise CheckpointError(f"{folder}: no {CONFIG_NAME} beside it; it names the model the weights belong to")


def current_layout() -> ParallelLayout:
    """The layout of this process's Megatron groups (set up by platform.initialize)."""
    return ParallelLayout(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        etp=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def inference_layout(tp: int = 1, ep: int = 1) -> ParallelLayout:
    """The groups to run a checkpoint at TP x EP, every layer on every rank (PP1). Sequence
    parallelism is on for the layout check (Megatron-Core requires it for MoE with TP); the
    inference model itself runs without it (`load_model`): one new token cannot be split."""
    return ParallelLayout(tp=tp, ep=ep, sp=tp > 1)


def load_model(path, *, precision: str = "auto") -> MoSTModel:
    """The whole model on this rank's device (every layer, PP1), weights from `path`, in eval mode.
    Collective over the process's ranks."""
    folder, most = checkpoint_config(path)
    layout = current_layout()
    require(
        parallel_state.get_pipeline_model_parallel_world_size() == 1,
        "inference runs at pipeline-parallel size 1 (checkpoints of any PP size reshard to it): "
        "initialise without --pipeline-model-parallel-size",
    )
    # Training's batch check wants every <boa> closed; a prompt to continue ends inside its span.
    most = dataclasses.replace(most, validate_inputs=False)
    config = most.transformer_config(layout, precision=precision, sequence_parallel=False)
    model = build_model(most, config)
    loaded = load_sharded({"model": model.sharded_state_dict()}, folder)
    result = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder}: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    return model.eval()
