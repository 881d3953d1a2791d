"""Per-parameter tensors of a Megatron module <-> `torch_dist` checkpoints, at any layout.

`save_values` writes any tensors shaped like the module's parameters (its weights, gradients,
a reference run's results) through the module's own `sharded_state_dict`, so they land in the
same keys and shards as a real checkpoint; `load_values` reads a checkpoint resharded to this
process's layout without touching the module's weights. The self-check, conversion's
`--verify` and the training checkpoints share these helpers.

`load_sharded` is the one load path: Transformer Engine modules keep FP8 metadata as
`_extra_state` objects that local modules do not have, so a checkpoint saved by the local spec
(CPU, the converter) lacks some a TE model asks for. Those are left at their initial values;
any other key the model asks for and the checkpoint lacks is an error naming the keys.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.validation import StrictHandling

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's tracker file in a save folder: the iteration of the newest complete checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the path and the fix."""


def checkpoint_dir(save_dir, iteration: int) -> Path:
    """Megatron-LM's folder of one checkpoint: SAVE/iter_0000500."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_iteration(load_dir) -> int | None:
    """The iteration the tracker names; None without a tracker (no complete checkpoint)."""
    tracker = Path(load_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; delete it or fix it by hand")
    return int(text)


def weights_folder(path) -> Path:
    """The torch_dist folder to read weights from: the one a save folder's tracker names, or
    `path` itself when it is a torch_dist checkpoint (an iter_* folder, the converter's output)."""
    path = Path(path)
    iteration = latest_iteration(path)
    folder = checkpoint_dir(path, iteration) if iteration is not None else path
    if not dist_checkpointing.check_is_distributed_checkpoint(str(folder)):
        named = f"{path / TRACKER} names {folder}, which is" if iteration is not None else f"{path} is"
        raise FileNotFoundError(f"{named} not a complete torch_dist checkpoint (no metadata.json)")
    return folder


class CheckpointKeyError(KeyError):
    """The model asks for tensors the checkpoint does not hold, or holds in another shape."""


HINT = "it was saved for another model: compare the model's configuration with the checkpoint's most_config.json"


def check_keys(sharded_state_dict: dict, path) -> None:
    """Name every tensor the checkpoint at `path` lacks or holds in another shape, before any
    read: dist_checkpointing stops at the first wrong shape inside torch's load planner, and
    fails on a missing SwiGLU tensor (a factory's) with an error that names nothing. TE's
    `_extra_state` may be missing (see the module docstring)."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    wanted = [t for t in nested_values(load_preprocess(sharded_state_dict)[0]) if isinstance(t, ShardedTensor)]
    missing = sorted({t.key for t in wanted if t.key not in saved and not t.key.endswith("_extra_state")})
    if missing:
        raise CheckpointKeyError(f"{path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}; {HINT}")
    wrong = sorted(
        f"{t.key} {tuple(saved[t.key].global_shape)} (model: {tuple(t.global_shape)})"
        for t in wanted
        if t.key in saved and saved[t.key].global_shape != t.global_shape
    )
    if wrong:
        raise CheckpointKeyError(f"{path} holds {len(set(wrong))} tensor(s) in another shape, e.g. {wrong[:3]}; {HINT}")


def load_sharded(sharded_state_dict: dict, path) -> dict:
    """dist_checkpointing.load, after `check_keys`, tolerating only missing TE `_extra_state`."""
    check_keys(sharded_state_dict, path)
    # Megatron's "unexpected" keys: asked for by the model, absent from the checkpoint.
    loaded, _, absent = dist_checkpointing.load(sharded_state_dict, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    real = sorted(key for key in absent if not key.endswith("_extra_state"))
    if real:
        raise CheckpointKeyError(
            f"checkpoint {path} lacks {len(real)} tensor(s) the model needs, e.g. {real[:4]}; {HINT}"
        )
    return loaded


@contextlib.contextmanager
def params_hold(module: torch.nn.Module, values: dict):
    """Temporarily point each parameter's data at `values[name]` (e.g. its gradient)."""
    params = dict(module.named_parameters())
    saved = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = values[name]
        yield
    finally:
        for name, p in params.items():
            p.data = saved[name]


def save_values(module: torch.nn.Module, values: dict, path: Path) -> None:
    """Save per-parameter tensors (weights or gradients) as a torch_dist checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with params_hold(module, values):
        dist_checkpointing.save(module.sharded_state_dict(), str(path))


def load_values(module: torch.nn.Module, path: Path) -> dict:
    """This rank's shards of a torch_dist checkpoint, keyed by parameter name, resharded to
    the current layout; the module's own weights are left untouched."""
    fresh = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    with params_hold(module, fresh):
        loaded = load_sharded(module.sharded_state_dict(), path)
        module.load_state_dict(loaded, strict=False)
    return fresh
