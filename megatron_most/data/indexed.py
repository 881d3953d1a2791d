"""On-disk audio-text datasets: Megatron IndexedDatasets for tokens, loss mask and HuBERT features.

For an output prefix P:

    P.bin / P.idx                     int32 MoST token ids, one sequence per sample
    P_loss_mask.bin / .idx            uint8, same sequence lengths (1 = the token is a target)
    P_features.bin / .idx             features mode only: the sample's <feat> frames, row-major
                                      [frames * feature_dim], float16 bit patterns stored as uint16
                                      (Megatron's DType has no float16 code)
    P.json                            header (format, version, task, mode, layout, provenance, counts)

`AudioTextWriter` writes every file under a temporary name and renames them into place; P.json
comes last, so its presence marks a complete dataset. `open_audio_text` validates a dataset
before Megatron's IndexedDataset touches it: IndexedDataset asserts (or reads garbage) on a bad
magic, version or dtype and never notices a truncated .bin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_idx_path,
)

from megatron_most.options import ConfigError

FORMAT = "megatron_most.audio_text"
VERSION = 1
TOKEN_DTYPE = np.int32
MASK_DTYPE = np.uint8
FEATURE_DTYPE = np.float16
FEATURE_STORAGE = np.uint16  # float16 bits: Megatron's IndexedDataset has no float16 dtype code
LOSS_MASK_SUFFIX = "_loss_mask"
FEATURES_SUFFIX = "_features"
_IDX_FIXED = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
_FIX = "re-create it with tools/preprocess_audio_text.py (or restore the file from the original copy)"
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning: bounded memory on multi-GB datasets


class DatasetFormatError(ValueError):
    """A dataset on disk is malformed or does not match its other files; the message names file and fix."""


def header_path(prefix) -> Path:
    return Path(f"{prefix}.json")


def component_prefixes(prefix, with_features: bool) -> dict[str, str]:
    """name -> Megatron path prefix of each IndexedDataset of the dataset."""
    parts = {"tokens": str(prefix), "loss_mask": f"{prefix}{LOSS_MASK_SUFFIX}"}
    if with_features:
        parts["features"] = f"{prefix}{FEATURES_SUFFIX}"
    return parts


def dataset_files(prefix, with_features: bool = True) -> list[Path]:
    """Every file of the dataset at `prefix` (header last)."""
    files = [Path(p + ext) for p in component_prefixes(prefix, with_features).values() for ext in (".bin", ".idx")]
    return files + [header_path(prefix)]


_DTYPES = {"tokens": TOKEN_DTYPE, "loss_mask": MASK_DTYPE, "features": FEATURE_STORAGE}


# ----------------------------------------------------------------------------------------- writer


class AudioTextWriter:
    """Write one audio-text dataset at `prefix`, sample by sample; `finalize(header)` makes it visible.

    Each component is written by Megatron's IndexedDatasetBuilder (one sequence and one document
    per sample) under a temporary name.
    """

    def __init__(self, prefix, *, feature_dim: int):
        self.prefix = str(prefix)
        self.feature_dim = feature_dim
        self._tmp = f"{self.prefix}.partial"
        self._parts = component_prefixes(self._tmp, feature_dim > 0)
        self._builders = {
            name: IndexedDatasetBuilder(p + ".bin", dtype=_DTYPES[name]) for name, p in self._parts.items()
        }
        self.samples = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, loss_mask: np.ndarray, features: np.ndarray | None = None) -> None:
        """tokens [n] int, loss_mask [n] 0/1, features [frames, feature_dim] float16 (features mode)."""
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        loss_mask = np.ascontiguousarray(loss_mask, dtype=MASK_DTYPE)
        if tokens.ndim != 1 or tokens.shape != loss_mask.shape:
            raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must be equal 1-d shapes")
        self._write("tokens", tokens)
        self._write("loss_mask", loss_mask)
        if self.feature_dim:
            if features is None:
                features = np.zeros((0, self.feature_dim), FEATURE_DTYPE)
            features = np.ascontiguousarray(features, dtype=FEATURE_DTYPE)
            if features.ndim != 2 or features.shape[1] != self.feature_dim:
                raise ValueError(f"features {features.shape} must be [frames, {self.feature_dim}]")
            self._write("features", features.reshape(-1).view(FEATURE_STORAGE))
        elif features is not None and len(features):
            raise ValueError("features given but this dataset has feature_dim 0 (units mode)")
        self.samples += 1
        self.tokens += tokens.size

    def _write(self, name: str, values: np.ndarray) -> None:
        builder = self._builders[name]
        builder.add_item(torch.from_numpy(values))  # the builder writes the tensor's bytes in its own dtype
        builder.end_document()

    def finalize(self, header: dict[str, Any]) -> dict[str, Any]:
        """Write the indexes, rename every file into place, then write P.json (the completion mark)."""
        for name, builder in self._builders.items():
            builder.finalize(self._parts[name] + ".idx")
        return _publish(
            self._parts, self.prefix, self.feature_dim, {**header, "samples": self.samples, "tokens": self.tokens}
        )

    def abort(self) -> None:
        """Close and delete the temporary files (nothing at the final names is touched)."""
        for name, builder in self._builders.items():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                Path(self._parts[name] + ext).unlink(missing_ok=True)


def concatenate(prefixes: list[str], output, header: dict[str, Any]) -> dict[str, Any]:
    """Append complete datasets (validated first) into `output` with Megatron's IndexedDatasetBuilder.add_index."""
    output = str(output)
    headers = [validate(p, scan_tokens=False) for p in prefixes]
    feature_dim = headers[0]["feature_dim"] if headers else header["feature_dim"]
    for prefix, h in zip(prefixes, headers):
        if h["feature_dim"] != feature_dim:
            raise DatasetFormatError(
                f"{header_path(prefix)}: feature_dim {h['feature_dim']} differs from "
                f"{feature_dim} of {header_path(prefixes[0])}"
            )
    tmp = component_prefixes(f"{output}.partial", feature_dim > 0)
    try:
        for name, part in tmp.items():
            builder = IndexedDatasetBuilder(part + ".bin", dtype=_DTYPES[name])
            for prefix in prefixes:
                builder.add_index(component_prefixes(prefix, feature_dim > 0)[name])
            builder.finalize(get_idx_path(part))
    except BaseException:
        for part in tmp.values():
            for ext in (".bin", ".idx"):
                Path(part + ext).unlink(missing_ok=True)
        raise
    totals = {"samples": sum(h["samples"] for h in headers), "tokens": sum(h["tokens"] for h in headers)}
    return _publish(tmp, output, feature_dim, {**header, **totals})


