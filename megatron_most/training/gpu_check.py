"""The one-GPU check: what only a GPU node can show, item by item (run by scripts/gpu_check.sh).

    python -m megatron_most.training.gpu_check [--list] [--only NAME[,NAME]] [--workdir DIR]

Every item prints one line, `PASS name: figures`, `FAIL name: what differed` or `SKIP name:
why (and how to get it)`, then a summary line. Exit status 0 when nothing failed, 1 when an
item failed, 2 when there is no GPU. Items that need Transformer Engine or DALI skip without
them and say how to install them; the rest run on any CUDA GPU. CPU references are computed
in a child process with the GPUs hidden, i.e. on the same code path CPU runs take.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import soundfile
import torch
from megatron.core.optimizer import OptimizerConfig
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, HubertConfig, HubertModel

from megatron_most.audio.hubert import HubertEncoder
from megatron_most.audio.loading import AudioLoader, AudioOptions
from megatron_most.convert.hf_config import hf_config_fields
from megatron_most.model.checkpoint import load_values, save_values
from megatron_most.model.config import MoSTConfig, preset
from megatron_most.model.most import build_model
from megatron_most.platform import ParallelLayout, device, has_gpu, has_transformer_engine, initialize
from megatron_most.platform.spawn import single_process_env
from megatron_most.training import selfcheck
from megatron_most.training.engine import train_step, wrap

TE_INSTALL = "pip install --no-build-isolation 'transformer_engine[pytorch,core_cu12]>=2.9,<2.12'"
DALI_INSTALL = "pip install nvidia-dali-cuda120"
FP32_TOL, BF16_TOL = 2e-3, 5e-2
"""Max |logit difference| / max(1, max |logit|) between kernels (fp32) and precisions (bf16)."""


@dataclasses.dataclass
class Outcome:
    status: str  # PASS | FAIL | SKIP
    detail: str


def _verdict(ok: bool, detail: str) -> Outcome:
    return Outcome("PASS" if ok else "FAIL", detail)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------- models


def _tiny() -> MoSTConfig:
    return preset("tiny")


def _model(most: MoSTConfig, *, use_te: bool = False, precision: str = "fp32"):
    return build_model(most, most.transformer_config(precision=precision), use_te=use_te).to(device()).eval()


def _batch(most: MoSTConfig):
    """[2, 32] ids with a feature span and a unit span, and their features (the self-check's)."""
    ids = selfcheck.most_tokens(torch.Generator().manual_seed(7))[:2, :32]
    frames = int((ids == most.tokens.feature).sum())
    return ids, torch.randn(frames, most.audio_feature_dim, generator=torch.Generator().manual_seed(8))


def _logits(model, ids, features, positions=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(device()), position_ids=positions, audio_features=features).float()


def _checkpoint(workdir: Path, most: MoSTConfig) -> Path:
    """The tiny model's random initial weights, saved once by the local spec (canonical keys)."""
    path = workdir / "tiny_local"
    if not path.exists():
        torch.manual_seed(0)
        model = _model(most)
        save_values(model, {n: p.detach() for n, p in model.named_parameters()}, path)
    return path


def _load(model, path: Path):
    model.load_state_dict(load_values(model, path), strict=False)
    return model


def cpu_logits(path: str, inputs: str, out: str) -> None:
    """(child process, GPUs hidden) the tiny model's fp32 logits on the CPU for saved inputs."""
    initialize(ParallelLayout(), num_experts=_tiny().mamoe.num_experts)
    ids, features = torch.load(inputs)
    torch.save(_logits(_load(_model(_tiny()), Path(path)), ids, features), out)


def _on_cpu(workdir: Path, path: Path, ids, features) -> torch.Tensor:
    inputs, out = workdir / "cpu_inputs.pt", workdir / "cpu_logits.pt"
    torch.save((ids, features), inputs)
    env = single_process_env(CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "megatron_most.training.gpu_check", "--cpu-logits", str(path), str(inputs), str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    return torch.load(out)


# ------------------------------------------------------------------------------------- items


def extras(workdir: Path) -> Outcome:
    """GPU extras: Transformer Engine (TE spec, grouped GEMM, THD packing) and DALI (GPU audio)."""
    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if has_gpu():
        found["gpu"] = torch.cuda.get_device_name()
    for name in ("transformer_engine", "nvidia.dali", "apex"):
        try:
            found[name] = getattr(__import__(name, fromlist=["__version__"]), "__version__", "installed")
        except ImportError:
            found[name] = None
    text = ", ".join(f"{k} {v}" for k, v in found.items() if v is not None)
    if not has_transformer_engine():
        return Outcome("SKIP", f"{text}; Transformer Engine missing (TE items skip): {TE_INSTALL}")
    return Outcome("PASS", text)


def cuda_vs_cpu(workdir: Path) -> Outcome:
    """Local-spec tiny MoST, fp32, same checkpoint and inputs: CUDA logits vs the CPU path's."""
    most = _tiny()
    ids, features = _batch(most)
    gpu = _logits(_load(_model(most), _checkpoint(workdir, most)), ids, features)
    diff = _rel(gpu, _on_cpu(workdir, _checkpoint(workdir, most), ids, features))
    return _verdict(diff < FP32_TOL, f"max rel logit diff {diff:.2e} (tol {FP32_TOL:g})")


def te_vs_local(workdir: Path) -> Outcome:
    """TE-spec vs local-spec tiny MoST on the same canonical checkpoint, fp32 and bf16."""
    if not has_transformer_engine():
        return Outcome("SKIP", f"needs Transformer Engine: {TE_INSTALL}")
    most, path = _tiny(), _checkpoint(workdir, _tiny())
    ids, features = _batch(most)
    diffs = {}
    for precision, tol in (("fp32", FP32_TOL), ("bf16", BF16_TOL)):
        local = _logits(_load(_model(most, precision=precision), path), ids, features)
        te = _logits(_load(_model(most, use_te=True, precision=precision), path), ids, features)
        diffs[precision] = (_rel(te, local), tol)
    ok = all(d < tol for d, tol in diffs.values())
    return _verdict(ok, ", ".join(f"{p} {d:.2e} (tol {t:g})" for p, (d, t) in diffs.items()))


def te_checkpoint_roundtrip(workdir: Path) -> Outcome:
    """A checkpoint saved by the TE model loads into the local model (and the local one into TE)."""
    if not has_transformer_engine():
        return Outcome("SKIP", f"needs Transformer Engine: {TE_INSTALL}")
    most = _tiny()
    ids, features = _batch(most)
    te = _load(_model(most, use_te=True), _checkpoint(workdir, most))
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights only the TE save holds
    save_values(te, {n: p.detach() for n, p in te.named_parameters()}, workdir / "tiny_te")
    local = _load(_model(most), workdir / "tiny_te")
    diff = _rel(_logits(local, ids, features), _logits(te, ids, features))
    return _verdict(diff < FP32_TOL, f"TE-saved checkpoint in the local model: max rel logit diff {diff:.2e}")


def grouped_gemm(workdir: Path) -> Outcome:
    """MAMoE with TE's grouped-GEMM experts (the GPU default) vs SequentialMLP experts on the same
    checkpoint: same logits; the grouped model's checkpoint loads into the sequential one."""
    if not has_transformer_engine():
        return Outcome("SKIP", f"needs Transformer Engine (TEGroupedMLP): {TE_INSTALL}")
    most, path = _tiny(), _checkpoint(workdir, _tiny())
    ids, features = _batch(most)
    grouped = _load(_model(most, use_te=True), path)
    sequential = build_model(most, most.transformer_config(moe_grouped_gemm=False), use_te=True).to(device()).eval()
    diff = _rel(_logits(_load(sequential, path), ids, features), _logits(grouped, ids, features))
    save_values(grouped, {n: p.detach() for n, p in grouped.named_parameters()}, workdir / "tiny_grouped")
    back = _rel(_logits(_load(sequential, workdir / "tiny_grouped"), ids, features), _logits(grouped, ids, features))
    experts = type(grouped.decoder.layers[-1].mlp.experts).__name__
    return _verdict(max(diff, back) < FP32_TOL, f"{experts} vs sequential {diff:.2e}, grouped checkpoint {back:.2e}")


def train_bf16(workdir: Path, steps: int = 20) -> Outcome:
    """bf16 steps, distributed optimizer, overlapped grad reduce and param gather: loss falls."""
    most = _tiny()
    model = build_model(most, most.transformer_config(precision="bf16", ddp=True))
    optimizer = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, use_distributed_optimizer=True)
    ddp, opt = wrap(model, optimizer, overlap_grad_reduce=True, overlap_param_gather=True)
    step = functools.partial(selfcheck.forward_step, kind="most")
    kwargs = dict(num_microbatches=2, seq_length=selfcheck.SEQ, micro_batch_size=selfcheck.MICRO)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        batches = iter(selfcheck.most_tokens(torch.Generator().manual_seed(1000))[:4].split(selfcheck.MICRO))
        result = train_step(ddp, opt, step, batches, **kwargs)
        losses.append(result.loss)
    if has_gpu():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    dtype = next(model.parameters()).dtype
    ok = dtype == torch.bfloat16 and all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    return _verdict(ok, f"params {dtype}, loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps, {ms:.0f} ms/step")


def packed_rows(workdir: Path) -> Outcome:
    """Two samples packed in one row (positions restart) give the logits each gives alone
    (TE: THD PackedSeqParams; local: block-diagonal mask)."""
    use_te = has_transformer_engine()
    most = _tiny()
    model = _load(_model(most, use_te=use_te), _checkpoint(workdir, most))
    ids, features = _batch(most)
    a, b = ids[0, :20], ids[1, :12]  # sample a has the feature span, sample b plain text + a unit start
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None].to(device())
    frames = int((a == most.tokens.feature).sum())
    together = _logits(model, packed, features[:frames], positions)
    alone = [_logits(model, a[None], features[:frames]), _logits(model, b[None], None)]
    diff = max(_rel(together[:, :20], alone[0]), _rel(together[:, 20:], alone[1]))
    tol = FP32_TOL if use_te else 1e-4
    spec = "TE (THD)" if use_te else "local (block mask; TE missing)"
    return _verdict(diff < tol, f"{spec}: max rel logit diff {diff:.2e} (tol {tol:g})")


