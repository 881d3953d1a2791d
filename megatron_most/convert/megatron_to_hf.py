"""MoST torch_dist checkpoint -> Hugging Face safetensors, streamed tensor by tensor.

    most, stats = export(megatron_dir, out_dir)       # after platform.initialize(ParallelLayout())

1. Refuse an `out_dir` that exists and is not empty.
2. MoSTConfig from the checkpoint's most_config.json (written by hf_to_megatron) and the format:
   a text-only model with vanilla routing fits the plain DeepSeek-V2 format that transformers
   loads natively ("deepseek_v2"); a MoST model (MAMoE routing, audio vocabulary, audio
   projection) gets the MoST format ("most": DeepSeek-V2 tensor names plus the MoST extras,
   loaded by the remote code in hf_most/).
3. The template is MoSTModel's sharded state dict at TP = PP = EP = 1 on the meta device. For
   each tensor of mapping.items(most) (the ONE table, used in reverse: Megatron key -> the
   rule's primary HF names, i.e. the per-expert on-disk names of the hub) one entry of the
   template gets a real buffer and exactly its region is read with PyTorch DCP
   (TorchDistReader: resharded from whatever layout the checkpoint was saved at, e.g. one
   expert out of the stacked [E, 2I, H] tensor of a layer), then split into HF tensors:
       copy    as is
       swiglu  fc1 = [gate; up] -> gate_proj, up_proj halves
       vocab   deepseek_v2: the first text_vocab_size rows; most: the whole padded table
       new     most only: model.audio_projection.{weight,bias}
4. HF tensors go into safetensors shards of at most `max_shard_size` bytes (a tensor larger
   than that gets a shard of its own); a shard is written and dropped once full. Then
   model.safetensors.index.json, config.json (deepseek_v2: the hub's form, rope_scaling +
   rope_theta; most: hf_most.hf_config_dict + auto_map and the two code files), bos/eos ids
   (the tokenizer's, else given, else DeepSeek-V2's) and, if given, the tokenizer files; with
   `verify` the logits of the source and of the export loaded by transformers are compared.
   Everything goes to `.<name>.partial-<pid>` next to `out_dir`, renamed to `out_dir` at the
   end; a failed run (or a verify FAIL) leaves no `out_dir`.

Peak memory: one Megatron tensor (+ its HF halves) and one shard being filled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch

from megatron_most.convert import mapping
from megatron_most.convert.check import (
    DEFAULT_TOLERANCE,
    VerifyError,
    compare,
    has_audio,
    most_check_name,
    round_to,
    sample_batch,
)
from megatron_most.convert.hf_to_megatron import CONFIG_NAME, DTYPES
from megatron_most.convert.output import atomic_output, check_output
from megatron_most.model.config import MoSTConfig
from megatron_most.moe.config import MAMoEConfig
from megatron_most.options import ConfigError

DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)"
    r"|generation_config\.json)$"
)
FORMATS = ("auto", "deepseek_v2", "most")
DEFAULT_BOS_EOS = (100000, 100001)
"""DeepSeek-V2's <｜begin▁of▁sentence｜> / <｜end▁of▁sentence｜> ids."""
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format."""


@dataclasses.dataclass
class ExportStats:
    tensors: int = 0
    """HF tensors written."""
    shards: int = 0
    bytes: int = 0
    """Tensor bytes written."""
    largest_megatron_tensor_bytes: int = 0
    largest_shard_bytes: int = 0


# ---------------------------------------------------------------------------------------------
# config


def load_most_config(megatron_dir) -> MoSTConfig:
    """The MoSTConfig saved next to a converted checkpoint (most_config.json)."""
    path = Path(megatron_dir) / CONFIG_NAME
    if not path.is_file():
        raise ExportError(
            f"{path} not found: the MoSTConfig of the checkpoint is needed (hf-to-megatron writes it next to the checkpoint)"
        )
    values = json.loads(path.read_text())
    mamoe = dict(values.pop("mamoe"))
    for key in ("text_experts", "audio_experts"):
        if mamoe.get(key) is not None:
            mamoe[key] = tuple(mamoe[key])
    return MoSTConfig.from_dict({**values, "mamoe": MAMoEConfig.from_dict(mamoe)})


def plain_reasons(most: MoSTConfig) -> list[str]:
    """Why `most` does not fit the plain DeepSeek-V2 format (empty: it fits)."""
    reasons = []
    if most.mamoe.variant != "vanilla":
        reasons.append(f"MAMoE routing (variant={most.mamoe.variant!r}) has no DeepSeek-V2 equivalent")
    if most.num_units or most.audio_feature_dim:
        reasons.append(
            f"audio paths (num_units={most.num_units}, audio_feature_dim={most.audio_feature_dim}) "
            "add vocabulary rows and the audio projection"
        )
    shared = most.mamoe.shared_expert_size
    if shared == 0 or shared % most.moe_ffn_size:
        reasons.append(
            f"shared_expert_size={shared}: transformers' DeepseekV2 needs a positive multiple of "
            f"moe_ffn_size={most.moe_ffn_size}"
        )
    return reasons


def check_plain_deepseek(most: MoSTConfig) -> None:
    """Raise ExportError unless `most` is a text-only DeepSeek-V2 (vanilla routing, no audio)."""
    reasons = plain_reasons(most)
    if reasons:
        raise ExportError(
            "this is a MoST model, not a plain DeepSeek-V2: "
            + "; ".join(reasons)
            + ". The plain DeepSeek-V2 format cannot hold it: use the MoST remote-code export (--format most)."
        )


def special_token_ids(
    most: MoSTConfig, tokenizer=None, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict:
    """bos/eos ids for config.json: the tokenizer's (from `tokenizer`, a directory), else the
    given ids, else DeepSeek-V2's (100000, 100001); each must be a text token id."""
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    flags = {"bos_token_id": "--bos-id", "eos_token_id": "--eos-id"}
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as e:  # noqa: BLE001 - any loading problem is a bad --tokenizer
            raise ExportError(f"--tokenizer {tokenizer}: transformers cannot load it ({type(e).__name__}: {e})") from e
        for field in ids:
            found = getattr(tok, field, None)
            if found is None:
                continue
            if ids[field] is not None and ids[field] != found:
                raise ConfigError(
                    f"{field}={ids[field]} ({flags[field]}) differs from the tokenizer's {found} in {tokenizer}: drop "
                    f"{flags[field]} or give the matching tokenizer"
                )
            ids[field] = found
    for field, default in zip(ids, DEFAULT_BOS_EOS):
        value = default if ids[field] is None else ids[field]
        if not 0 <= value < most.text_vocab_size:
            raise ConfigError(
                f"{field}={value} is outside the text vocabulary (text_vocab_size={most.text_vocab_size}): give "
                f"{flags[field]} or --tokenizer with the model's tokenizer"
            )
        ids[field] = value
    return ids