def _publish(tmp_parts: dict[str, str], prefix: str, feature_dim: int, header: dict[str, Any]) -> dict[str, Any]:
    header = {**header, "format": FORMAT, "version": VERSION, "feature_dim": feature_dim}
    header_path(prefix).unlink(missing_ok=True)  # an old header must never describe the new files
    final = component_prefixes(prefix, feature_dim > 0)
    for name, tmp in tmp_parts.items():
        for ext in (".bin", ".idx"):
            os.replace(tmp + ext, final[name] + ext)
    write_json_atomic(header_path(prefix), header)
    return header


def write_json_atomic(path, value) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def remove_dataset(prefix) -> None:
    """Delete a dataset's files (header first, so a half-deleted dataset never looks complete)."""
    for path in [header_path(prefix)] + dataset_files(prefix)[:-1]:
        path.unlink(missing_ok=True)
    for path in dataset_files(f"{prefix}.partial")[:-1]:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- reader


@dataclasses.dataclass
class AudioTextFiles:
    """A validated audio-text dataset: its header and Megatron IndexedDatasets.

    `tokens`, `loss_mask` (and `features`, features mode) are
    megatron.core.datasets.indexed_dataset.IndexedDataset with one sequence per sample. Arrays they
    return are views of memory maps that close with the IndexedDataset: copy what must outlive it.
    """

    prefix: str
    header: dict[str, Any]
    tokens: Any
    loss_mask: Any
    features: Any | None

    @property
    def feature_dim(self) -> int:
        return int(self.header["feature_dim"])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample [samples] int32."""
        return self.tokens.sequence_lengths

    def sample_features(self, index: int) -> np.ndarray:
        """The <feat> frames of sample `index`: [frames, feature_dim] float16 ([0, dim] without features)."""
        if self.features is None:
            return np.zeros((0, self.feature_dim), FEATURE_DTYPE)
        return self.features[index].view(FEATURE_DTYPE).reshape(-1, self.feature_dim)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [n] int32, loss_mask [n] uint8, features [frames, dim] float16) of one sample."""
        return self.tokens[index], self.loss_mask[index], self.sample_features(index)

    def close(self) -> None:
        self.tokens = self.loss_mask = self.features = None


