"""Backend selection and process-group initialisation, identical for torchrun on GPUs and CPUs.

With a GPU: NCCL, one device per local rank, Transformer Engine modules when installed.
Without one: gloo on the CPU, after `compat_cpu.enable()` has made Megatron-Core's CUDA
assumptions hold there. Either way the same Megatron-Core code (schedules, DDP, optimizer,
dist_checkpointing) runs afterwards.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_most.options import ConfigError
from megatron_most.platform import compat_cpu
from megatron_most.platform.layout import ParallelLayout
from megatron_most.platform.version import check_megatron_core


def has_gpu() -> bool:
    return torch.cuda.is_available()


def has_transformer_engine() -> bool:
    """Transformer Engine is used only on GPUs, and only when it is installed."""
    return has_gpu() and importlib.util.find_spec("transformer_engine") is not None


def backend() -> str:
    return "nccl" if has_gpu() else "gloo"


def device() -> torch.device:
    if has_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_device(config) -> torch.device | None:
    """Where a module of ours creates its parameters, as Megatron's own layers do: on this
    rank's GPU unless `config.use_cpu_initialization` (then the default device: the CPU, or
    the meta device inside `torch.device("meta")` for counting)."""
    return None if config.use_cpu_initialization else device()


def place(module: torch.nn.Module) -> torch.nn.Module:
    """`module` on this rank's device, as Megatron-LM's get_model leaves a model chunk (a few
    Megatron modules create weights on the CPU); a module built on the meta device stays there."""
    if not any(p.is_meta for p in module.parameters()):
        module.to(device())
    return module


def choose_device(choice: str, *, field: str = "device") -> torch.device:
    """Device of a single-process job (audio loading, HuBERT): "cpu", "gpu" or "auto" (the GPU when
    there is one). ConfigError for "gpu" on a machine without CUDA."""

    if choice not in ("cpu", "gpu", "auto"):
        raise ConfigError(f"{field}={choice!r}: use 'cpu', 'gpu' or 'auto'")
    if choice == "gpu" and not has_gpu():
        raise ConfigError(f"{field}='gpu': CUDA is not available on this machine; use cpu (or auto)")
    return device() if choice != "cpu" else torch.device("cpu")


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(precision: str = "auto", *, field: str = "precision") -> torch.dtype:
    """Parameter and compute dtype for a precision setting: "auto" is bf16 on GPUs and fp32 on
    CPUs (CPU bf16 matmuls are slow and the CPU path is for correctness), or "bf16" / "fp32"."""
    if precision == "auto":
        return torch.bfloat16 if has_gpu() else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"{field}={precision!r}: use 'auto' (bf16 on GPUs, fp32 on CPUs), 'bf16' or 'fp32'")
    return PRECISIONS[precision]


def precision_settings(precision: str = "auto") -> dict:
    """TransformerConfig fields for a precision: parameters, activations and the pipeline's
    send/recv buffers in that dtype. Main gradients and optimizer states stay fp32 (DDP's
    grad_reduce_in_fp32 and Megatron's mixed-precision optimizer, see training.engine.wrap),
    and MoE routers compute in fp32 (moe_router_dtype)."""
    dtype = compute_dtype(precision)
    return dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=False)


def fusion_settings(*, ddp: bool = False) -> dict:
    """TransformerConfig fields for kernels that exist only with CUDA, TE or apex, turned off
    where they are not available so one config works on every machine.

    `ddp`: the model will be trained DDP-wrapped. Gradient-accumulation fusion writes weight
    gradients straight into DDP's fp32 `main_grad` buffers, which exist only under DDP, and
    Megatron's local ColumnParallelLinear (the output layer, even in TE models) needs apex's
    `fused_weight_gradient_mlp_cuda` kernel for it; without either it stays off.
    """
    gpu, te = has_gpu(), has_transformer_engine()
    apex_wgrad = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    return dict(
        gradient_accumulation_fusion=ddp and gpu and apex_wgrad,
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        moe_permute_fusion=te,
        moe_grouped_gemm=te,  # TEGroupedMLP: all local experts in one grouped GEMM
        use_cpu_initialization=not gpu,
    )


def free_port() -> int:
    """A local TCP port free at the time of asking (a rendezvous may still lose it: spawn retries)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_process() -> None:
    """Per-process setup that needs no process group: version pin, device, CPU compatibility."""
    check_megatron_core()
    compat_cpu.patch_missing_transformer_engine()
    if has_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        compat_cpu.enable()
        # Megatron decorates small fused functions with torch.compile; on a CPU that means a
        # C++ compile per function on first call for no gain at these sizes.
        torch._dynamo.config.disable = True


def initialize(
    layout: ParallelLayout,
    *,
    num_experts: int | None = None,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> int:
    """Initialise torch.distributed from torchrun's environment and Megatron's parallel groups.

    The layout is checked against the world size and expert count before any group exists,
    so a bad layout fails at once on every rank instead of hanging. Collectives time out after
    `timeout_s`, so a dead rank ends the job with an error. Returns the data-parallel size.
    Without torchrun's variables it runs as a single process.
    """

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dp = layout.dp(world_size)
    layout.check_experts(num_experts)
    prepare_process()
    if not torch.distributed.is_initialized():
        # Alone (no torchrun), rendezvous on a free port without writing MASTER_PORT into the
        # environment: a tool this process launches later would inherit it and find it taken.
        alone = "MASTER_ADDR" not in os.environ
        torch.distributed.init_process_group(
            backend=backend(),
            init_method=f"tcp://127.0.0.1:{free_port()}" if alone else None,
            rank=0 if alone else int(os.environ.get("RANK", 0)),
            world_size=1 if alone else world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dp


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