def hf_config(most: MoSTConfig, dtype: torch.dtype, fmt: str = "deepseek_v2", **overrides) -> dict:
    """config.json of the export: the hub's DeepSeek-V2 form (rope_scaling + top-level rope_theta)
    for a text-only vanilla model, or the MoST remote-code config (write_remote_code adds
    auto_map). mapping.config_from_hf inverts the DeepSeek-V2 fields."""
    if fmt == "most":
        from megatron_most.convert.hf_most import hf_config_dict

        fields = hf_config_dict(most)
    else:
        fields = dict(
            architectures=["DeepseekV2ForCausalLM"],
            model_type="deepseek_v2",
            **mapping.hf_config_fields(most, rope="scaling"),
        )
    return {**fields, "use_cache": True, "torch_dtype": _DTYPE_NAMES[dtype], **overrides}


# ---------------------------------------------------------------------------------------------
# the table in reverse


def hf_names(item: mapping.Item, fmt: str = "deepseek_v2") -> tuple[str, ...]:
    """The on-disk HF names of `item` (the rule's primary layout: per-expert tensors)."""
    if not item.rule.hf or (item.rule.kind == "new" and fmt != "most"):
        raise ExportError(f"{item.key}: no DeepSeek-V2 tensor holds it (a MoST-only weight: --format most)")
    return item.hf_names(mapping.Source(item.rule.hf))