def open_audio_text(prefix, *, scan_tokens: bool = True) -> AudioTextFiles:
    """Open the dataset at `prefix` after `validate` (raises DatasetFormatError naming file and fix)."""
    prefix = str(prefix)
    header = validate(prefix, scan_tokens=scan_tokens)
    parts = component_prefixes(prefix, header["feature_dim"] > 0)
    datasets = {name: IndexedDataset(part, mmap=True) for name, part in parts.items()}
    return AudioTextFiles(prefix, header, datasets["tokens"], datasets["loss_mask"], datasets.get("features"))


def validate(prefix, *, scan_tokens: bool = True) -> dict[str, Any]:
    """Check every file of the dataset at `prefix` against the others; return the header.

    Refused with DatasetFormatError (naming the file and the fix): a missing or foreign header, an
    unknown format version, a .idx with a bad magic/version/dtype or a size that does not match its
    counts, a .bin shorter or longer than its index says (truncated copy), sequence counts or
    lengths that differ between tokens and loss mask, feature lengths that are not a multiple of
    feature_dim. With `scan_tokens` (reads every token once, chunked) also token ids outside the
    layout and feature frame counts that differ from the sample's number of <feat> tokens.
    Megatron's IndexedDataset asserts or reads garbage on most of these.
    """
    prefix = str(prefix)
    header = read_header(prefix)
    feature_dim = header["feature_dim"]
    parts = component_prefixes(prefix, feature_dim > 0)
    lengths = {name: check_indexed(part, _DTYPES[name]) for name, part in parts.items()}
    _check_counts(prefix, header, lengths)
    if feature_dim:
        _check_feature_lengths(parts["features"], lengths["features"], feature_dim)
    if scan_tokens:
        _scan_tokens(prefix, header, lengths["tokens"], lengths.get("features"))
    return header


def read_header(prefix) -> dict[str, Any]:
    path = header_path(prefix)
    if not path.exists():
        raise DatasetFormatError(
            f"{path}: missing; {prefix} is not a complete audio-text dataset (an interrupted run writes the header "
            f"last): re-run tools/preprocess_audio_text.py with --output-prefix {prefix}"
        )
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetFormatError(f"{path}: not valid JSON ({err}); {_FIX}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise DatasetFormatError(f"{path}: format {found!r} is not {FORMAT!r}; {_FIX}")
    if header.get("version") != VERSION:
        raise DatasetFormatError(
            f"{path}: format version {header.get('version')!r} is not supported (this code reads version {VERSION}); "
            "re-pack the data with this version of tools/preprocess_audio_text.py"
        )
    for key in ("mode", "text_vocab_size", "num_units", "feature_dim", "samples", "tokens"):
        if key not in header:
            raise DatasetFormatError(f"{path}: field {key!r} missing; {_FIX}")
    if header["mode"] not in ("units", "features") or (header["mode"] == "features") != (header["feature_dim"] > 0):
        raise DatasetFormatError(
            f"{path}: mode {header['mode']!r} with feature_dim {header['feature_dim']} is inconsistent; {_FIX}"
        )
    return header


def check_indexed(part: str, dtype) -> np.ndarray:
    """Validate part.idx/.bin without Megatron's asserts; return the sequence lengths [count] int32."""
    idx, bin_ = Path(part + ".idx"), Path(part + ".bin")
    for path in (idx, bin_):
        if not path.exists():
            raise DatasetFormatError(f"{path}: missing; {_FIX}")
    size = idx.stat().st_size
    with idx.open("rb") as f:
        head = f.read(_IDX_FIXED)
    if len(head) < _IDX_FIXED or head[:9] != _INDEX_HEADER:
        raise DatasetFormatError(f"{idx}: not a Megatron index file (bad magic {head[:9]!r}); {_FIX}")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise DatasetFormatError(f"{idx}: index version {version} is not supported (Megatron reads version 1); {_FIX}")
    code = head[17]
    expected = DType.code_from_dtype(np.dtype(dtype).type)
    if code != expected:
        name = DType(code).name if code in DType._value2member_map_ else f"unknown code {code}"
        raise DatasetFormatError(
            f"{idx}: dtype {name} but this file must hold {np.dtype(dtype).name} (code {expected}); "
            f"the file was written by another tool or belongs to another component; {_FIX}"
        )
    count, docs = struct.unpack("<QQ", head[18:34])
    want = _IDX_FIXED + count * (4 + 8) + docs * 8
    if size != want:
        raise DatasetFormatError(
            f"{idx}: {size} bytes but its counts ({count} sequences, {docs} document marks) need {want}; "
            f"the index is truncated or corrupt; {_FIX}"
        )
    raw = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(raw, np.int32, count, _IDX_FIXED).copy()
    pointers = np.frombuffer(raw, np.int64, count, _IDX_FIXED + 4 * count)
    doc_marks = np.frombuffer(raw, np.int64, docs, _IDX_FIXED + 12 * count)
    itemsize = np.dtype(dtype).itemsize
    expected_pointers = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]) * itemsize if count else pointers
    if (lengths < 0).any() or not np.array_equal(pointers, expected_pointers):
        raise DatasetFormatError(f"{idx}: sequence lengths and byte offsets disagree; the index is corrupt; {_FIX}")
    if docs == 0 or doc_marks[0] != 0 or doc_marks[-1] != count or (np.diff(doc_marks) < 0).any():
        raise DatasetFormatError(
            f"{idx}: document marks do not cover the {count} sequences; the index is corrupt; {_FIX}"
        )
    del raw
    data_bytes = int(lengths.sum(dtype=np.int64)) * itemsize
    actual = bin_.stat().st_size
    if actual != data_bytes:
        what = "truncated (an interrupted copy or write?)" if actual < data_bytes else "longer than its index"
        raise DatasetFormatError(
            f"{bin_}: {actual} bytes but {idx.name} describes {data_bytes} bytes ({count} sequences of "
            f"{np.dtype(dtype).name}); the .bin is {what}; {_FIX}"
        )
    return lengths


