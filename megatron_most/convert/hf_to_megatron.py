"""HF DeepSeek-V2(-Lite) safetensors -> MoST torch_dist checkpoint, streamed tensor by tensor.

    most, stats = convert(hf_dir, out_dir, preset("deepseek_v2_lite_most"), layout=ParallelLayout(tp=2, sp=True))

1. Refuse an `out_dir` that exists and is not empty (a checkpoint or anything else).
2. Read config.json -> MoSTConfig (mapping.config_from_hf: the preset's MAMoE groups, audio
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

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

from megatron_most.convert import mapping
from megatron_most.convert.check import (
    DEFAULT_TOLERANCE,
    VerifyError,
    compare,
    has_audio,
    most_check_name,
    sample_batch,
)
from megatron_most.convert.hf_reader import CheckpointError, HFCheckpoint, read_config
from megatron_most.convert.output import atomic_output, check_output
from megatron_most.model.config import MoSTConfig
from megatron_most.options import ConfigError
from megatron_most.platform.layout import ParallelLayout

CONFIG_NAME = "most_config.json"
RECORD_NAME = "conversion.json"


def _template_entries(template) -> dict:
    """flattened template key -> (local shape, dtype) for every entry needing a loader."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.strategies.torch import flatten_state_dict

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
                elif item.rule.kind == "vocab":
                    want = (most.text_vocab_size, *shape[1:])
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


