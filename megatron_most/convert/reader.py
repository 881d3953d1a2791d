"""Streaming reader for Megatron-Core's `torch_dist` checkpoint format (the counterpart of writer.py).

    reader = TorchDistReader(megatron_dir, template)   # template: common.build_template(most)
    tensor = reader.get("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight")

`dist_checkpointing.load` fills the whole state dict of a model. `TorchDistReader` reads one
entry of the TP = PP = EP = 1 template at a time into a fresh buffer, resharded from whatever
layout the checkpoint was saved at, straight from PyTorch DCP (no process group needed), so
megatron-to-hf holds one Megatron tensor at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import flatten_state_dict
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_most.convert.common import ExportError


class TorchDistReader:
    """Reads single entries of a torch_dist checkpoint into fresh buffers, resharded to the
    TP=PP=EP=1 template, straight from PyTorch DCP (no process group needed).

    Each template entry is a chunk (global offset + local shape, prepended layer/expert axes of
    size 1) of a stored tensor, e.g. expert 5 of `decoder.layers.3.mlp.experts.experts.
    linear_fc1.weight` [E, 2I, H]; `_ChunkPlanner` asks DCP for exactly that region, whatever
    chunks the checkpoint was saved in. (Megatron's own `dist_checkpointing.load` cannot load a
    part of a stacked tensor in a single process: its torch ShardedTensor then claims every
    fragment as local.) A factory entry (SwiGLU fc1) is built on the buffer and merged back."""

    def __init__(self, megatron_dir, template):
        self.dir = Path(megatron_dir)
        if not (self.dir / "metadata.json").is_file() or not (self.dir / ".metadata").is_file():
            raise ExportError(f"{self.dir} is not a torch_dist checkpoint (metadata.json / .metadata missing)")
        self.entries, _ = flatten_state_dict(template)
        self.reader = _CachedReader(str(self.dir))
        self.metadata = self.reader.read_metadata()
        self.stored = {
            k: getattr(getattr(v, "properties", None), "dtype", None)
            for k, v in self.metadata.state_dict_metadata.items()
        }

    def stored_dtype(self, key: str) -> torch.dtype:
        entry = self.entries[key]
        return self.stored.get(entry.key) or entry.data.dtype

    def get(self, key: str) -> torch.Tensor:
        entry, dtype = self.entries[key], self.stored_dtype(key)
        if entry.key not in self.stored:
            raise ExportError(
                f"{self.dir}: the checkpoint has no tensor {entry.key!r} (for {key}): not a MoSTModel checkpoint of this config"
            )
        if isinstance(entry, ShardedTensorFactory):
            real = dataclasses.replace(entry, data=torch.empty(entry.data.shape, dtype=dtype))
            built = real.build()
            chunks = list(nested_values(built))
        elif isinstance(entry, ShardedTensor):
            real = dataclasses.replace(entry, data=torch.empty(entry.local_shape, dtype=dtype), dtype=dtype)
            built, chunks = None, [real]
        else:
            raise ExportError(f"{key}: not a tensor entry of the template ({type(entry).__name__})")
        targets = []
        for sh in chunks:
            if sh.flattened_range is not None:
                raise ExportError(f"{key}: flattened (distributed-optimizer) chunks are not supported")
            if not sh.data.is_contiguous():
                sh.data = sh.data.contiguous()
            view = sh.data.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            targets.append((sh.key, tuple(sh.global_offset), view))
        dcp_load({}, storage_reader=self.reader, planner=_ChunkPlanner(targets), no_dist=True)
        if built is None:
            return real.data
        return real.merge_fn(dict_list_map_outplace(lambda sh: sh.data, built))


class _CachedReader(FileSystemReader):
    """Reads .metadata once (it is re-read by every DCP load otherwise)."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _ChunkPlanner(DefaultLoadPlanner):
    """A DCP load planner reading regions [(fqn, global offset, destination tensor)] only."""

    def __init__(self, regions):
        super().__init__()
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata, self.is_coordinator, self.state_dict = metadata, is_coordinator, {}
        self.targets = {(fqn, offset): t for fqn, offset, t in self.regions}

    def create_local_plan(self):
        items = []
        for fqn, offset, t in self.regions:
            stored = self.metadata.state_dict_metadata[fqn]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=t.size())
            items.extend(create_read_items_for_chunk_list(fqn, stored, [chunk]))
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        t = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, offset, length)
        return t

    def commit_tensor(self, read_item, tensor):
        pass  # read in place (narrowed views of the destination)

    def load_bytes(self, read_item, value):
        raise ExportError(f"unexpected byte entry {read_item.dest_index.fqn!r} in a tensor read")


__all__ = ["TorchDistReader"]
