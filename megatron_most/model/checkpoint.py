"""Per-parameter tensors of a Megatron module <-> `torch_dist` checkpoints, at any layout.

`save_values` writes any tensors shaped like the module's parameters (its weights, gradients,
a reference run's results) through the module's own `sharded_state_dict`, so they land in the
same keys and shards as a real checkpoint; `load_values` reads a checkpoint resharded to this
process's layout without touching the module's weights. The self-check, conversion's
`--verify` and the training checkpoints share these helpers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from megatron.core import dist_checkpointing


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
        loaded = dist_checkpointing.load(module.sharded_state_dict(), str(path))
        module.load_state_dict(loaded, strict=False)
    return fresh
