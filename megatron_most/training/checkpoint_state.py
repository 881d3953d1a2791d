"""What a training checkpoint holds and how it goes back into the objects of a run: the
sharded state dict under Megatron-LM's keys (model chunks, optimizer, RNG), the common state
(iteration, scheduler, layout), and the repairs Megatron-Core 0.16.1's distributed optimizer
needs around torch's Adam. `training/checkpoint.py` writes and reads the folders.
"""

from __future__ import annotations

import contextlib
import functools
import random
import types

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from megatron_most.model.checkpoint import CheckpointError
from megatron_most.platform.runtime import has_gpu

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's current `checkpoint_version` (query/key/value ordering of its legacy models)."""
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}
"""The distributed optimizer's states in model space, so they reshard to any layout
(Megatron-LM's --dist-ckpt-optim-fully-reshardable). Memory-efficient: gathered over gloo on
DP rank 0's host memory, not all-gathered on every GPU."""

# ------------------------------------------------------------------------------ state dicts


def unwrap(model_chunks) -> list:
    """The Megatron modules under DDP/Float16Module wrappers, as a list (one per virtual stage)."""
    return unwrap_model(list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks])


def state_dict(models: list, optimizer, metadata: dict, *, is_loading: bool, rng: bool) -> dict:
    """The sharded part, as Megatron-LM's generate_state_dict lays it out."""
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    state = {key: model.sharded_state_dict(metadata=metadata) for key, model in zip(keys, models)}
    if optimizer is not None and not optimizer.is_stub_optimizer:
        prime_torch_adam(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=metadata)
    if rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def common_state(iteration: int, scheduler, state: dict) -> dict:
    common = dict(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, args=layout_args(), train_state=state)
    if scheduler is not None:
        common["opt_param_scheduler"] = scheduler.state_dict()
    return common


def without_optimizer(common: dict) -> dict:
    """What dist_checkpointing compares across ranks before saving rank 0's common state: not the
    optimizer's, where the memory-efficient gather leaves `param_state: None` on DP ranks > 0."""
    return {k: v for k, v in common.items() if k != "optimizer"}


def layout_args() -> types.SimpleNamespace:
    """This run's layout under Megatron-LM's argument names (its loader reads `args` too)."""
    ps = parallel_state
    return types.SimpleNamespace(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(with_context_parallel=True),
        world_size=torch.distributed.get_world_size(),
    )


def dp_metadata() -> dict:
    return {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def sharding_metadata(optimizer) -> dict:
    distributed = any(isinstance(o, DistributedOptimizer) for o in chain(optimizer))
    return {**dp_metadata(), **(OPTIMIZER_SHARDING if distributed else {})}


def check_same_optimizer_kind(optimizer, metadata: dict, path) -> None:
    """The distributed and the plain optimizer keep different common state: name the switch."""
    saved = "distrib_optim_sharding_type" in metadata
    if saved != any(isinstance(o, DistributedOptimizer) for o in chain(optimizer)):
        raise CheckpointError(
            f"{path} holds {'distributed' if saved else 'plain'}-optimizer states: resume with "
            f"use_distributed_optimizer={saved}, or load with load_optim=False (--no-load-optim)"
        )


def load_models(models: list, loaded: dict) -> None:
    """Copy the loaded weights in place (DDP's buffers stay the parameters' storage)."""
    for i, model in enumerate(models):
        result = model.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"model chunk {i}: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")


# ------------------------------------------------------------------------------ optimizer


