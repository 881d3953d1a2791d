"""Read an HF safetensors checkpoint (index + shards, or one model.safetensors) tensor by tensor.

Only the shard headers are kept (names, dtypes, shapes, byte ranges); `get(name)` reads that
tensor's bytes with one seek + read and closes the file, so at most one tensor is in memory.
`get_row(name, i)` reads row i of a stacked tensor (fused experts) without the others.

Validation at open, each error naming the file and tensor:
- the index is not valid JSON / has no weight_map;
- a shard the index names is missing;
- a shard is truncated: shorter than its header, or than the end of a tensor's byte range;
- the index maps a tensor to a shard whose header lacks it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """The HF checkpoint on disk is incomplete or inconsistent."""


def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to {data_start + end}, "
                f"file has {size}"
            )
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        info["start"] = data_start + begin
        info["end"] = data_start + end
    return header


class HFCheckpoint:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index_path = self.dir / INDEX
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index with a weight_map ({e})") from e
        elif (self.dir / SINGLE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX} nor {SINGLE} found")
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        missing = [s for s in shards if not (self.dir / s).exists()]
        if missing:
            raise CheckpointError(f"{self.dir}: shard file(s) {missing} named by {INDEX} are missing")
        self._info: dict[str, tuple[Path, dict]] = {}
        for shard in shards:
            for name, info in _read_header(self.dir / shard).items():
                self._info[name] = (self.dir / shard, info)
        if weight_map is not None:
            absent = [(n, s) for n, s in weight_map.items() if n not in self._info or self._info[n][0].name != s]
            if absent:
                shown = ", ".join(f"{n!r} (in {s})" for n, s in absent[:5])
                raise CheckpointError(f"{index_path}: names {len(absent)} tensor(s) absent from their shard: {shown}")
            # tensors in a shard but not in the index are ignored, as transformers does
            self._info = {n: self._info[n] for n in weight_map}

    def names(self) -> list[str]:
        return list(self._info)

    def has(self, name: str) -> bool:
        return name in self._info

    def file_of(self, name: str) -> str:
        return self._info[name][0].name

    def shape(self, name: str) -> tuple:
        return tuple(self._info[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._info[name][1]["dtype"]]

    def _read(self, path: Path, start: int, end: int, dtype: torch.dtype, shape) -> torch.Tensor:
        with open(path, "rb") as f:
            f.seek(start)
            data = bytearray(end - start)
            got = f.readinto(data)
        if got != end - start:
            raise CheckpointError(f"{path}: truncated while reading (got {got} of {end - start} bytes)")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._info:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        path, info = self._info[name]
        return self._read(path, info["start"], info["end"], self.dtype(name), self.shape(name))

    def get_row(self, name: str, row: int) -> torch.Tensor:
        """Row `row` (dim 0) of a stacked tensor, reading only its bytes."""
        path, info = self._info[name]
        shape = self.shape(name)
        if not 0 <= row < shape[0]:
            raise IndexError(f"{name}: row {row} outside 0..{shape[0] - 1}")
        row_bytes = (info["end"] - info["start"]) // shape[0]
        start = info["start"] + row * row_bytes
        return self._read(path, start, start + row_bytes, self.dtype(name), shape[1:])

    def nbytes(self, name: str) -> int:
        _, info = self._info[name]
        return info["end"] - info["start"]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def config(self) -> dict:
        return read_config(self.dir)


def read_config(directory: str | os.PathLike) -> dict:
    """config.json of an HF checkpoint directory (read alone, before any shard is opened)."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.exists():
        raise CheckpointError(f"{directory}: config.json is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
