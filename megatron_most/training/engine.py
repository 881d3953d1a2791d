"""Wrap a Megatron-Core model in DDP + optimizer and run one training step with its schedules.

This is the standard Megatron-Core wiring (what megatron/training does), kept to the parts a
MoE model needs: DDP with fp32 grad reduction, the (distributed) optimizer with grad clipping,
`finalize_model_grads` for the TP/EP/PP/DP grad reductions, and the pipeline schedule picked
for the current layout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_most.options import ConfigError
from megatron_most.platform.runtime import device


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean LM loss over the global batch (all micro-batches, all data-parallel ranks)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    skipped: bool
    """True when the optimizer skipped the update (non-finite gradients)."""


def wrap(
    model: torch.nn.Module,
    optimizer_config: OptimizerConfig,
    *,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> tuple[DistributedDataParallel, object]:
    """Move `model` to this rank's device, DDP-wrap it and build the Megatron optimizer for it;
    installs the schedule hooks.

    The optimizer follows the model's precision (`model.config.params_dtype`): with bf16
    parameters it keeps fp32 main parameters and states (Megatron's mixed-precision optimizer),
    and DDP reduces gradients in fp32 either way. `overlap_grad_reduce` starts each bucket's
    gradient reduction during the backward pass; `overlap_param_gather` (distributed optimizer
    only) gathers updated parameters during the next forward pass.
    """
    if overlap_param_gather and not optimizer_config.use_distributed_optimizer:
        raise ConfigError("overlap_param_gather needs the distributed optimizer (use_distributed_optimizer=True)")
    model.to(device())  # modules of ours (norms, audio projection) are built on the CPU
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    optimizer_config = dataclasses.replace(
        optimizer_config, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype
    )
    optimizer = get_megatron_optimizer(optimizer_config, [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync if overlap_grad_reduce else None
    config.param_sync_func = ddp.start_param_sync if overlap_param_gather else None
    return ddp, optimizer


def forward_backward(
    ddp: DistributedDataParallel,
    forward_step_func: Callable,
    data_iterator: Iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> float:
    """Run the schedule over `num_microbatches`; return the global-batch mean loss on every rank.

    `forward_step_func(data_iterator, model) -> (output, loss_func)` as in Megatron; loss_func
    returns `(mean_loss, {"loss": mean_loss.detach().clone()})` (the schedule divides
    `mean_loss` by the number of micro-batches in place, so the logged value must be a copy).
    """
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=[ddp],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    # Only the last pipeline stage has losses; sum over stages and average over DP.
    mean = sum(float(x["loss"]) for x in losses) / num_microbatches if losses else 0.0
    local = torch.tensor([mean], device=device())  # NCCL reduces only tensors on the GPU
    torch.distributed.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return local.item() / parallel_state.get_data_parallel_world_size()


def train_step(ddp, optimizer, forward_step_func, data_iterator, **schedule_kwargs) -> StepResult:
    """One optimizer step over a global batch."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(ddp, forward_step_func, data_iterator, **schedule_kwargs)
    ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), skipped=not ok)
