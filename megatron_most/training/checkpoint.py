"""Training checkpoints in Megatron-LM's layout, written with Megatron-Core's dist_checkpointing.

    SAVE/latest_checkpointed_iteration.txt   "500": the newest complete checkpoint (the tracker)
    SAVE/iter_0000500/                       a torch_dist checkpoint (metadata.json, .metadata,
                                             *.distcp, common.pt) + train_state.json
    SAVE/.iter_0000600.partial/              a save in progress, or one killed: never read

A save writes into the `.partial` folder, renames it to `iter_NNNNNNN` once every rank has
written its part, then moves the tracker (temp file + os.replace, rank 0). A process killed at
any moment leaves either the previous checkpoint and tracker or the new ones, never a folder
that looks complete and is not; the next save of that iteration replaces the stale partial.
(Saving an existing iteration again, e.g. right after resuming from it, swaps the folders: a
kill between the two renames leaves the tracker naming a missing folder, which `load` names.)

Contents, under Megatron-LM's keys (`generate_state_dict` in megatron/training/checkpointing.py):
`model` (or `model0`, `model1`, ... with virtual pipeline stages), `optimizer` (Megatron's
`sharded_state_dict`; the distributed optimizer as `fully_reshardable`, so the states reshard
like the weights), `opt_param_scheduler`, `rng_state` (a ShardedObject per (PP, TP) rank,
replicated over DP; per (PP, TP, DP) rank with expert parallelism, whose RNG differs by rank),
`iteration`, `checkpoint_version`, `args` (the layout under Megatron-LM's argument names), and
`train_state`, the loop's JSON-able dict (rank 0's), also written to train_state.json.

Loading reshards to the current TP/PP/EP/DP layout. RNG states are restored only when the
RNG grid is unchanged, as Megatron-LM does. Every function here is collective: all ranks call it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shutil
import time
import types
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from megatron_most.model.checkpoint import CheckpointKeyError, load_sharded
from megatron_most.model.config import CONFIG_NAME, read_config, write_config
from megatron_most.options import ConfigError
from megatron_most.platform.runtime import device, has_gpu

TRACKER = "latest_checkpointed_iteration.txt"
TRAIN_STATE = "train_state.json"
CHECKPOINT_VERSION = 3.0
"""Megatron-LM's current `checkpoint_version` (query/key/value ordering of its legacy models)."""
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}
"""The distributed optimizer's states in model space, so they reshard to any layout
(Megatron-LM's --dist-ckpt-optim-fully-reshardable). Memory-efficient: gathered over gloo on
DP rank 0's host memory, not all-gathered on every GPU."""
_ITER = re.compile(r"iter_(\d{7})")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the path and the fix."""


def checkpoint_dir(save_dir, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def _partial_dir(save_dir, iteration: int) -> Path:
    return Path(save_dir) / f".iter_{iteration:07d}.partial"


def latest_iteration(load_dir) -> int | None:
    """The iteration the tracker names; None without a tracker (no complete checkpoint)."""
    tracker = Path(load_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; delete it or fix it by hand")
    return int(text)


class Checkpointer:
    """Saves training checkpoints into `save_dir` (see the module docstring).

    keep_last: after each successful save, delete all but the newest K `iter_*` folders (never
    the one the tracker names). async_save: write in the background with Megatron's async
    machinery (GPU only; on a CPU the saves are synchronous); the loop calls `finalize()` every
    step and `finalize(blocking=True)` before exiting, which moves the tracker once complete.
    """

    def __init__(self, save_dir, *, most=None, keep_last: int | None = None, async_save: bool = False, log=print):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least 1 checkpoint, or None to keep all")
        self.save_dir, self.keep_last, self.log, self.most = Path(save_dir), keep_last, log, most
        self.async_save = async_save and has_gpu()
        self._queue = AsyncCallsQueue() if self.async_save else None
        if async_save and not self.async_save:
            _log0(log, "async_save: no GPU on this machine, checkpoints are written synchronously")

    def save(self, iteration: int, model_chunks: list, optimizer=None, scheduler=None, state: dict | None = None):
        """Write checkpoint `iteration` of every rank's model chunks, optimizer, scheduler, RNG
        and the loop's `state`. Returns once written (sync) or once scheduled (async)."""
        start = time.time()
        self.finalize(blocking=True)  # one save in flight at a time: the tracker moves in order
        train_state = _train_state_json(iteration, state or {})
        state = json.loads(train_state)["state"]  # what train_state.json holds, e.g. tuples as lists
        partial = _partial_dir(self.save_dir, iteration)
        _on_rank0(lambda: _fresh_dir(partial), f"create {partial}")
        metadata = _sharding_metadata(optimizer)
        sharded = _state_dict(_unwrap(model_chunks), optimizer, metadata, is_loading=False, rng=True)
        sharded.update(_common_state(iteration, scheduler, state))
        request = dist_checkpointing.save(
            sharded,
            str(partial),
            # DP ranks share the writing of replicated tensors (Megatron-LM's --ckpt-fully-parallel-save)
            FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), metadata["dp_cp_group"]),
            async_sharded_save=self.async_save,
            preprocess_common_before_consistancy_check=_without_optimizer,
            content_metadata={k: v for k, v in metadata.items() if k != "dp_cp_group"},
        )
        commit = functools.partial(self._commit, iteration, train_state, start)
        if request is None:
            commit()
        else:
            request.add_finalize_fn(commit)
            self._queue.schedule_async_request(request)
            _log0(self.log, f"scheduled the async save of iteration {iteration} to {self.save_dir}")

    def finalize(self, blocking: bool = False) -> None:
        """Complete the async saves that have finished on every rank (all of them if
        `blocking`): rename, tracker, keep_last. Collective; a no-op for synchronous saves."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def _commit(self, iteration: int, train_state: str, start: float) -> None:
        """Every rank has written its part: publish the checkpoint (rank 0), then barrier."""

        def publish():
            partial, final = _partial_dir(self.save_dir, iteration), checkpoint_dir(self.save_dir, iteration)
            (partial / TRAIN_STATE).write_text(train_state)
            if self.most is not None:  # megatron-to-hf, --load and --pretrained-checkpoint read it
                write_config(partial, self.most)
            if final.exists():  # saving an iteration again (e.g. right after resuming from it)
                _discard(final)
            os.replace(partial, final)
            _write_atomically(self.save_dir / TRACKER, str(iteration))
            self._prune(iteration)

        _on_rank0(publish, f"publish checkpoint {iteration} in {self.save_dir}")
        _log0(self.log, f"saved checkpoint {iteration} to {self.save_dir} in {time.time() - start:.1f}s")

    def _prune(self, newest: int) -> None:
        for trash in self.save_dir.glob(".iter_*.trash"):  # left by a process killed while deleting
            shutil.rmtree(trash, ignore_errors=True)
        if self.keep_last is None:
            return
        saved = sorted(int(m.group(1)) for p in self.save_dir.iterdir() if (m := _ITER.fullmatch(p.name)))
        for old in saved[: -self.keep_last]:
            if old != newest:
                _discard(checkpoint_dir(self.save_dir, old))


def load(load_dir, model_chunks, optimizer=None, scheduler=None, *, load_optim=True, load_rng=True, log=print):
    """Resume from the checkpoint the tracker in `load_dir` names, resharded to this layout.

    Loads the weights, and unless disabled the optimizer with the scheduler (`load_optim`, a
    no-op without an optimizer) and the RNG states (`load_rng`; skipped with a note when the
    (PP, TP) grid changed). Returns (iteration, the loop's state dict). FileNotFoundError
    without a checkpoint (check `latest_iteration` first to start fresh)."""
    iteration, path = _tracked_checkpoint(load_dir)
    common = dist_checkpointing.load_common_state_dict(str(path))
    load_optim = load_optim and optimizer is not None
    for key, wanted in (("optimizer", load_optim), ("opt_param_scheduler", load_optim and scheduler is not None)):
        if wanted and key not in common:
            raise CheckpointError(f"{path} holds no {key} state: load with load_optim=False (--no-load-optim)")
    metadata = {**(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}), **_dp_metadata()}
    saved = common.get("args", types.SimpleNamespace())
    restore_rng = load_rng and _same_rng_grid(saved, log)
    if load_optim:
        _check_same_optimizer_kind(optimizer, metadata, path)
    models = _unwrap(model_chunks)
    sharded = _state_dict(models, optimizer if load_optim else None, metadata, is_loading=True, rng=restore_rng)
    loaded = _load_checked(sharded, path)
    _load_models(models, loaded)
    if load_optim:
        _load_optimizer(optimizer, loaded["optimizer"], common["optimizer"], path)
        if scheduler is not None:
            scheduler.num_steps = 0  # its load_state_dict adds the saved steps to the current count
            scheduler.load_state_dict(common["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main copies of bf16 weights follow the weights
    if restore_rng:
        _set_rng_state(loaded["rng_state"][0])
    torch.distributed.barrier()
    _log0(log, f"loaded checkpoint {common.get('iteration', iteration)} from {load_dir}")
    return int(common.get("iteration", iteration)), dict(common.get("train_state", {}))


def load_pretrained(path, model_chunks, *, optimizer=None, log=print) -> None:
    """Weights only, for finetuning from iteration 0: from a checkpoint folder of ours (its
    tracker) or a plain torch_dist folder (the converter's output). Pass the optimizer if it
    exists already, so bf16 runs refresh their fp32 main weights from the loaded ones."""
    path = Path(path)
    if (path / TRACKER).is_file():
        path = _tracked_checkpoint(path)[1]
    elif not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise FileNotFoundError(f"{path}: neither a checkpoint folder ({TRACKER}) nor a torch_dist checkpoint")
    models = _unwrap(model_chunks)
    _load_models(models, _load_checked(_state_dict(models, None, _dp_metadata(), is_loading=True, rng=False), path))
    if optimizer is not None:
        optimizer.reload_model_params()
    torch.distributed.barrier()
    _log0(log, f"loaded pretrained weights from {path}")


def check_model(path, most) -> None:
    """Refuse, before any process group exists, a checkpoint made for a model of other sizes than
    `most` (a MoSTConfig), naming the fields: compares with the most_config.json written with it
    (by training or the converter). Silent when `path` holds no checkpoint or config yet: loading
    then names any tensor of another shape."""
    path = Path(path)
    tracked = latest_iteration(path) if (path / TRACKER).is_file() else None
    folder = checkpoint_dir(path, tracked) if tracked is not None else path
    if not (folder / CONFIG_NAME).is_file():
        return
    differ = read_config(folder).shape_differences(most)
    if differ:
        raise ConfigError(
            f"{folder} holds a model of other sizes (saved -> this run): {', '.join(differ)}; "
            "use the preset and settings it was saved with"
        )


# ------------------------------------------------------------------------------ state dicts


def _unwrap(model_chunks) -> list:
    """The Megatron modules under DDP/Float16Module wrappers, as a list (one per virtual stage)."""
    return unwrap_model(list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks])


def _state_dict(models: list, optimizer, metadata: dict, *, is_loading: bool, rng: bool) -> dict:
    """The sharded part, as Megatron-LM's generate_state_dict lays it out."""
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    state = {key: model.sharded_state_dict(metadata=metadata) for key, model in zip(keys, models)}
    if optimizer is not None and not optimizer.is_stub_optimizer:
        _prime_torch_adam(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=metadata)
    if rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def _common_state(iteration: int, scheduler, state: dict) -> dict:
    common = dict(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, args=_layout_args(), train_state=state)
    if scheduler is not None:
        common["opt_param_scheduler"] = scheduler.state_dict()
    return common


def _without_optimizer(common: dict) -> dict:
    """What dist_checkpointing compares across ranks before saving rank 0's common state: not the
    optimizer's, where the memory-efficient gather leaves `param_state: None` on DP ranks > 0."""
    return {k: v for k, v in common.items() if k != "optimizer"}


def _layout_args() -> types.SimpleNamespace:
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


def _dp_metadata() -> dict:
    return {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def _sharding_metadata(optimizer) -> dict:
    distributed = any(isinstance(o, DistributedOptimizer) for o in _chain(optimizer))
    return {**_dp_metadata(), **(OPTIMIZER_SHARDING if distributed else {})}


def _check_same_optimizer_kind(optimizer, metadata: dict, path) -> None:
    """The distributed and the plain optimizer keep different common state: name the switch."""
    saved = "distrib_optim_sharding_type" in metadata
    if saved != any(isinstance(o, DistributedOptimizer) for o in _chain(optimizer)):
        raise CheckpointError(
            f"{path} holds {'distributed' if saved else 'plain'}-optimizer states: resume with "
            f"use_distributed_optimizer={saved}, or load with load_optim=False (--no-load-optim)"
        )


def _load_checked(sharded: dict, path) -> dict:
    """`load_sharded`, after naming the tensors the checkpoint lacks or holds in another shape:
    dist_checkpointing stops at the first wrong shape inside torch's load planner, and fails on
    a missing SwiGLU tensor (a factory's) before `load_sharded` can name it."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    wanted = [t for t in nested_values(load_preprocess(sharded)[0]) if isinstance(t, ShardedTensor)]
    missing = sorted({t.key for t in wanted if t.key not in saved and not t.key.endswith("_extra_state")})
    if missing:
        raise CheckpointKeyError(f"{path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}; {_HINT}")
    wrong = sorted(
        {
            f"{t.key} {tuple(saved[t.key].global_shape)} (model: {tuple(t.global_shape)})"
            for t in wanted
            if t.key in saved and saved[t.key].global_shape != t.global_shape
        }
    )
    if wrong:
        raise CheckpointError(f"{path} holds {len(wrong)} tensor(s) in another shape, e.g. {wrong[:3]}; {_HINT}")
    return load_sharded(sharded, path)


_HINT = "it was saved for another model: compare the run's configuration with the checkpoint's (train_state.json)"


def _load_models(models: list, loaded: dict) -> None:
    """Copy the loaded weights in place (DDP's buffers stay the parameters' storage)."""
    for i, model in enumerate(models):
        result = model.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"model chunk {i}: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")


# ------------------------------------------------------------------------------ optimizer


def _chain(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _load_optimizer(optimizer, loaded: dict, saved: dict, path) -> None:
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
    current = _chain(optimizer)
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
    return [o for o in _chain(optimizer) if isinstance(o, DistributedOptimizer)]


def _prime_torch_adam(optimizer) -> None:
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
    shape = _rng_grid(_layout_args())
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


def _set_rng_state(state: dict) -> None:
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


def _same_rng_grid(saved, log) -> bool:
    if not hasattr(saved, "pipeline_model_parallel_size"):
        _log0(log, "the checkpoint records no layout: RNG states not restored")
        return False
    before, now = _rng_grid(saved), _rng_grid(_layout_args())
    if before != now:
        _log0(log, f"RNG grid (PP, TP[, DP]) changed from {before} to {now}: RNG states not restored")
    return before == now


# ------------------------------------------------------------------------------ files


def _tracked_checkpoint(load_dir) -> tuple[int, Path]:
    """(iteration, folder) the tracker names, agreed on by every rank (the highest wins, as in
    Megatron-LM's read_metadata, should a shared file system show ranks different trackers)."""
    iteration = latest_iteration(load_dir)
    if iteration is None:
        raise FileNotFoundError(f"no {TRACKER} in {load_dir}: nothing to resume from")
    agreed = torch.tensor([iteration], dtype=torch.long, device=device())
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    path = checkpoint_dir(load_dir, int(agreed.item()))
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise FileNotFoundError(f"{Path(load_dir) / TRACKER} names {path}, which is missing or incomplete")
    return int(agreed.item()), path


def _fresh_dir(path: Path) -> None:
    if path.exists():  # a partial save of this iteration, killed
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _discard(path: Path) -> None:
    """Rename away first, so a process killed while deleting leaves no half-deleted iter_ folder."""
    trash = path.with_name(f".{path.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _on_rank0(fn, what: str) -> None:
    """Run `fn` on rank 0 and let every rank know whether it worked, so a failure there (a full
    disk) raises everywhere instead of leaving the other ranks waiting in the next collective."""
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = e
    failed = torch.tensor([error is not None], dtype=torch.int, device=device())
    torch.distributed.broadcast(failed, src=0)
    if failed.item():
        raise CheckpointError(f"rank 0 could not {what}: {error or 'see rank 0'}") from error


def _train_state_json(iteration: int, state: dict) -> str:
    """train_state.json's text; a value JSON cannot hold is named before anything is written."""
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"state[{key!r}] = {value!r:.60} is not JSON-able ({e}); store plain values") from e
    return json.dumps({"iteration": iteration, "state": state}, indent=2)


def _log0(log, message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log(f"[checkpoint] {message}")
