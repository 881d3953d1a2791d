"""Streaming writer for Megatron-Core's `torch_dist` checkpoint format.

`megatron.core.dist_checkpointing.save(sharded_state_dict, dir)` needs every tensor of the
model in memory. `write_torch_dist(template, loaders, dir)` writes the same directory from a
*template* (the model's `sharded_state_dict()`, normally of a model built on the meta device,
so it holds no data) and one loader per template entry, holding one entry's tensor at a time:

    dir/common.pt       the non-sharded part of the template (Megatron's common strategy)
    dir/.metadata       PyTorch DCP metadata: global shape, dtype, chunks and file offsets per key
    dir/__0_0.distcp    every chunk, `torch.save`d one after another (one file per writing rank)
    dir/metadata.json   {"sharded_backend": "torch_dist", ...}: written last, marks completion

The steps are those of `TorchDistSaveShardedStrategy.async_save` (dist_checkpointing/strategies/
torch.py), with the data source swapped:

1. `save_preprocess` (state_dict_utils.py) on a copy of the template: applies the
   ShardedTensorFactories (SwiGLU fc1 -> its w and v halves), drops non-persistent entries,
   splits off the common dict and validates that the main replicas cover every tensor once.
2. `_replace_state_dict_keys_with_sharded_keys` + `mcore_to_pyt_state_dict` (torch.py): the DCP
   state dict, i.e. DCP wrappers around the template's (meta) tensors.
3. `torch.distributed.checkpoint.save` with `_LoaderPlanner`, an `MCoreSavePlanner` whose
   `resolve_data` calls the loader instead of reading the state dict, and `_SequentialWriter`,
   a `FileSystemWriter` whose `write_data` writes the plan item by item with DCP's own
   `_write_item` (as Megatron's FileSystemWriterAsync does) and drops each tensor once written.
   torch's stock `write_data` cannot stream: it keeps every written tensor of a file alive
   until the file is closed (`tensor_dict` in filesystem.py `_write_files_from_queue`).

DCP names each chunk by (sharded key, global offset), so the result is the checkpoint that
`dist_checkpointing.save` writes for the same template (same `.metadata` tensor entries, chunks
and object entries; only file names and offsets differ) and loads, resharded, at any layout.

Loaders: `loaders[key]()` returns the full *local* tensor of template entry `key`, a key of
Megatron's `flatten_state_dict(template)` (for GPTModel: the state-dict key), with the entry's
local shape and dtype. For a TP=PP=EP=1 template that is the full parameter: e.g.
`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight` -> cat([gate_5, up_5]).
A factory entry is split by the factory's own `build_fn`; its chunks are planned back to back,
so each loader is called once. Its loader may instead return the chunks the factory builds, in
build order (SwiGLU fc1: `[gate, up]`), which saves the `cat` and the copies of the halves.
Memory: at most one loaded entry is referenced at a time (plus, for a factory given as one
tensor, a contiguous copy of the chunk being written: <= 1.5x the entry for SwiGLU).

Every rank of the default process group must call it (DCP plans collectively; Megatron's
helpers need a rank). A converter runs it as one process (`platform.initialize` at TP1).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from megatron.core.dist_checkpointing.core import CONFIG_FNAME, CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    extract_matching_values,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import (
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.dist_checkpointing.serialization import (
    get_default_save_common_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    flatten_state_dict,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.futures import Future

try:  # a newer torch, whose _write_item takes the serialization format
    from torch.distributed.checkpoint.filesystem import SerializationFormat
except ImportError:  # an older one (setup.py allows torch >= 2.6) has neither
    SerializationFormat = None

Loader = Callable[[], torch.Tensor]
ChunkId = tuple  # (sharded key, global offset): DCP's MetadataIndex(fqn, offset) of a chunk


@dataclasses.dataclass
class WriteStats:
    entries: int = 0
    """Template entries with a chunk written by this rank (= loaders it needed)."""
    chunks: int = 0
    """Tensor chunks written (a SwiGLU fc1 entry is 2 chunks)."""
    bytes: int = 0
    """Tensor bytes written."""
    loads: int = 0
    """Loader calls; `loads - entries` reloads happen only if an entry's chunks were not
    written back to back."""
    largest_entry_bytes: int = 0
    """The largest tensor a loader returned: the memory bound of the write."""


@dataclasses.dataclass
class _Entry:
    key: str
    value: ShardedTensor | ShardedTensorFactory
    local_shape: tuple
    dtype: torch.dtype
    chunk_shapes: list  # local shapes of all chunks the entry builds into, in build order
    chunks: int  # main-replica chunks of this entry (the ones this rank writes)


def _chunk_id(index) -> ChunkId:
    return index.fqn, tuple(index.offset)


def _index_template(template: ShardedStateDict) -> tuple[list[_Entry], dict[ChunkId, tuple[int, int]]]:
    """Template entries needing a loader, and (chunk id -> (entry position, chunk number))."""
    flat, _ = flatten_state_dict(template)
    entries: list[_Entry] = []
    chunk_of: dict[ChunkId, tuple[int, int]] = {}
    for key, value in flat.items():
        if isinstance(value, ShardedTensorFactory):
            chunks = list(nested_values(value.build()))  # on the template's (meta) data
            shape, dtype = tuple(value.data.shape), value.data.dtype
        elif isinstance(value, ShardedTensor):
            chunks, shape, dtype = [value], tuple(value.local_shape), value.dtype
        else:  # ShardedObject (written from the template), non-persistent or common values
            continue
        main = [i for i, c in enumerate(chunks) if is_main_replica(c.replica_id)]
        if not main:
            continue
        for i in main:
            chunk_of[(chunks[i].key, tuple(chunks[i].global_offset))] = (len(entries), i)
        entries.append(_Entry(key, value, shape, dtype, [tuple(c.local_shape) for c in chunks], len(main)))
    return entries, chunk_of


def _copy(template: ShardedStateDict) -> ShardedStateDict:
    """Containers and ShardedTensors copied: Megatron's preprocessing rewrites both in place."""
    copied, _ = extract_matching_values(template, lambda _: True)
    dict_list_map_inplace(lambda v: dataclasses.replace(v) if isinstance(v, ShardedTensor) else v, copied)
    return copied