def _check_counts(prefix, header, lengths: dict[str, np.ndarray]) -> None:
    tokens, mask = lengths["tokens"], lengths["loss_mask"]
    parts = component_prefixes(prefix, "features" in lengths)
    for name, arr in lengths.items():
        if len(arr) != header["samples"]:
            raise DatasetFormatError(
                f"{parts[name]}.idx: {len(arr)} sequences but {header_path(prefix)} says {header['samples']} samples; "
                f"the files come from different runs; {_FIX}"
            )
    if not np.array_equal(tokens, mask):
        i = int(np.flatnonzero(tokens != mask)[0])
        raise DatasetFormatError(
            f"{parts['loss_mask']}.idx: sample {i} has {mask[i]} loss-mask entries but {prefix}.idx has {tokens[i]} "
            f"tokens; token and loss-mask files are from different runs; {_FIX}"
        )
    if int(tokens.sum(dtype=np.int64)) != header["tokens"]:
        raise DatasetFormatError(
            f"{header_path(prefix)}: says {header['tokens']} tokens but {prefix}.idx holds {int(tokens.sum())}; {_FIX}"
        )


def _check_feature_lengths(part: str, lengths: np.ndarray, feature_dim: int) -> None:
    bad = np.flatnonzero(lengths % feature_dim)
    if len(bad):
        i = int(bad[0])
        raise DatasetFormatError(
            f"{part}.idx: sample {i} has {lengths[i]} feature values, not a multiple of feature_dim {feature_dim}; "
            f"the features were written with another feature_dim; {_FIX}"
        )


def _scan_tokens(prefix: str, h: dict, lengths: np.ndarray, feature_lengths: np.ndarray | None) -> None:
    """Token ids inside the layout; per sample, #<feat> tokens == feature frames (features mode)."""
    vocab = h["text_vocab_size"] + 3 + h["num_units"]
    feat_id = h["text_vocab_size"] + 2
    ends = np.cumsum(lengths.astype(np.int64))
    total = int(ends[-1]) if len(ends) else 0
    data = np.memmap(f"{prefix}.bin", dtype=TOKEN_DTYPE, mode="r") if total else np.zeros(0, TOKEN_DTYPE)
    feats = np.zeros(len(lengths), np.int64)
    for start in range(0, total, _SCAN_CHUNK):
        chunk = np.asarray(data[start : start + _SCAN_CHUNK])
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab))
        if len(bad):
            pos = start + int(bad[0])
            raise DatasetFormatError(
                f"{prefix}.bin: sample {int(np.searchsorted(ends, pos, side='right'))} holds token id {int(data[pos])} "
                f"outside the layout of {prefix}.json (text {h['text_vocab_size']} + 3 markers + {h['num_units']} "
                f"units); {_FIX}"
            )
        where = np.flatnonzero(chunk == feat_id) + start
        np.add.at(feats, np.searchsorted(ends, where, side="right"), 1)
    del data
    frames = feature_lengths // h["feature_dim"] if feature_lengths is not None else np.zeros_like(feats)
    bad = np.flatnonzero(frames != feats)
    if len(bad):
        i = int(bad[0])
        raise DatasetFormatError(
            f"{prefix}{FEATURES_SUFFIX}.idx: sample {i} has {int(frames[i])} feature frames but {int(feats[i])} "
            f"<feat> tokens in {prefix}.bin; features and tokens are from different runs; {_FIX}"
        )


