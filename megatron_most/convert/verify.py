"""--verify of both conversion directions: the converted model must reproduce the source's logits.

hf-to-megatron (`verify`): transformers' DeepseekV2ForCausalLM, and for a MoST model the HF
remote-code MoST model, against the converted checkpoint loaded into MoSTModel at the target
layout (in this process, or on gloo ranks spawned on this machine).
megatron-to-hf (`verify_export`): the source MoSTModel against the model transformers loads
from the export.

Shared by both (first section): the sample inputs of a MoST model (`sample_batch`: text with unit
tokens and <boa> <feat>... <eoa> spans with features) and the comparison (`compare`: max abs
logit difference, PASS/FAIL).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_most.convert.common import HF_DTYPE_NAMES, load_into
from megatron_most.convert.hf_most import AUDIO_PROJECTION, hf_config
from megatron_most.convert.hf_most.modeling_most import MoSTForCausalLM
from megatron_most.convert.hf_writer import TOKENIZER_FILES
from megatron_most.model.config import MoSTConfig
from megatron_most.model.layout import default_world_size
from megatron_most.model.most import build_model
from megatron_most.platform import has_gpu, initialize
from megatron_most.platform.layout import ParallelLayout
from megatron_most.platform.spawn import RankError, run_ranks

# ---------------------------------------------------------------------------------------------
# shared: sample inputs and the logit comparison

DEFAULT_TOLERANCE = 1e-3
"""Max abs logit difference allowed, relative to max(1, max |reference logit|)."""


class VerifyError(RuntimeError):
    """The converted model does not reproduce the source's logits."""


def has_audio(most: MoSTConfig) -> bool:
    """Whether `most` needs the MoST check (audio tokens or modality routing)."""
    return most.tokens.audio or most.mamoe.modality_routing


def most_check_name(most: MoSTConfig) -> str:
    """The MoST check's name: "text+audio", or "text+routing" for a model without audio tokens."""
    return "text+audio" if most.tokens.audio else "text+routing"


