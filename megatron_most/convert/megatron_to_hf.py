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
   (reader.TorchDistReader: resharded from whatever layout the checkpoint was saved at, e.g. one
   expert out of the stacked [E, 2I, H] tensor of a layer), then split into HF tensors:
       copy    as is
       swiglu  fc1 = [gate; up] -> gate_proj, up_proj halves
       vocab   deepseek_v2: the first text_vocab_size rows; most: the whole padded table
       new     most only: model.audio_projection.{weight,bias}
4. HF tensors go into safetensors shards of at most `max_shard_size` bytes (hf_writer.ShardWriter:
   a tensor larger than that gets a shard of its own; a shard is written and dropped once full). Then
   model.safetensors.index.json, config.json (deepseek_v2: the hub's form, rope_scaling +
   rope_theta; most: hf_most.hf_config_dict + auto_map and the two code files), bos/eos/pad ids
   (given, else the tokenizer's, else the source's from conversion.json, else DeepSeek-V2's),
   generation_config.json (the source's, <feat> suppressed for MoST) and, if given, the
   tokenizer files; with
   `verify` the logits of the source and of the export loaded by transformers are compared
   (verify.verify_export).
   Everything goes to `.<name>.partial-<pid>` next to `out_dir`, renamed to `out_dir` at the
   end; a failed run (or a verify FAIL) leaves no `out_dir`.

Peak memory: one Megatron tensor (+ its HF halves) and one shard being filled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from megatron_most.convert import mapping
from megatron_most.convert.common import (
    DTYPES,
    HF_DTYPE_NAMES,
    ExportError,
    build_template,
    load_most_config,
    read_record,
)
from megatron_most.convert.hf_config import hf_config_fields
from megatron_most.convert.hf_most import hf_config_dict, write_remote_code
from megatron_most.convert.hf_writer import ExportStats, ShardWriter, copy_tokenizer, parse_size
from megatron_most.convert.output import atomic_output, check_output
from megatron_most.convert.reader import TorchDistReader
from megatron_most.convert.verify import DEFAULT_TOLERANCE, VerifyError, verify_export
from megatron_most.model.config import MoSTConfig
from megatron_most.options import ConfigError

DEFAULT_MAX_SHARD_SIZE = "5GB"
FORMATS = ("auto", "deepseek_v2", "most")
DEFAULT_BOS_EOS = (100000, 100001)
"""DeepSeek-V2's <｜begin▁of▁sentence｜> / <｜end▁of▁sentence｜> ids."""


# ---------------------------------------------------------------------------------------------
# config


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


FLAGS = {"bos_token_id": "--bos-id", "eos_token_id": "--eos-id", "pad_token_id": "--pad-id"}


def special_token_ids(most: MoSTConfig, tokenizer=None, recorded: dict | None = None, **given) -> dict:
    """bos/eos (and pad) ids for config.json. Each comes from, first to last: the flag (`given`:
    bos_token_id=..., eos_token_id=..., pad_token_id=...), the tokenizer in directory
    `tokenizer`, the source checkpoint's ids recorded in conversion.json (`recorded`), else
    DeepSeek-V2's bos/eos (100000, 100001; no pad). A flag that contradicts the tokenizer is an
    error; every id (an id or a list of ids, as HF allows for eos) must be a text token id."""
    ids = {field: given.get(field) for field in FLAGS}
    if tokenizer is not None:
        for field, found in _tokenizer_ids(tokenizer).items():
            if ids[field] is not None and ids[field] != found:
                raise ConfigError(
                    f"{field}={ids[field]} ({FLAGS[field]}) differs from the tokenizer's {found} in {tokenizer}: drop "
                    f"{FLAGS[field]} or give the matching tokenizer"
                )
            ids[field] = found
    for field, default in zip(FLAGS, (*DEFAULT_BOS_EOS, None)):
        if ids[field] is None:
            ids[field] = (recorded or {}).get(field, default)
        for value in ids[field] if isinstance(ids[field], list) else [ids[field]]:
            if value is not None and not 0 <= value < most.text_vocab_size:
                raise ConfigError(
                    f"{field}={value} is outside the text vocabulary (text_vocab_size={most.text_vocab_size}): give "
                    f"{FLAGS[field]} or --tokenizer with the model's tokenizer"
                )
    return {field: value for field, value in ids.items() if value is not None}


def _tokenizer_ids(tokenizer) -> dict:
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:  # noqa: BLE001 - any loading problem is a bad --tokenizer
        raise ExportError(f"--tokenizer {tokenizer}: transformers cannot load it ({type(e).__name__}: {e})") from e
    return {field: getattr(tok, field) for field in FLAGS if getattr(tok, field, None) is not None}


def generation_config(most: MoSTConfig, fmt: str, special: dict, recorded: dict | None) -> dict | None:
    """generation_config.json: the source's (from conversion.json) with the export's special ids;
    a MoST model never emits <feat> (a frame comes from audio, not from the model), so greedy and
    sampled decoding suppress it. None when there is nothing to write."""
    config = dict(recorded or {})
    if fmt == "most" and most.audio_feature_dim:
        config["suppress_tokens"] = sorted({*config.get("suppress_tokens", []), most.tokens.feature})
    if not config:
        return None
    return {**config, **special}


def hf_config(most: MoSTConfig, dtype: torch.dtype, fmt: str = "deepseek_v2", **overrides) -> dict:
    """config.json of the export: the hub's DeepSeek-V2 form (rope_scaling + top-level rope_theta)
    for a text-only vanilla model, or the MoST remote-code config (write_remote_code adds
    auto_map). hf_config.config_from_hf inverts the DeepSeek-V2 fields."""
    if fmt == "most":
        fields = hf_config_dict(most)
    else:
        fields = dict(
            architectures=["DeepseekV2ForCausalLM"],
            model_type="deepseek_v2",
            **hf_config_fields(most, rope="scaling"),
        )
    return {**fields, "use_cache": True, "torch_dtype": HF_DTYPE_NAMES[dtype], **overrides}


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
# export


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
    pad_token_id: int | None = None,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
) -> tuple[MoSTConfig, ExportStats]:
    """Export a MoST checkpoint as a Hugging Face checkpoint. Needs platform.initialize(ParallelLayout())
    in this (single) process. `fmt`: "deepseek_v2" (text-only vanilla models), "most" (remote
    code: MAMoE routing, audio paths) or "auto" (the plain format when the model fits it).
    `dtype`: of the HF tensors (default: as stored in the checkpoint). With `verify`, the logits
    are checked (see verify.verify_export) before the export is renamed into place; a FAIL raises
    VerifyError and leaves no `out_dir`."""
    out_dir, megatron_dir = Path(out_dir), Path(megatron_dir)
    check_output(out_dir)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max shard size {max_shard_size!r} must be positive")
    most = load_most_config(megatron_dir)
    fmt = choose_format(most, fmt)
    record = read_record(megatron_dir)
    special = special_token_ids(
        most, tokenizer, record.get("special_tokens"), bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )  # fmt: skip
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
    if dtype not in HF_DTYPE_NAMES:
        raise ExportError(f"dtype {dtype}: choose one of {sorted(DTYPES)}")

    stats = ExportStats()
    with atomic_output(out_dir) as tmp:
        log(
            f"exporting {len(items)} tensors of {megatron_dir} into {tmp.name} ({fmt} format, {HF_DTYPE_NAMES[dtype]}, "
            f"shards <= {max_bytes} bytes)"
        )
        shards = ShardWriter(tmp, max_bytes, stats)
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
        generation = generation_config(most, fmt, special, record.get("generation_config"))
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if fmt == "most":
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