# ----------------------------------------------------------------------------------------- merge

# Header fields that must agree for samples of two datasets to mean the same thing to one model.
_SAME_TEXT = ("text_vocab_size", "tokenizer_sha256")  # token ids of another tokenizer are other words
_SAME_FILES = ("mode", "feature_dim")  # one set of .bin/.idx files holds one mode
_SAME_FEATURES = ("hubert_sha256", "hubert_layer")  # features of another model or layer are another space
_SAME_UNITS = ("num_units", "codebook_sha256", "units_layer")  # unit k of another codebook is another sound


def check_compatible(headers: list[tuple[str, dict]], *, action: str = "merge") -> None:
    """Raise DatasetFormatError naming the first field on which two datasets disagree.

    action="merge": one output file, so mode and feature_dim must agree too. action="blend": a
    training mixture may mix modes (features-mode ASR with units-mode TTS), but text ids, features
    and units must mean the same in every dataset that has them.
    """
    (first_prefix, first), rest = headers[0], headers[1:]
    for prefix, h in rest:
        fields = list(_SAME_TEXT) + (list(_SAME_FILES) if action == "merge" else [])
        if first["feature_dim"] and h["feature_dim"]:
            fields += list(_SAME_FEATURES)
        if first["num_units"] and h["num_units"]:
            fields += list(_SAME_UNITS)
        for field in fields:
            if first.get(field) != h.get(field):
                raise DatasetFormatError(
                    f"cannot {action} {prefix} with {first_prefix}: {field} is {h.get(field)!r} in {header_path(prefix)} "
                    f"but {first.get(field)!r} in {header_path(first_prefix)}; re-pack one of them with the other's "
                    "tokenizer, token layout and feature extractor/codebook"
                    + (" (or blend them at training time if only the mode differs)" if action == "merge" else "")
                )


def merge_datasets(inputs: list[str], output: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Concatenate compatible audio-text datasets (in order) into `output`; return the new header."""
    if not inputs:
        raise ConfigError("inputs: give at least one dataset prefix to merge")
    out = str(output)
    if Path(out).resolve() in [Path(p).resolve() for p in inputs]:
        raise ConfigError(f"output={out!r} is also an input; write the merge to a new prefix")
    if header_path(out).exists() and not overwrite:
        raise ConfigError(f"output={out!r}: a dataset is already there; pass --overwrite or choose another prefix")
    headers = [(str(p), read_header(p)) for p in inputs]
    check_compatible(headers, action="merge")
    first = headers[0][1]
    if overwrite:
        remove_dataset(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tasks = []
    for _, h in headers:
        for task in h["task"] if isinstance(h.get("task"), list) else [h.get("task")]:
            if task not in tasks:
                tasks.append(task)
    with_units = next((h for _, h in headers if h["num_units"]), first)
    reasons: dict[str, int] = {}
    for _, h in headers:
        for reason, n in h.get("rejected_by_reason", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    merged = {
        **{k: v for k, v in first.items() if k not in ("shards", "inputs")},
        "task": tasks,
        "num_units": with_units["num_units"],
        "codebook": with_units.get("codebook"),
        "codebook_sha256": with_units.get("codebook_sha256"),
        "units_layer": with_units.get("units_layer"),
        "audio_seconds": sum(h.get("audio_seconds", 0.0) for _, h in headers),
        "rejected": sum(h.get("rejected", 0) for _, h in headers),
        "rejected_by_reason": reasons,
        "sources": [p for p, _ in headers],
    }
    for key in ("samples", "tokens", "format", "version"):
        merged.pop(key, None)
    return concatenate([p for p, _ in headers], out, merged)
