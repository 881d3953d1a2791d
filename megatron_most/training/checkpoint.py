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

import functools
import json
import os
import re
import shutil
import time
import types
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from megatron_most.model.checkpoint import TRACKER, CheckpointError, checkpoint_dir, latest_iteration, load_sharded
from megatron_most.model.config import CONFIG_NAME, read_config, write_config
from megatron_most.options import ConfigError
from megatron_most.platform.runtime import device, has_gpu
from megatron_most.training import checkpoint_state as cs

TRAIN_STATE = "train_state.json"
_ITER = re.compile(r"iter_(\d{7})")


def _partial_dir(save_dir, iteration: int) -> Path:
    return Path(save_dir) / f".iter_{iteration:07d}.partial"


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
        metadata = cs.sharding_metadata(optimizer)
        sharded = cs.state_dict(cs.unwrap(model_chunks), optimizer, metadata, is_loading=False, rng=True)
        sharded.update(cs.common_state(iteration, scheduler, state))
        request = dist_checkpointing.save(
            sharded,
            str(partial),
            # DP ranks share the writing of replicated tensors (Megatron-LM's --ckpt-fully-parallel-save)
            FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), metadata["dp_cp_group"]),
            async_sharded_save=self.async_save,
            preprocess_common_before_consistancy_check=cs.without_optimizer,
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
    metadata = {**(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}), **cs.dp_metadata()}
    saved = common.get("args", types.SimpleNamespace())
    restore_rng = load_rng and cs.same_rng_grid(saved, log)
    if load_optim:
        cs.check_same_optimizer_kind(optimizer, metadata, path)
    models = cs.unwrap(model_chunks)
    sharded = cs.state_dict(models, optimizer if load_optim else None, metadata, is_loading=True, rng=restore_rng)
    loaded = load_sharded(sharded, path)
    cs.load_models(models, loaded)
    if load_optim:
        cs.load_optimizer(optimizer, loaded["optimizer"], common["optimizer"], path)
        if scheduler is not None:
            scheduler.num_steps = 0  # its load_state_dict adds the saved steps to the current count
            scheduler.load_state_dict(common["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main copies of bf16 weights follow the weights
    if restore_rng:
        cs.set_rng_state(loaded["rng_state"][0])
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
    models = cs.unwrap(model_chunks)
    cs.load_models(
        models, load_sharded(cs.state_dict(models, None, cs.dp_metadata(), is_loading=True, rng=False), path)
    )
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