def to_hf(
    item: mapping.Item, tensor: torch.Tensor, most: MoSTConfig, fmt: str = "deepseek_v2"
) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one Megatron tensor (inverse of mapping.produce). The MoST format keeps
    the whole padded vocabulary and the MoST-only ("new") tensors."""
    names, kind = hf_names(item, fmt), item.rule.kind
    if kind == "copy" or kind == "new" or (kind == "vocab" and fmt == "most"):
        return [(names[0], tensor)]
    if kind == "swiglu":
        if tensor.shape[0] % 2:
            raise ExportError(f"{item.key}: SwiGLU fc1 with an odd number of rows {tuple(tensor.shape)}")
        half = tensor.shape[0] // 2
        return [(names[0], tensor[:half]), (names[1], tensor[half:])]
    if kind == "vocab":
        if tensor.shape[0] < most.text_vocab_size:
            raise ExportError(f"{item.key}: {tensor.shape[0]} rows, fewer than text_vocab_size={most.text_vocab_size}")
        return [(names[0], tensor[: most.text_vocab_size])]
    raise ExportError(f"{item.key}: rule kind {kind!r} has no HF tensor")


def _order(item: mapping.Item, position: int):
    """Hub order: embeddings, layer by layer (experts in order), final norm, lm_head."""
    if item.layer is not None:
        return (1, item.layer, position, item.expert or 0)
    return (0 if item.key.startswith("embedding.") else 2, 0, position, 0)


# ---------------------------------------------------------------------------------------------
# reading the torch_dist checkpoint one tensor at a time


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
        from megatron.core.dist_checkpointing.strategies.torch import flatten_state_dict

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
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from torch.distributed.checkpoint import load as dcp_load

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


def _cached_reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class CachedReader(FileSystemReader):
        """Reads .metadata once (it is re-read by every DCP load otherwise)."""

        _metadata = None

        def read_metadata(self, *args, **kwargs):
            if self._metadata is None:
                self._metadata = super().read_metadata(*args, **kwargs)
            return self._metadata

    return CachedReader


def _CachedReader(path):
    return _cached_reader_class()(path)


def _ChunkPlanner(targets):
    """A DCP load planner reading regions [(fqn, global offset, destination tensor)] only."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata, self.is_coordinator, self.state_dict = metadata, is_coordinator, {}
            self.targets = {(fqn, offset): t for fqn, offset, t in targets}

        def create_local_plan(self):
            items = []
            for fqn, offset, t in targets:
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

    return ChunkPlanner()


# ---------------------------------------------------------------------------------------------
# writing


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


class _ShardWriter:
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
        from safetensors.torch import save_file

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


