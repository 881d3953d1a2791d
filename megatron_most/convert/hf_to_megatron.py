"""HF DeepSeek-V2(-Lite) safetensors -> MoST torch_dist checkpoint, streamed tensor by tensor.

    most, stats = convert(hf_dir, out_dir, preset("deepseek_v2_lite_most"), layout=ParallelLayout(tp=2, sp=True))

1. Refuse an `out_dir` that exists and is not empty (a checkpoint or anything else).
2. Read config.json -> MoSTConfig (hf_config.config_from_hf: the preset's MAMoE groups, audio
   paths and seq_length with the HF architecture) and check the target `layout` against it
   (check_target_layout) before any shard is opened. Then read the HF index and shard headers
   (hf_reader: missing/truncated shards, an index naming absent tensors).
3. Build MoSTModel at TP = PP = EP = 1 on the meta device; its sharded state dict is the
   template. Every template tensor is matched to one rule of mapping.RULES; every HF tensor it
   needs must exist with the shape the config implies, and every HF tensor must be used. All
   problems are reported at once, before anything is written.
4. write_torch_dist into `.<name>.partial-<pid>` next to `out_dir`, one tensor at a time
   (routed experts copied by index, router copied, vocabulary rows for audio markers/units and
   the audio projection newly initialised from `seed`), in the HF checkpoint's dtype unless
   `dtype` says otherwise, plus most_config.json; with `verify`, check the logits (text, and
   text + audio for MoST) with the Megatron side run at `layout` (gloo ranks on this machine
   when it is not TP = PP = EP = 1); then conversion.json (source, dtype, seed, target layout,
   verify figures) and rename it to `out_dir`. A failed run or a verify FAIL leaves no `out_dir`.

The checkpoint itself does not depend on `layout`: it reshards to any layout on load
(dist_checkpointing), like one saved by training. `layout` is what it is checked and verified
for, and recorded in conversion.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import flatten_state_dict

from megatron_most.convert import hf_config, mapping
from megatron_most.convert.common import DTYPES, SPECIAL_TOKENS, build_template, write_most_config, write_record
from megatron_most.convert.hf_reader import CheckpointError, HFCheckpoint, read_config
from megatron_most.convert.output import atomic_output, check_output
from megatron_most.convert.verify import DEFAULT_TOLERANCE, VerifyError, verify
from megatron_most.convert.writer import write_torch_dist
from megatron_most.model.config import MoSTConfig
from megatron_most.model.layout import check_layout, default_world_size, stage_layers
from megatron_most.options import ConfigError
from megatron_most.platform.layout import ParallelLayout


def _template_entries(template) -> dict:
    """flattened template key -> (local shape, dtype) for every entry needing a loader."""
    flat, _ = flatten_state_dict(template)
    out = {}
    for key, value in flat.items():
        if isinstance(value, ShardedTensorFactory):
            out[key] = (tuple(value.data.shape), value.data.dtype)
        elif isinstance(value, ShardedTensor):
            out[key] = (tuple(value.local_shape), value.dtype)
    return out


def plan(ckpt: HFCheckpoint, most: MoSTConfig, entries: dict) -> list[tuple]:
    """(item, source, shape, dtype) per template tensor; raises CheckpointError listing every
    missing HF tensor, shape mismatch and unused HF tensor."""
    items = list(mapping.items(most))
    keys = {i.key for i in items}
    if keys != set(entries):
        raise RuntimeError(
            f"mapping table and MoSTModel disagree: not in the model {sorted(keys - set(entries))[:5]}, "
            f"not in the table {sorted(set(entries) - keys)[:5]}"
        )
    problems, planned, used = [], [], set()
    for item in items:
        shape, dtype = entries[item.key]
        try:
            source = mapping.choose_source(item, ckpt.has)
        except KeyError as e:
            problems.append(str(e.args[0]))
            continue
        if source is not None:
            src, names = source
            used.update(names)
            for name in names:
                got = ckpt.shape(name)
                if src.stacked:
                    want = (most.mamoe.num_experts, *shape)  # fused experts: [E, 2I, H] / [E, H, I]
                elif item.rule.kind == "swiglu":
                    want = (shape[0] // 2, *shape[1:])
                elif item.rule.kind == "vocab":  # DeepSeek: the text rows; a MoST export: the padded table
                    want = shape if got[0] == shape[0] else (most.text_vocab_size, *shape[1:])
                else:
                    want = shape
                if got != want:
                    problems.append(
                        f"{name} ({ckpt.file_of(name)}): shape {list(got)}, but config.json implies {list(want)} "
                        f"[{item.rule.fields}]"
                    )
        planned.append((item, source, shape, dtype))
    unused = [n for n in ckpt.names() if n not in used and not any(r.match(n) for r in mapping.IGNORED_HF)]
    if not most.mamoe.has_shared_experts:  # the NoShared variant drops DeepSeek's shared experts
        unused = [n for n in unused if ".mlp.shared_experts." not in n]
    if unused:
        problems.append(
            f"{len(unused)} HF tensor(s) not used by the mapping, e.g. {unused[:4]}: config.json "
            "(num_hidden_layers, n_routed_experts, first_k_dense_replace) does not describe these tensors"
        )
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"{ckpt.dir}: checkpoint does not match config.json:\n  {shown}{more}")
    return planned


def source_dtype(ckpt: HFCheckpoint) -> torch.dtype:
    """The dtype of the HF checkpoint's floating tensors (the largest share of bytes if mixed)."""
    by_dtype: dict[torch.dtype, int] = {}
    for name in ckpt.names():
        dtype = ckpt.dtype(name)
        if dtype.is_floating_point:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + ckpt.nbytes(name)
    if not by_dtype:
        raise CheckpointError(f"{ckpt.dir}: no floating-point tensors")
    dtype = max(by_dtype, key=by_dtype.get)
    return dtype if dtype in DTYPES.values() else torch.float32