def convert_verify(workdir: Path) -> Outcome:
    """tools/convert_checkpoint.py hf-to-megatron --verify on a tiny DeepSeek-V2 made here."""
    most = _tiny().replace(
        mamoe=dataclasses.replace(_tiny().mamoe, variant="vanilla"), num_units=0, audio_feature_dim=0
    )
    torch.manual_seed(0)
    DeepseekV2ForCausalLM(DeepseekV2Config(**hf_config_fields(most))).save_pretrained(workdir / "hf")
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
    cmd = [sys.executable, str(tool), "hf-to-megatron", "--hf", str(workdir / "hf"), "--out", str(workdir / "conv")]
    env = single_process_env()
    proc = subprocess.run(cmd + ["--preset", "tiny", "--verify"], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("verify")]
    return _verdict(proc.returncode == 0 and "verify: PASS" in lines, "; ".join(lines) or proc.stderr[-500:])


def dali_gpu(workdir: Path) -> Outcome:
    """DALI's GPU decode + resample to 16 kHz against its CPU pipeline on 44.1 kHz stereo audio."""
    try:
        import nvidia.dali  # noqa: F401 - heavy optional dependency
    except ImportError:
        return Outcome("SKIP", f"needs NVIDIA DALI: {DALI_INSTALL}")
    t = np.arange(44100 * 2) / 44100
    wave = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)], axis=1) * 0.3
    path = workdir / "tone.flac"
    soundfile.write(path, wave, 44100)
    gpu, cpu = (AudioLoader(AudioOptions(device=d)).load([path])[0] for d in ("gpu", "cpu"))
    corr = float(np.corrcoef(gpu, cpu)[0, 1])
    return _verdict(abs(len(gpu) - len(cpu)) <= 1 and corr > 0.999, f"correlation {corr:.5f}, {len(gpu)} samples")