class _LoaderPlanner(MCoreSavePlanner):
    """Megatron's save planner with tensor data coming from the loaders, one entry at a time."""

    def __init__(self, entries: list[_Entry], chunk_of: dict, loaders: Mapping[str, Loader], stats: WriteStats):
        # The arguments TorchDistSaveShardedStrategy passes (keep_only_main_replica=True).
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._entries, self._chunk_of, self._loaders, self._stats = entries, chunk_of, loaders, stats
        self._cached: tuple[int, list[torch.Tensor]] | None = None
        self._left = [e.chunks for e in entries]

    def create_local_plan(self) -> SavePlan:
        """Megatron's plan, ordered so that each entry's chunks are written back to back."""
        plan = super().create_local_plan()

        def order(item: WriteItem):
            if item.type == WriteItemType.BYTE_IO:
                return (-1, 0)
            return self._chunk_of[_chunk_id(item.index)]

        self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=order))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:  # ShardedObjects: serialized from the template
            return super().resolve_data(write_item)
        position, number = self._chunk_of[_chunk_id(write_item.index)]
        if self._cached is None or self._cached[0] != position:
            self._cached = None  # drop the previous entry before loading the next one
            self._cached = (position, self._load(self._entries[position]))
        chunk = self._cached[1][number]
        self._left[position] -= 1
        if self._left[position] <= 0:
            self._cached = None
        # Prepended axes (layer/expert) are size-1 axes of the DCP chunk.
        chunk = chunk.reshape(write_item.tensor_data.chunk.sizes)
        if not chunk.is_contiguous() or chunk.untyped_storage().nbytes() != chunk.nbytes:
            chunk = chunk.contiguous().clone()  # torch.save would write the whole storage
        self._stats.chunks += 1
        self._stats.bytes += chunk.nbytes
        return chunk

    def _load(self, entry: _Entry) -> list[torch.Tensor]:
        loaded = self._loaders[entry.key]()
        factory = isinstance(entry.value, ShardedTensorFactory)
        if factory and isinstance(loaded, (list, tuple)):  # the factory's chunks, ready made
            if len(loaded) != len(entry.chunk_shapes):
                raise ValueError(
                    f"loader for {entry.key!r} returned {len(loaded)} chunks, not {len(entry.chunk_shapes)}"
                )
            chunks = [self._checked(entry, t, shape, i) for i, (t, shape) in enumerate(zip(loaded, entry.chunk_shapes))]
        else:
            chunks = [self._checked(entry, loaded, entry.local_shape)]
        self._stats.loads += 1
        self._stats.largest_entry_bytes = max(self._stats.largest_entry_bytes, sum(c.nbytes for c in chunks))
        if not factory or len(chunks) > 1:
            return chunks
        # The factory's own split (e.g. SwiGLU w/v halves), in the order _index_template saw.
        value = entry.value
        built = value.build_fn(value.key, chunks[0], value.replica_id, value.flattened_range)
        return [c.data for c in nested_values(built)]

    @staticmethod
    def _checked(entry: _Entry, tensor, shape: tuple, chunk: int | None = None) -> torch.Tensor:
        what = f"loader for {entry.key!r}" + ("" if chunk is None else f" (chunk {chunk})")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what} returned {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != shape or tensor.dtype != entry.dtype:
            raise ValueError(
                f"{what} returned {tuple(tensor.shape)} {tensor.dtype}; the template expects {shape} {entry.dtype}"
            )
        return tensor.detach().cpu()


class _SequentialWriter(FileSystemWriter):
    """One file per rank, written item by item in plan order; a written tensor is released
    before the next one is resolved. Same bytes per item as FileSystemWriter (DCP's
    `_write_item`, called the way Megatron's FileSystemWriterAsync.write_preloaded_data does)."""

    def write_data(self, plan: SavePlan, planner) -> Future:
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        kwargs = {}
        if "serialization_format" in inspect.signature(_write_item).parameters:
            kwargs["serialization_format"] = SerializationFormat.TORCH_SAVE
        results = []
        if plan.items:
            file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            with self.fs.create_stream(self.fs.concat_path(self.path, file_name), "wb") as stream:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    results.append(_write_item(*transforms, stream, data, item, file_name, **kwargs))
                    del data
                if self.sync_files:
                    os.fsync(stream.fileno())
        future: Future = Future()
        future.set_result(results)
        return future


def _has_meta_tensor(state_dict) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in nested_values(state_dict))


