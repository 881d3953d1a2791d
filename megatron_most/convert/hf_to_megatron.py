"""HF DeepSeek-V2(-Lite) safetensors -> MoST torch_dist checkpoint, streamed tensor by tensor.

    most, stats = convert(hf_dir, out_dir, preset("deepseek_v2_lite_most"))

1. Refuse an `out_dir` that exists and is not empty (a checkpoint or anything else).
2. Read the HF index and shard headers (hf_reader: missing/truncated shards, an index naming
   absent tensors) and config.json -> MoSTConfig (mapping.config_from_hf: the preset's MAMoE
   groups, audio paths and seq_length with the HF architecture).
3. Build MoSTModel at TP = PP = EP = 1 on the meta device; its sharded state dict is the
   template. Every template tensor is matched to one rule of mapping.RULES; every HF tensor it
   needs must exist with the shape the config implies, and every HF tensor must be used. All
   problems are reported at once, before anything is written.
4. write_torch_dist into `.<name>.partial-<pid>` next to `out_dir`, one tensor at a time
   (routed experts copied by index, router copied, vocabulary rows for audio markers/units and
   the audio projection newly initialised from `seed`), plus most_config.json; then rename it
   to `out_dir`. A failed run leaves no `out_dir`.

The checkpoint reshards to any layout on load (dist_checkpointing), like one saved by training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatron_most.convert.output import atomic_output, check_output
from megatron_most.convert import mapping
from megatron_most.convert.hf_reader import CheckpointError, HFCheckpoint
from megatron_most.model.config import MoSTConfig

CONFIG_NAME = "most_config.json"


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


def build_template(most: MoSTConfig):
    from megatron.core import parallel_state

    from megatron_most.model.estimate import build_meta_model

    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    if sizes != (1, 1, 1) or torch.distributed.get_world_size() != 1:
        raise RuntimeError(f"the converter runs as one process at TP=PP=EP=1 (got TP/PP/EP {sizes}, world {torch.distributed.get_world_size()})")
    return build_meta_model(most).sharded_state_dict()


def convert(hf_dir, out_dir, base: MoSTConfig, *, seed: int = 0, log=print):
    """Convert; needs platform.initialize(ParallelLayout()) in this (single) process.
    Returns (MoSTConfig, WriteStats)."""
    from megatron_most.convert.writer import write_torch_dist

    out_dir = Path(out_dir)
    check_output(out_dir)
    ckpt = HFCheckpoint(hf_dir)
    most = mapping.config_from_hf(ckpt.config(), base)
    template = build_template(most)
    planned = plan(ckpt, most, _template_entries(template))
    loaders = {
        item.key: (lambda item=item, source=source, shape=shape, dtype=dtype: mapping.produce(
            item, source, ckpt.get, shape, dtype, most, seed, get_row=ckpt.get_row))
        for item, source, shape, dtype in planned
    }
    with atomic_output(out_dir) as tmp:
        log(f"converting {len(loaders)} tensors from {ckpt.dir} into {tmp.name}")
        stats = write_torch_dist(template, loaders, tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(most), indent=1, default=list))
    log(f"wrote {out_dir}: {stats.entries} tensors, {stats.bytes / 2**20:.1f} MiB")
    return most, stats


def load_into(model, out_dir) -> None:
    """Load the converted checkpoint into `model` at the current layout (resharded)."""
    from megatron_most.platform.selfcheck import load_values

    values = load_values(model, Path(out_dir))
    model.load_state_dict(values, strict=False)


def verify(hf_dir, out_dir, most: MoSTConfig, *, batch: int = 2, seq: int = 32, tolerance: float = 1e-3, seed: int = 0,
           log=print) -> tuple[float, bool]:
    """Logits of the HF model (fp32) and of the converted checkpoint loaded into MoSTModel, on
    random text tokens. The MoSTModel routes like DeepSeek (vanilla) for the comparison: MAMoE
    masking would change text routing by design. Prints the max abs logit difference and PASS/FAIL."""
    from transformers import AutoModelForCausalLM

    from megatron_most.model.most import build_model

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    vanilla = most.replace(mamoe=dataclasses.replace(most.mamoe, variant="vanilla"), seq_length=min(most.seq_length, max(seq, 1)))
    model = build_model(vanilla, vanilla.transformer_config(), use_te=False).eval()
    load_into(model, out_dir)
    ids = torch.randint(0, most.text_vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits.float()
        got = model(input_ids=ids, position_ids=None, attention_mask=None)[..., : most.text_vocab_size]
    diff = (got - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    ok = bool(torch.isfinite(got).all()) and diff <= tolerance * scale
    log(f"verify: max abs logit diff {diff:.3e} (max |logit| {expected.abs().max().item():.3f}) {'PASS' if ok else 'FAIL'}")
    return diff, ok