def hubert_cuda(workdir: Path) -> Outcome:
    """HuBERT features (a small random model) on CUDA against the CPU, fp32."""
    torch.manual_seed(0)
    config = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    HubertModel(config).eval().save_pretrained(workdir / "hubert")
    waves = [np.random.default_rng(i).standard_normal(16000 * (i + 1)).astype(np.float32) * 0.1 for i in range(2)]
    gpu = HubertEncoder(str(workdir / "hubert"), device=device())(waves)
    cpu = HubertEncoder(str(workdir / "hubert"), device="cpu")(waves)
    diff = max((g.float() - c.float()).abs().max().item() for g, c in zip(gpu, cpu, strict=True))
    return _verdict(diff < 1e-2, f"max abs feature diff {diff:.2e} over {sum(len(g) for g in gpu)} frames (fp16 out)")


ITEMS = {
    f.__name__: f
    for f in (
        extras,
        cuda_vs_cpu,
        te_vs_local,
        te_checkpoint_roundtrip,
        grouped_gemm,
        train_bf16,
        packed_rows,
        convert_verify,
        dali_gpu,
        hubert_cuda,
    )
}


def run(names, workdir: Path) -> int:
    initialize(ParallelLayout(), num_experts=_tiny().mamoe.num_experts)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name in names:
        start = time.perf_counter()
        try:
            outcome = ITEMS[name](workdir)
        except Exception as e:  # noqa: BLE001 - a crash is that item's FAIL; the others still run
            outcome = Outcome("FAIL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}")
        counts[outcome.status] += 1
        print(f"{outcome.status} {name}: {outcome.detail} [{time.perf_counter() - start:.1f}s]", flush=True)
    print(f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP", flush=True)
    return 1 if counts["FAIL"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the items and exit")
    parser.add_argument("--only", help="comma-separated items to run (default: all)")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--cpu-logits", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, item in ITEMS.items():
            print(f"{name}: {item.__doc__.splitlines()[0]}")
        return 0
    if args.cpu_logits:
        cpu_logits(*args.cpu_logits)
        return 0
    if not has_gpu():
        print("gpu_check: no GPU (torch.cuda.is_available() is False): run it on a node with an NVIDIA GPU")
        return 2
    names = args.only.split(",") if args.only else list(ITEMS)
    unknown = sorted(set(names) - set(ITEMS))
    if unknown:
        print(f"gpu_check: unknown item(s) {unknown}; items: {sorted(ITEMS)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        return run(names, Path(args.workdir or tmp))


if __name__ == "__main__":
    sys.exit(main())
