"""The GPU path, checked where it can be on a CPU machine: settings that depend on the GPU's
kernels, the precision switch, conversion staying on the CPU, and the prepared one-GPU check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_most.platform import runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_with(monkeypatch):
    """Pretend this machine has a GPU, with or without TE and apex's wgrad kernel."""

    def pretend(te: bool, apex: bool):
        monkeypatch.setattr(runtime, "has_gpu", lambda: True)
        monkeypatch.setattr(runtime, "has_transformer_engine", lambda: te)
        real = runtime.importlib.util.find_spec
        monkeypatch.setattr(
            runtime.importlib.util,
            "find_spec",
            lambda name, *a: object() if (name == "fused_weight_gradient_mlp_cuda" and apex) else real(name, *a),
        )

    return pretend


def test_gradient_accumulation_fusion_only_under_ddp_with_its_kernel(gpu_with):
    gpu_with(te=True, apex=False)
    assert runtime.fusion_settings()["gradient_accumulation_fusion"] is False  # no DDP: no main_grad
    assert runtime.fusion_settings(ddp=True)["gradient_accumulation_fusion"] is False  # no apex kernel
    gpu_with(te=True, apex=True)
    assert runtime.fusion_settings()["gradient_accumulation_fusion"] is False
    assert runtime.fusion_settings(ddp=True)["gradient_accumulation_fusion"] is True
    assert runtime.fusion_settings()["moe_grouped_gemm"] is True  # TE's grouped GEMM is the GPU default


def test_no_gpu_kernels_on_the_cpu():
    settings = runtime.fusion_settings(ddp=True)
    assert not any(settings[k] for k in ("gradient_accumulation_fusion", "moe_grouped_gemm", "apply_rope_fusion"))


def test_precision_switch(gpu_with):
    from megatron_most.model.config import preset

    most = preset("tiny")
    cpu = most.transformer_config()
    assert (cpu.params_dtype, cpu.bf16) == (torch.float32, False)  # auto on a CPU: fp32
    bf16 = most.transformer_config(precision="bf16")
    assert (bf16.params_dtype, bf16.pipeline_dtype, bf16.bf16) == (torch.bfloat16, torch.bfloat16, True)
    assert bf16.moe_router_dtype == "fp32"
    with pytest.raises(Exception, match="precision='fp8'"):
        most.transformer_config(precision="fp8")
    gpu_with(te=False, apex=False)
    assert runtime.compute_dtype("auto") == torch.bfloat16  # auto on a GPU: bf16


def _bf16_model_dtypes():
    from megatron_most.model.config import preset
    from megatron_most.model.most import build_model, single_rank_groups

    most = preset("tiny")
    with single_rank_groups(most):
        model = build_model(most, most.transformer_config(precision="bf16"))
        return sorted({str(p.dtype) for p in model.parameters()})


def test_bf16_model_has_only_bf16_parameters():
    from tests.multiproc import run_distributed

    assert run_distributed(_bf16_model_dtypes, 1)[0] == ["torch.bfloat16"]  # norms and audio projection too


def test_verify_refuses_a_process_that_sees_a_gpu(monkeypatch):
    from megatron_most.convert import verify

    monkeypatch.setattr(verify, "has_gpu", lambda: True)
    with pytest.raises(verify.VerifyError, match="CUDA_VISIBLE_DEVICES"):
        verify.verify("unused", "unused", None)
    with pytest.raises(verify.VerifyError, match="CUDA_VISIBLE_DEVICES"):
        verify.verify_export("unused", "unused", None)


def test_convert_tool_hides_the_gpus():
    code = "import runpy, os; runpy.run_path('tools/convert_checkpoint.py'); print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("''"), out.stdout + out.stderr


def test_gpu_check_script_parses_lists_its_items_and_needs_a_gpu():
    from megatron_most.training.gpu_check import ITEMS

    assert subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT).returncode == 0
    listed = subprocess.run(["bash", "scripts/gpu_check.sh", "--list"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and [line.split(":")[0] for line in listed.stdout.splitlines()] == list(ITEMS)
    run = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "no GPU" in run.stdout, run.stdout + run.stderr