def write_torch_dist(
    template: ShardedStateDict,
    loaders: Mapping[str, Loader],
    out_dir: str | os.PathLike,
    *,
    validate_access_integrity: bool = True,
    sync_files: bool = True,
) -> WriteStats:
    """Write a torch_dist checkpoint of `template`'s tensors, taken from `loaders` one by one.

    `template`: a sharded state dict (e.g. `model.sharded_state_dict()` of a model built under
    `torch.device("meta")`); only its metadata is read, and it is not modified.
    `loaders`: template entry key -> callable returning that entry's full local tensor.
    Raises KeyError before writing anything if a loader is missing or unknown, and a loader's
    own error (or ValueError for a wrong shape/dtype) mid-write, leaving no metadata.json.
    Returns this rank's stats.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError("write_torch_dist needs torch.distributed initialized (platform.initialize)")
    entries, chunk_of = _index_template(template)
    expected = {e.key for e in entries}
    missing, unknown = sorted(expected - set(loaders)), sorted(set(loaders) - expected)
    if missing or unknown:
        raise KeyError(f"loaders do not match the template: missing {missing[:5]}, unknown {unknown[:5]}")

    sharded_part, common = save_preprocess(_copy(template), validate_access_integrity)
    if _has_meta_tensor(common):
        raise ValueError("the template's common (non-sharded) part holds meta tensors: nothing to write")
    by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_part, keep_only_main_replica=True)
    pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=False)

    out_dir = Path(out_dir)
    rank = torch.distributed.get_rank()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FNAME).unlink(missing_ok=True)  # an old one would mark a failed write complete
    torch.distributed.barrier()
    get_default_save_common_strategy().save_common(common, out_dir)  # rank 0 writes common.pt

    stats = WriteStats(entries=len(entries))
    planner = _LoaderPlanner(entries, chunk_of, loaders, stats)
    try:
        dcp_save(pyt_state_dict, storage_writer=_SequentialWriter(out_dir, sync_files=sync_files), planner=planner)
    except CheckpointException as e:  # DCP wraps each rank's error: raise the first one as is
        error = next((exc for exc, _ in e.failures.values() if isinstance(exc, Exception)), None)
        if error is None:
            raise
        raise error from e

    strategy = get_default_save_sharded_strategy()  # the backend/version dist_checkpointing.save records
    if rank == 0:
        save_config(CheckpointingConfig(strategy.backend, strategy.version), str(out_dir))
    torch.distributed.barrier()
    return stats