def choose_format(most: MoSTConfig, fmt: str = "auto") -> str:
    """ "deepseek_v2" (plain, transformers-native) or "most" (remote code) for `fmt` in FORMATS."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {FORMATS} (--format)")
    if fmt == "auto":
        return "most" if plain_reasons(most) else "deepseek_v2"
    if fmt == "deepseek_v2":
        check_plain_deepseek(most)
    return fmt


def export(
    megatron_dir,
    out_dir,
    *,
    tokenizer=None,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    fmt: str = "auto",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
) -> tuple[MoSTConfig, ExportStats]:
    """Export a MoST checkpoint as a Hugging Face checkpoint. Needs platform.initialize(ParallelLayout())
    in this (single) process. `fmt`: "deepseek_v2" (text-only vanilla models), "most" (remote
    code: MAMoE routing, audio paths) or "auto" (the plain format when the model fits it).
    `dtype`: of the HF tensors (default: as stored in the checkpoint). With `verify`, the logits
    are checked (see `verify`) before the export is renamed into place; a FAIL raises VerifyError
    and leaves no `out_dir`."""
    from megatron_most.convert.hf_to_megatron import build_template

    out_dir, megatron_dir = Path(out_dir), Path(megatron_dir)
    check_output(out_dir)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max shard size {max_shard_size!r} must be positive")
    most = load_most_config(megatron_dir)
    fmt = choose_format(most, fmt)
    special = special_token_ids(most, tokenizer, bos_token_id, eos_token_id)
    reader = TorchDistReader(megatron_dir, build_template(most))
    items = list(mapping.items(most))
    missing = [i.key for i in items if i.key not in reader.entries]
    if missing:
        raise RuntimeError(f"mapping table and MoSTModel disagree: not in the model {missing[:5]}")
    positions = {id(rule): n for n, rule in enumerate(mapping.RULES)}
    items.sort(key=lambda i: _order(i, positions[id(i.rule)]))
    stored = {reader.stored_dtype(i.key) for i in items}
    if dtype is None:
        dtype = torch.bfloat16 if torch.bfloat16 in stored else next(iter(stored))
    if dtype not in _DTYPE_NAMES:
        raise ExportError(f"dtype {dtype}: choose one of {sorted(DTYPES)}")

    stats = ExportStats()
    with atomic_output(out_dir) as tmp:
        log(
            f"exporting {len(items)} tensors of {megatron_dir} into {tmp.name} ({fmt} format, {_DTYPE_NAMES[dtype]}, "
            f"shards <= {max_bytes} bytes)"
        )
        shards = _ShardWriter(tmp, max_bytes, stats)
        for item in items:
            tensor = reader.get(item.key)
            stats.largest_megatron_tensor_bytes = max(
                stats.largest_megatron_tensor_bytes, tensor.numel() * tensor.element_size()
            )
            for name, hf_tensor in to_hf(item, tensor, most, fmt):
                shards.add(name, hf_tensor.to(dtype))
            del tensor
        shards.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config(most, dtype, fmt, **special), indent=2) + "\n")
        if fmt == "most":
            from megatron_most.convert.hf_most import write_remote_code

            write_remote_code(tmp)
        if tokenizer is not None:
            copied = copy_tokenizer(tokenizer, tmp)
            log(f"copied tokenizer files {copied}")
        if verify:
            _, ok = verify_export(megatron_dir, tmp, most, tolerance=tolerance, log=log)
            if not ok:
                raise VerifyError(
                    f"--verify FAILED: the export does not reproduce {megatron_dir}'s logits; nothing was written to {out_dir}"
                )
    log(f"wrote {out_dir}: {stats.tensors} tensors in {stats.shards} shard(s), {stats.bytes / 2**20:.1f} MiB")
    return most, stats


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Speech and text share one decoder: modality-aware experts "
    "route audio tokens to audio experts and text tokens to text experts, and the rest of the network is shared."
)


def _sample_ids(out_dir: Path, most: MoSTConfig, batch: int, seq: int, seed: int, log) -> torch.Tensor:
    """SAMPLE_TEXT tokenized with the exported tokenizer (if any, ids within the text vocabulary),
    else seeded random text tokens."""
    if any(TOKENIZER_FILES.match(p.name) and p.name != "generation_config.json" for p in Path(out_dir).iterdir()):
        try:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(str(out_dir))(SAMPLE_TEXT, return_tensors="pt")["input_ids"][:, :seq]
            if ids.numel() and int(ids.max()) < most.text_vocab_size and int(ids.min()) >= 0:
                log(f"verify: {ids.shape[1]} tokens of sample text")
                return ids
            log("verify: the tokenizer gives ids outside the text vocabulary; using random tokens")
        except Exception as e:  # noqa: BLE001 - a tokenizer problem must not hide the weight check
            log(f"verify: tokenizer not usable ({type(e).__name__}: {e}); using random tokens")
    return torch.randint(0, most.text_vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def verify_export(
    megatron_dir,
    out_dir,
    most: MoSTConfig,
    *,
    batch: int = 2,
    seq: int = 32,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    log=print,
) -> tuple[float, bool]:
    """Logits of the source MoSTModel (TP1, fp32, loaded from the torch_dist checkpoint, its
    weights rounded to the export's dtype) and of the model transformers loads from the export
    (fp32; the remote code for the MoST format) on the same inputs: SAMPLE_TEXT tokenized with the
    exported tokenizer or seeded random text, and for a MoST model unit tokens and
    <boa> <feat>... <eoa> spans with audio features. Prints the max abs difference and PASS/FAIL."""
    from transformers import AutoModelForCausalLM

    from megatron_most.convert.hf_to_megatron import load_into
    from megatron_most.model.most import build_model

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    remote = config.get("model_type") == "most"
    seq = min(seq, most.seq_length)
    model = build_model(most, most.transformer_config(), use_te=False).eval()
    load_into(model, megatron_dir)
    exported = {v: k for k, v in _DTYPE_NAMES.items()}[config.get("torch_dtype", "float32")]
    round_to(model, exported)  # compare at the precision the export holds
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, trust_remote_code=remote).eval()
    text = _sample_ids(out_dir, most, batch, seq, seed, log)
    if remote:
        ids, features = sample_batch(most, batch, seq, seed, text_ids=text)
        what = most_check_name(most) if has_audio(most) else "text"
        with torch.no_grad():
            expected = model(input_ids=ids, position_ids=None, attention_mask=None, audio_features=features)
            got = hf(input_ids=ids, audio_features=features).logits
    else:
        what = "text"
        with torch.no_grad():
            expected = model(input_ids=text, position_ids=None, attention_mask=None)[..., : most.text_vocab_size]
            got = hf(input_ids=text).logits
    diff, ok = compare(expected, got, what, tolerance, log)
    log(f"verify: {'PASS' if ok else 'FAIL'}")
    return diff, ok


__all__ = [
    "export",
    "verify_export",
    "choose_format",
    "special_token_ids",
    "plain_reasons",
    "FORMATS",
    "load_most_config",
    "check_plain_deepseek",
    "hf_config",
    "to_hf",
    "hf_names",
    "ExportError",
    "ExportStats",
    "TorchDistReader",
    "parse_size",
    "DTYPES",
    "ConfigError",
]