def sample_batch(most: MoSTConfig, batch: int, seq: int, seed: int = 0, text_ids: torch.Tensor | None = None):
    """(input_ids [batch, seq], audio_features [frames, audio_feature_dim] or None).

    Text positions take `text_ids` (repeated) or seeded random text tokens. A model with audio
    gets in every row a run of unit tokens (discrete path) and a <boa> <feat>... <eoa> span
    (continuous path), in alternating order, with seeded random features for the <feat> frames."""
    tokens = most.tokens
    gen = torch.Generator().manual_seed(seed)
    if text_ids is None or text_ids.numel() == 0:
        text = torch.randint(0, most.text_vocab_size, (batch * seq,), generator=gen)
    else:
        text = text_ids.reshape(-1).repeat(-(-batch * seq // text_ids.numel()))
    text = iter(text.tolist())
    units = max(1, seq // 4) if most.num_units else 0
    frames = max(1, seq // 5) if most.audio_feature_dim else 0
    rows, total_frames = [], 0
    for r in range(batch):
        pieces = []
        if units:
            pieces.append(tokens.unit(torch.randint(0, most.num_units, (units,), generator=gen)).tolist())
        if frames:
            pieces.append([tokens.boa, *[tokens.feature] * frames, tokens.eoa])
            total_frames += frames
        if r % 2:
            pieces.reverse()
        audio = sum(len(p) for p in pieces)
        if audio + len(pieces) + 1 > seq:
            raise ValueError(f"verify sequence length {seq} is too short for the audio spans of the sample batch")
        gap = (seq - audio) // (len(pieces) + 1)
        row = [next(text) for _ in range(gap)]
        for piece in pieces:
            row += piece + [next(text) for _ in range(gap)]
        row += [next(text) for _ in range(seq - len(row))]
        rows.append(row)
    ids = torch.tensor(rows, dtype=torch.long)
    features = torch.randn(total_frames, most.audio_feature_dim, generator=gen) if frames else None
    return ids, features


def compare(expected: torch.Tensor, got: torch.Tensor, what: str, tolerance: float = DEFAULT_TOLERANCE, log=print):
    """Max abs difference of two logit tensors and whether it is within tolerance; prints a line."""
    expected, got = expected.float(), got.float()
    if expected.shape != got.shape:
        log(f"verify ({what}): logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)} FAIL")
        return math.inf, False
    diff = (got - expected).abs().max().item()
    peak = expected.abs().max().item()
    ok = bool(torch.isfinite(got).all()) and math.isfinite(diff) and diff <= tolerance * max(1.0, peak)
    log(f"verify ({what}): max abs logit diff {diff:.3e} (max |logit| {peak:.3f}) {'PASS' if ok else 'FAIL'}")
    return diff, ok


def round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round `model`'s floating parameters to `dtype` in place (kept in their own dtype)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))


# ---------------------------------------------------------------------------------------------
# hf-to-megatron: the HF source vs the converted MoSTModel


def _most_reference(hf, converted, most: MoSTConfig):
    """The HF remote-code MoST model (fp32) with the source DeepSeek-V2 weights taken by their HF
    names (no mapping table) and the tensors the source lacks (vocabulary rows after the text
    vocabulary, the audio projection) from the converted MoSTModel `converted`."""
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
    default_world_size(layout) gloo ranks spawned on this machine (each loads its shards
    of the checkpoint, resharded); every last-stage rank's logits (TP columns gathered) are
    compared and the worst is reported. Returns ({check: max abs diff}, all passed)."""
    require_cpu("--verify")
    layout = layout or ParallelLayout()
    in_process = (layout.tp, layout.pp, layout.ep, layout.expert_tp) == (1, 1, 1, 1)
    seq = min(seq, most.seq_length)
    seq -= seq % layout.tp  # sequence parallelism splits the sequence over TP
    source_is_most = json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type") == "most"
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, trust_remote_code=source_is_most)
    hf = hf.eval()
    checks = []  # (name, config of the MoSTModel, ids, features, expected logits, local model or None)
    if source_is_most:  # a MoST export: the source model is the reference itself
        checks = _most_source_checks(hf, most, batch, seq, seed)
    elif most.mamoe.variant != "no_shared":  # DeepSeek always has its shared experts
        vanilla = most.replace(mamoe=dataclasses.replace(most.mamoe, variant="vanilla"))
        ids = torch.randint(0, most.text_vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
        checks.append(("text", vanilla, ids, None, expected, None))
    if has_audio(most) and not source_is_most:
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
        if name == "text" and not source_is_most:  # DeepSeek has no audio rows
            got = [g[..., : most.text_vocab_size] for g in got]
        worst = max(got, key=lambda g: _gap(g, expected))
        label = name if in_process else f"{name}, MoSTModel at {layout.describe()}, worst of {len(got)} rank(s)"
        diffs[name], passed = compare(expected, worst, label, tolerance, log)
        ok &= passed
    log(f"verify: {'PASS' if ok else 'FAIL'}")
    return diffs, ok


def _most_source_checks(hf, most: MoSTConfig, batch: int, seq: int, seed: int) -> list:
    """Checks against a MoST-format source (the remote-code model holding every tensor): text,
    and text with units and feature spans, on MoSTModel as configured."""
    ids = torch.randint(0, most.text_vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        checks = [("text", most, ids, None, hf(input_ids=ids).logits, None)]
        if has_audio(most):
            ids, features = sample_batch(most, batch, seq, seed)
            expected = hf(input_ids=ids, audio_features=features).logits
            checks.append((most_check_name(most), most, ids, features, expected, None))
    return checks


def require_cpu(what: str) -> None:
    """Both sides of a check run in fp32 on the CPU (the reference model, the inputs and the
    gloo ranks); a process that sees a GPU would mix devices."""
    if has_gpu():
        raise VerifyError(
            f"{what} runs on the CPU: hide the GPUs before torch starts (CUDA_VISIBLE_DEVICES='', as "
            "tools/convert_checkpoint.py does)"
        )


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


# ---------------------------------------------------------------------------------------------
# megatron-to-hf: the source MoSTModel vs the export loaded by transformers


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Speech and text share one decoder: modality-aware experts "
    "route audio tokens to audio experts and text tokens to text experts, and the rest of the network is shared."
)


def _sample_ids(out_dir: Path, most: MoSTConfig, batch: int, seq: int, seed: int, log) -> torch.Tensor:
    """SAMPLE_TEXT tokenized with the exported tokenizer (if any, ids within the text vocabulary),
    else seeded random text tokens."""
    if any(TOKENIZER_FILES.match(p.name) and p.name != "generation_config.json" for p in Path(out_dir).iterdir()):
        try:
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
    require_cpu("--verify")
    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    remote = config.get("model_type") == "most"
    seq = min(seq, most.seq_length)
    model = build_model(most, most.transformer_config(), use_te=False).eval()
    load_into(model, megatron_dir)
    exported = {v: k for k, v in HF_DTYPE_NAMES.items()}[config.get("torch_dtype", "float32")]
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
    "DEFAULT_TOLERANCE",
    "VerifyError",
    "has_audio",
    "most_check_name",
    "sample_batch",
    "compare",
    "round_to",
    "verify",
    "layout_logits",
    "SAMPLE_TEXT",
    "verify_export",
]
