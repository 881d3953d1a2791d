"""Wrap Megatron-Core model chunks in DDP + optimizer and run training steps with its schedules.

This is the standard Megatron-Core wiring (what megatron/training does), kept to the parts a
MoE model needs: DDP with fp32 grad reduction (per model chunk: one per virtual pipeline stage),
the (distributed) optimizer with grad clipping, `finalize_model_grads` for the TP/EP/PP/DP grad
reductions, the pipeline schedule picked for the current layout (interleaved with several
chunks), and an optimizer step that skips non-finite updates instead of applying them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_most.options import ConfigError
from megatron_most.platform.runtime import device


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean LM loss over the global batch (all micro-batches, all data-parallel ranks)."""
    grad_norm: float
    """Global gradient norm before clipping (nan when not finite)."""
    skipped: bool
    """True when the update was skipped (non-finite loss or gradients)."""


def wrap_chunks(
    chunks: list[torch.nn.Module],
    optimizer_config: OptimizerConfig,
    *,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> tuple[list[DistributedDataParallel], object]:
    """DDP-wrap every model chunk on this rank's device and build one Megatron optimizer over
    them; installs the schedule hooks on the chunks' shared TransformerConfig.

    The optimizer follows the model's precision (`config.params_dtype`): with bf16 parameters it
    keeps fp32 main parameters and states (Megatron's mixed-precision optimizer), and DDP reduces
    gradients in fp32 either way. `overlap_grad_reduce` starts each bucket's gradient reduction
    during the backward pass; `overlap_param_gather` (distributed optimizer only) gathers updated
    parameters during the next forward pass.
    """
    if overlap_param_gather and not optimizer_config.use_distributed_optimizer:
        raise ConfigError("overlap_param_gather needs the distributed optimizer (use_distributed_optimizer=True)")
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
    )
    ddps = [
        # only the first chunk's buckets are reduced in the first iteration's no_sync window
        DistributedDataParallel(config, ddp_config, chunk.to(device()), disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer_config = dataclasses.replace(
        optimizer_config, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype
    )
    optimizer = get_megatron_optimizer(optimizer_config, ddps)
    one = len(ddps) == 1
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddps[0].no_sync if one else [d.no_sync for d in ddps]
    grad_sync = ddps[0].start_grad_sync if one else [d.start_grad_sync for d in ddps]
    param_sync = ddps[0].start_param_sync if one else [d.start_param_sync for d in ddps]
    config.grad_sync_func = grad_sync if overlap_grad_reduce else None
    config.param_sync_func = param_sync if overlap_param_gather else None
    return ddps, optimizer


def wrap(
    model: torch.nn.Module, optimizer_config: OptimizerConfig, **overlap
) -> tuple[DistributedDataParallel, object]:
    """`wrap_chunks` for a model of one chunk: (ddp, optimizer)."""
    ddps, optimizer = wrap_chunks([model], optimizer_config, **overlap)
    return ddps[0], optimizer


def run_schedule(
    ddps: list[DistributedDataParallel],
    forward_step_func: Callable,
    data_iterators: list[Iterator],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    report_keys: tuple[str, ...] = ("loss",),
    forward_only: bool = False,
) -> dict[str, float]:
    """Run the schedule over `num_microbatches` (one data iterator per chunk); returns each
    `report_keys` value of the loss reports summed over micro-batches, pipeline stages (only the
    last has losses) and data-parallel ranks, identical on every rank.

    `forward_step_func(data_iterator, model) -> (output, loss_func)` as in Megatron; loss_func
    returns `(mean_loss, report)` with `report[key]` detached copies (the schedule divides
    `mean_loss` by the number of micro-batches in place)."""
    reports = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(ddps) > 1 else data_iterators[0],
        model=ddps,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    sums = [sum(float(r[key]) for r in reports) for key in report_keys]
    local = torch.tensor(sums, dtype=torch.float64, device=device())  # NCCL reduces only GPU tensors
    torch.distributed.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return dict(zip(report_keys, local.tolist()))


def forward_backward(ddp, forward_step_func, data_iterator, *, num_microbatches: int, **kwargs) -> float:
    """Mean "loss" over the global batch for a one-chunk model (see run_schedule)."""
    summed = run_schedule([ddp], forward_step_func, [data_iterator], num_microbatches=num_microbatches, **kwargs)
    return summed["loss"] / (num_microbatches * parallel_state.get_data_parallel_world_size())


def optimizer_step(optimizer, loss_is_finite: bool = True) -> tuple[bool, float]:
    """Megatron's optimizer step, skipped (weights and states untouched) when the loss or the
    global gradient norm is not finite; returns (updated, grad norm). Every rank decides alike:
    the loss is already reduced and the norm is global. Clipping uses the norm computed for the
    decision, over every sub-optimizer of a chained (dense + expert) optimizer, as Megatron does."""
    if optimizer.prepare_grads():  # a loss scaler found inf/nan (fp16)
        return False, math.nan
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(part, "is_stub_optimizer", False):
            continue
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=part.config.clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def zero_grads(ddps, optimizer) -> None:
    for ddp in ddps:
        ddp.zero_grad_buffer()
    optimizer.zero_grad()


def train_step(ddp, optimizer, forward_step_func, data_iterator, **schedule_kwargs) -> StepResult:
    """One optimizer step over a global batch of a one-chunk model."""
    zero_grads([ddp], optimizer)
    loss = forward_backward(ddp, forward_step_func, data_iterator, **schedule_kwargs)
    updated, grad_norm = optimizer_step(optimizer, math.isfinite(loss))
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=not updated)
