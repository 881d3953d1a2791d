"""Writing a Hugging Face checkpoint (the counterpart of hf_reader.py): safetensors shards with
model.safetensors.index.json, and the tokenizer files copied next to them."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_most.convert.common import ExportError

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)"
    r"|generation_config\.json)$"
)


@dataclasses.dataclass
class ExportStats:
    tensors: int = 0
    """HF tensors written."""
    shards: int = 0
    bytes: int = 0
    """Tensor bytes written."""
    largest_megatron_tensor_bytes: int = 0
    largest_shard_bytes: int = 0


def parse_size(size) -> int:
    """Bytes from an int or '5GB' / '500MB' / '100KB' / '1GiB' (decimal units like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max shard size {size!r}: give bytes or a size like 5GB, 500MB")
    number, unit = float(m.group(1)), m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


class ShardWriter:
    """HF tensors into safetensors shards of at most `max_bytes` bytes (a larger tensor gets a
    shard of its own), each written and dropped once full; `finish` names them
    model-0000i-of-0000n.safetensors and writes model.safetensors.index.json."""

    def __init__(self, directory: Path, max_bytes: int, stats: ExportStats):
        self.dir, self.max, self.stats = directory, max_bytes, stats
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # temporary name, tensor names

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max:
            self.flush()
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != size:
            tensor = tensor.contiguous().clone()  # a half / the text rows: do not keep the whole tensor alive
        self.current[name] = tensor
        self.current_bytes += size
        self.stats.tensors += 1
        self.stats.bytes += size

    def flush(self) -> None:
        if not self.current:
            return
        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self.current, str(self.dir / name), metadata={"format": "pt"})
        os.chmod(self.dir / name, 0o666 & ~_umask())  # safetensors creates 0600 files
        self.files.append((name, list(self.current)))
        self.stats.largest_shard_bytes = max(self.stats.largest_shard_bytes, self.current_bytes)
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        total = len(self.files)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.rename(self.dir / tmp, self.dir / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.stats.bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self.stats.shards = total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_tokenizer(tokenizer_dir, out_dir: Path) -> list[str]:
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise ExportError(f"--tokenizer {src} is not a directory")
    copied = [p.name for p in sorted(src.iterdir()) if p.is_file() and TOKENIZER_FILES.match(p.name)]
    if not copied:
        raise ExportError(f"--tokenizer {src} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    for name in copied:
        shutil.copy2(src / name, out_dir / name)
    return copied


__all__ = ["INDEX_NAME", "TOKENIZER_FILES", "ExportStats", "ShardWriter", "parse_size", "copy_tokenizer"]
