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
from megatron.core.dist_checkpointing.validation import StrictHandling


class CheckpointKeyError(KeyError):
    """The model asks for tensors the checkpoint does not hold."""


def load_sharded(sharded_state_dict: dict, path) -> dict:
    """dist_checkpointing.load, tolerating only missing TE `_extra_state` entries (see above)."""
    # Megatron's "unexpected" keys: asked for by the model, absent from the checkpoint.
    loaded, _, absent = dist_checkpointing.load(sharded_state_dict, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    real = sorted(key for key in absent if not key.endswith("_extra_state"))
    if real:
        raise CheckpointKeyError(
            f"checkpoint {path} lacks {len(real)} tensor(s) the model needs, e.g. {real[:4]}: it was saved for "
            "another architecture (compare its most_config.json with the model's)"
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