def chain(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def load_optimizer(optimizer, loaded: dict, saved: dict, path) -> None:
    with _torch_adam_steps_aside(optimizer):
        optimizer.load_state_dict(_match_chain(optimizer, loaded, saved, path))


def _match_chain(optimizer, loaded: dict, saved: dict, path) -> dict:
    """The loaded optimizer state, nested as this optimizer's chain.

    Megatron builds a second optimizer for expert parameters only with expert parallelism, so a
    checkpoint saved at EP > 1 holds two optimizers' common state ({0: dense, 1: experts}) and
    one saved at EP1 a single one. The distributed optimizer's tensors are keyed by parameter
    (`fully_reshardable`), whatever the chain; only the param groups (hyperparameters and step,
    matched by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)) must be regrouped: every
    saved group is offered to every optimizer of the chain, also with `is_expert_parallel` flipped
    (expert and dense groups share their hyperparameters)."""
    saved_subs = [saved[k] for k in sorted(saved)] if all(isinstance(k, int) for k in saved) else [saved]
    current = chain(optimizer)
    if len(saved_subs) == len(current):
        return loaded
    if not all(isinstance(o, DistributedOptimizer) for o in current):
        raise CheckpointError(
            f"{path}: optimizer saved as {len(saved_subs)} optimizer(s) (expert parallelism on or off), this run "
            f"has {len(current)}; only the distributed optimizer's state moves between them: load with "
            "load_optim=False (--no-load-optim) or use the distributed optimizer"
        )
    groups = [g for sub in saved_subs for g in sub["optimizer"]["param_groups"]]
    groups = [{**g, "is_expert_parallel": not g["is_expert_parallel"]} for g in groups] + groups  # saved win
    common = {k: v for k, v in saved_subs[0].items() if k != "param_state"}
    rebuilt = [
        {**common, "optimizer": {**common["optimizer"], "param_groups": groups}, "param_state": part["param_state"]}
        for part in ([loaded[i] for i in range(len(current))] if len(current) > 1 else [loaded])
    ]
    return rebuilt[0] if len(rebuilt) == 1 else dict(enumerate(rebuilt))


# Torch's Adam (used where neither Transformer Engine nor apex is installed: CPUs) keeps a step
# count per parameter, TE's and apex's Adam keep it in the param groups. Megatron-Core 0.16.1's
# distributed optimizer handles the former only partly: the two helpers below are no-ops with TE
# or apex.


def _torch_adam_subs(optimizer) -> list:
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [o for o in chain(optimizer) if isinstance(o, DistributedOptimizer)]


def prime_torch_adam(optimizer) -> None:
    """Give the parameters of an optimizer that has not stepped yet Adam's initial state (what
    its first step would create): the distributed optimizer's `state_dict`, which saving and
    loading call, reads the step count from it."""
    for sub in _torch_adam_subs(optimizer):
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                if not sub.optimizer.state[p]:
                    sub.optimizer.state[p].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )


@contextlib.contextmanager
def _torch_adam_steps_aside(optimizer):
    """Two repairs around the distributed optimizer's `load_state_dict`. It loads
    `fully_reshardable` states by copying the checkpoint's tensors into every entry of a
    parameter's state, step included, which the checkpoint holds in the param groups (KeyError
    'step'): each step is set aside around that copy (the param groups have restored it). And it
    gives every parameter the same step tensor, which torch's Adam increments in place once per
    parameter, spoiling the bias correction of the next step: each gets its own copy."""
    subs = _torch_adam_subs(optimizer)
    for sub in subs:
        sub._set_main_param_and_optimizer_states = functools.partial(_set_without_step, sub)
    try:
        yield
    finally:
        for sub in subs:
            del sub._set_main_param_and_optimizer_states  # back to the class's method
    for sub in subs:
        for state in sub.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _set_without_step(sub, model_param, tensors) -> None:
    group, order = sub.model_param_group_index_map[model_param]
    state = sub.optimizer.state[sub.optimizer.param_groups[group]["params"][order]]
    step = state.pop("step", None)
    DistributedOptimizer._set_main_param_and_optimizer_states(sub, model_param, tensors)
    if step is not None:
        state["step"] = step


# ------------------------------------------------------------------------------ RNG


def _rng_grid(args) -> tuple[int, ...]:
    """Megatron-LM's RNG sharding: by (PP, TP), or by (PP, TP, DP) with expert parallelism."""
    grid = (args.pipeline_model_parallel_size, args.tensor_model_parallel_size)
    return grid + (args.data_parallel_size,) if args.expert_model_parallel_size > 1 else grid


def _rng_sharded_object() -> ShardedObject:
    ps = parallel_state
    shape = _rng_grid(layout_args())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if len(shape) == 3:
        return ShardedObject("rng_state", [_rng_state()], shape, offset + (dp_rank,), replica_id=0)
    return ShardedObject("rng_state", [_rng_state()], shape, offset, replica_id=dp_rank)


def _rng_state() -> dict:
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if has_gpu() else None,
        "rng_tracker_states": {k: tensor_parallel.convert_cuda_rng_state(v).clone() for k, v in tracker.items()},
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if has_gpu() and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    graphable = tensor_parallel.random.is_graph_safe_cuda_rng_tracker(tracker)
    states = state["rng_tracker_states"]
    tracker.set_states(
        {k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=graphable) for k, v in states.items()}
    )


def same_rng_grid(saved, log) -> bool:
    if not hasattr(saved, "pipeline_model_parallel_size"):
        log("[checkpoint] the checkpoint records no layout: RNG states not restored")
        return False
    before, now = _rng_grid(saved), _rng_grid(layout_args())
    if before != now:
        log(f"[checkpoint] RNG grid (PP, TP[, DP]) changed from {before} to {now}: RNG states not restored")
    return before == now