def check_target_layout(most: MoSTConfig, layout: ParallelLayout, source="the model") -> None:
    """ConfigError unless MoSTModel `most` can be built at `layout`, by the library's checks:
    model.layout.check_layout (EP divides the routed experts, MoE with TP needs SP, TP divides the
    heads, dense and shared FFN widths and the padded vocabulary, ETP the expert FFN width) and
    model.layout.stage_layers (PP <= layers, split by Megatron's own functions)."""
    try:
        check_layout(most, layout)
        stage_layers(most, layout)
    except ConfigError as e:
        raise ConfigError(f"target layout {layout.describe()} does not fit {source}: {e}") from e


def convert(
    hf_dir,
    out_dir,
    base: MoSTConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    layout: ParallelLayout | None = None,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
):
    """Convert; needs platform.initialize(ParallelLayout()) in this (single) process. `dtype`:
    of the written tensors (default: the HF checkpoint's). `layout` (default TP = PP = EP = 1):
    the target layout, checked against the model before any shard is read, verified at, and
    recorded in conversion.json; the checkpoint still loads at any layout. With `verify`, the
    logits are checked (see verify.verify) before the checkpoint is renamed into place; a FAIL raises
    VerifyError and leaves no `out_dir`. Returns (MoSTConfig, WriteStats)."""
    out_dir = Path(out_dir)
    layout = layout or ParallelLayout()
    check_output(out_dir)
    most = hf_config.config_from_hf(read_config(hf_dir), base)
    check_target_layout(most, layout, f"{hf_dir}'s config.json")
    ckpt = HFCheckpoint(hf_dir)
    dtype = dtype or source_dtype(ckpt)
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype={dtype}: choose one of {sorted(DTYPES)} (--dtype)")
    template = build_template(most, dtype)
    planned = plan(ckpt, most, _template_entries(template))
    loaders = {
        item.key: (
            lambda item=item, source=source, shape=shape, dtype=dtype: mapping.produce(
                item, source, ckpt.get, shape, dtype, most, seed, get_row=ckpt.get_row
            )
        )
        for item, source, shape, dtype in planned
    }
    with atomic_output(out_dir) as tmp:
        log(f"converting {len(loaders)} tensors from {ckpt.dir} into {tmp.name} ({str(dtype).removeprefix('torch.')})")
        stats = write_torch_dist(template, loaders, tmp)
        write_most_config(tmp, most)
        checked = None
        if verify:
            checked = _verify_or_raise(
                hf_dir, tmp, most, out_dir, layout=layout, tolerance=tolerance, seed=seed, log=log
            )
        write_record(tmp, conversion_record(hf_dir, dtype, seed, layout, checked))
    log(
        f"wrote {out_dir}: {stats.entries} tensors, {stats.bytes / 2**20:.1f} MiB (target layout {layout.describe()}, "
        "loads at any layout)"
    )
    return most, stats


def conversion_record(hf_dir, dtype: torch.dtype, seed: int, layout: ParallelLayout, checked: dict | None) -> dict:
    """conversion.json next to most_config.json: what the checkpoint was made from and for, with
    the source's special token ids and generation config (megatron-to-hf writes them back)."""
    source = read_config(hf_dir)
    generation = Path(hf_dir) / "generation_config.json"
    return dict(
        source=str(Path(hf_dir).resolve()),
        source_format=source.get("model_type"),
        dtype={v: k for k, v in DTYPES.items()}[dtype],
        seed=seed,
        layout=dict(
            tp=layout.tp,
            pp=layout.pp,
            ep=layout.ep,
            etp=layout.expert_tp,
            sp=layout.sp,
            smallest_world_size=default_world_size(layout),
        ),
        note="torch_dist checkpoint: reshards on load to any layout that divides the model, not only this one",
        special_tokens={k: source[k] for k in SPECIAL_TOKENS if source.get(k) is not None},
        generation_config=json.loads(generation.read_text()) if generation.is_file() else None,
        verify=checked,
    )


def _verify_or_raise(hf_dir, tmp, most, out_dir, *, layout: ParallelLayout, **kwargs) -> dict:
    diffs, ok = verify(hf_dir, tmp, most, layout=layout, **kwargs)
    if not ok:
        raise VerifyError(
            f"--verify FAILED: the conversion does not reproduce {hf_dir}'s logits; nothing was written to {out_dir}"
        )
    return dict(layout=layout.describe(), max_abs_logit_diff=diffs, passed=True)