def build_template(most: MoSTConfig, dtype: torch.dtype | None = None):
    """MoSTModel's sharded state dict at TP = PP = EP = 1 on the meta device; floating tensors
    in `dtype` if given (the dtype the checkpoint is written in)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_most.model.estimate import build_meta_model

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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    estimate.check_layout (EP divides the routed experts, MoE with TP needs SP, TP divides the
    heads, dense and shared FFN widths and the padded vocabulary, ETP the expert FFN width) and
    estimate.stage_layers (PP <= layers, split by Megatron's own functions)."""
    from megatron_most.model.estimate import check_layout, stage_layers

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
    logits are checked (see `verify`) before the checkpoint is renamed into place; a FAIL raises
    VerifyError and leaves no `out_dir`. Returns (MoSTConfig, WriteStats)."""
    from megatron_most.convert.writer import write_torch_dist

    out_dir = Path(out_dir)
    layout = layout or ParallelLayout()
    check_output(out_dir)
    most = mapping.config_from_hf(read_config(hf_dir), base)
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
        write_record(tmp, hf_dir, dtype, seed, layout, checked)
    log(
        f"wrote {out_dir}: {stats.entries} tensors, {stats.bytes / 2**20:.1f} MiB (target layout {layout.describe()}, "
        "loads at any layout)"
    )
    return most, stats


def write_most_config(directory, most: MoSTConfig) -> None:
    """most_config.json next to a checkpoint: the MoSTConfig megatron-to-hf and training read."""
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(most), indent=1, default=list))


def write_record(
    directory, hf_dir, dtype: torch.dtype, seed: int, layout: ParallelLayout, checked: dict | None
) -> None:
    """conversion.json next to most_config.json: what the checkpoint was made from and for."""
    from megatron_most.model.estimate import default_world_size

    record = dict(
        source=str(Path(hf_dir).resolve()),
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
        verify=checked,
    )
    (Path(directory) / RECORD_NAME).write_text(json.dumps(record, indent=1))


def _verify_or_raise(hf_dir, tmp, most, out_dir, *, layout: ParallelLayout, **kwargs) -> dict:
    diffs, ok = verify(hf_dir, tmp, most, layout=layout, **kwargs)
    if not ok:
        raise VerifyError(
            f"--verify FAILED: the conversion does not reproduce {hf_dir}'s logits; nothing was written to {out_dir}"
        )
    return dict(layout=layout.describe(), max_abs_logit_diff=diffs, passed=True)


def load_into(model, out_dir) -> None:
    """Load the converted checkpoint into `model` at the current layout (resharded, cast to the
    model's dtype)."""
    from megatron_most.platform.selfcheck import load_values

    values = load_values(model, Path(out_dir))
    model.load_state_dict(values, strict=False)


def _most_reference(hf, converted, most: MoSTConfig):
    """The HF remote-code MoST model (fp32) with the source DeepSeek-V2 weights taken by their HF
    names (no mapping table) and the tensors the source lacks (vocabulary rows after the text
    vocabulary, the audio projection) from the converted MoSTModel `converted`."""
    from megatron_most.convert.hf_most import AUDIO_PROJECTION, hf_config
    from megatron_most.convert.hf_most.modeling_most import MoSTForCausalLM

    reference = MoSTForCausalLM(hf_config(most)).float().eval()
    source, new = hf.state_dict(), converted.state_dict()
    text = most.text_vocab_size
    fused = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    state = {}
    for name, param in reference.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            own = new["embedding.word_embeddings.weight" if name.startswith("model.") else "output_layer.weight"]
            value = torch.cat([source[name], own[text:]])
        elif name in AUDIO_PROJECTION:
            value = new["audio_projection." + name.rsplit(".", 1)[1]]
        elif name in source:
            value = source[name]
        elif m := fused.fullmatch(name):  # transformers' in-memory experts: gate_up_proj[E] = [gate; up], down_proj[E]
            prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
            if part == "down_proj":
                value = source[prefix + ".down_proj"][expert]
            else:
                gate, up = source[prefix + ".gate_up_proj"][expert].chunk(2)
                value = gate if part == "gate_proj" else up
        else:
            raise RuntimeError(f"verify: the MoST reference tensor {name} has no source")
        if value.shape != param.shape:
            raise RuntimeError(
                f"verify: {name} is {tuple(value.shape)} in the source, {tuple(param.shape)} in the MoST reference"
            )
        state[name] = value.float()
    reference.load_state_dict(state, strict=True)
    return reference


def verify(
    hf_dir,
    out_dir,
    most: MoSTConfig,
    *,
    layout: ParallelLayout | None = None,
    batch: int = 2,
    seq: int = 32,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    timeout_s: float = 3600.0,
    log=print,
) -> tuple[dict, bool]:
    """Logits of the source and of the converted checkpoint loaded into MoSTModel (both fp32),
    printing the max abs difference and PASS/FAIL of each check:

    text        transformers' DeepseekV2ForCausalLM vs MoSTModel routing like DeepSeek (vanilla:
                MAMoE masking changes text routing by design), on random text tokens;
    text+audio  (a MoST model) the HF remote-code MoST model holding the source weights by their HF
                names plus the converted model's new tensors (audio rows, projection) vs MoSTModel
                as configured, on text with unit tokens and <boa> <feat>... <eoa> spans with features.

    The MoSTModel side runs at `layout`: in this process at TP = PP = EP = 1, otherwise on
    estimate.default_world_size(layout) gloo ranks spawned on this machine (each loads its shards
    of the checkpoint, resharded); every last-stage rank's logits (TP columns gathered) are
    compared and the worst is reported. Returns ({check: max abs diff}, all passed)."""
    from transformers import AutoModelForCausalLM

    from megatron_most.model.estimate import default_world_size
    from megatron_most.model.most import build_model
    from megatron_most.platform.spawn import RankError, run_ranks

    layout = layout or ParallelLayout()
    in_process = (layout.tp, layout.pp, layout.ep, layout.expert_tp) == (1, 1, 1, 1)
    seq = min(seq, most.seq_length)
    seq -= seq % layout.tp  # sequence parallelism splits the sequence over TP
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    checks = []  # (name, config of the MoSTModel, ids, features, expected logits, local model or None)
    if most.mamoe.variant != "no_shared":  # DeepSeek always has its shared experts
        vanilla = most.replace(mamoe=dataclasses.replace(most.mamoe, variant="vanilla"))
        ids = torch.randint(0, most.text_vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
        checks.append(("text", vanilla, ids, None, expected, None))
    if has_audio(most):
        # the reference takes the tensors the source lacks from the converted checkpoint, at TP1
        model = build_model(most, most.transformer_config(), use_te=False).eval()
        load_into(model, out_dir)
        reference = _most_reference(hf, model, most)
        ids, features = sample_batch(most, batch, seq, seed)
        with torch.no_grad():
            expected = reference(input_ids=ids, audio_features=features).logits
        del reference
        checks.append((most_check_name(most), most, ids, features, expected, model if in_process else None))
        del model
    del hf

    if in_process:
        outputs = []
        for _, config, ids, features, _, model in checks:
            if model is None:
                model = build_model(config, config.transformer_config(), use_te=False).eval()
                load_into(model, out_dir)
            with torch.no_grad():
                outputs.append([model(input_ids=ids, position_ids=None, attention_mask=None, audio_features=features)])
            del model
    else:
        world = default_world_size(layout)
        log(f"verify: MoSTModel at {layout.describe()} on {world} gloo ranks (checkpoint resharded on load)")
        jobs = [(config, ids, features) for _, config, ids, features, _, _ in checks]
        try:
            per_rank = run_ranks(
                layout_logits,
                world,
                args=(str(out_dir), layout, jobs),
                timeout_s=timeout_s,
                threads=max(1, (os.cpu_count() or 1) // world),
            )
        except RankError as e:
            raise VerifyError(
                f"--verify: MoSTModel at {layout.describe()} did not run, so the conversion is unverified:\n{e}"
            ) from e
        outputs = [[r[i] for r in per_rank if r[i] is not None] for i in range(len(checks))]

    diffs, ok = {}, True
    for (name, _, _, _, expected, _), got in zip(checks, outputs):
        if name == "text":  # DeepSeek has no audio rows
            got = [g[..., : most.text_vocab_size] for g in got]
        worst = max(got, key=lambda g: _gap(g, expected))
        label = name if in_process else f"{name}, MoSTModel at {layout.describe()}, worst of {len(got)} rank(s)"
        diffs[name], passed = compare(expected, worst, label, tolerance, log)
        ok &= passed
    log(f"verify: {'PASS' if ok else 'FAIL'}")
    return diffs, ok


def _gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference; inf for a wrong shape or a non-finite value (the worst rank wins)."""
    if got.shape != expected.shape:
        return math.inf
    gap = (got.float() - expected).abs().max().item()
    return gap if math.isfinite(gap) else math.inf


def layout_logits(out_dir: str, layout: ParallelLayout, jobs: list) -> list:
    """Rank body of `verify` at a layout: for each (MoSTConfig, ids, features) job, build the
    model's stage at `layout`, load the checkpoint (resharded) and run the batch through the
    pipeline stages; returns per job the full-vocabulary logits on last-stage ranks, else None."""
    from megatron_most.model.most import build_model
    from megatron_most.platform import initialize

    initialize(layout, num_experts=jobs[0][0].mamoe.num_experts)
    out = []
    for most, ids, features in jobs:
        model = build_model(most, most.transformer_config(layout), use_te=False).eval()
        load_into(model, out_dir)
        with torch.no_grad():
            out.append(_staged_forward(model, most, layout, ids, features))
        del model
    return out


def _staged_forward(model, most: MoSTConfig, layout: ParallelLayout, ids, features):
    """One forward through all pipeline stages by hand (stage i sends its hidden states
    [seq (/tp under SP), batch, hidden] to stage i+1); the last stage gathers the vocabulary
    columns of its TP group and returns [batch, seq, padded vocab], the others None."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_first_stage():
        rows = ids.shape[1] // layout.tp if layout.sp else ids.shape[1]
        received = torch.empty(rows, ids.shape[0], most.hidden_size)
        torch.distributed.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    out = model(input_ids=ids, position_ids=None, attention_mask=None, audio_features=features)
    if not ps.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(tp)]
    torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)
