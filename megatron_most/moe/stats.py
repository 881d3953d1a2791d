"""Routing statistics per layer, modality and expert, gathered across ranks, and their heatmap."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_most.moe import heatmap_png
from megatron_most.moe.modality import NAMES
from megatron_most.platform import device


class RoutingStats:
    """Running counts kept by each MAMoE router: tokens routed and summed gate weight, per
    modality and expert. Padding is excluded; a recomputed forward (activation recompute runs
    the router again inside backward) is not counted twice."""

    def __init__(self, num_experts: int):
        self.tokens = torch.zeros(len(NAMES), num_experts, dtype=torch.float64)
        self.weight = torch.zeros(len(NAMES), num_experts, dtype=torch.float64)

    @torch.no_grad()
    def update(self, routing_map, probs, modality, valid) -> None:
        # routing_map, probs: [tokens, experts]; modality, valid: [tokens]
        if torch._C._current_graph_task_id() != -1:  # inside backward: an activation recompute
            return
        if self.tokens.device != probs.device:  # stay on the router's device: no host sync per layer
            self.tokens, self.weight = self.tokens.to(probs.device), self.weight.to(probs.device)
        rows = torch.nn.functional.one_hot(modality, len(NAMES)).double() * valid.unsqueeze(-1)  # [tokens, 2]
        self.tokens += rows.t() @ routing_map.double()
        self.weight += rows.t() @ probs.double()

    def reset(self) -> None:
        self.tokens.zero_()
        self.weight.zero_()


def collect(model: torch.nn.Module, reset: bool = True) -> dict:
    """Gather every MAMoE router's statistics from all ranks (all pipeline stages included).

    Returns {"tokens": [layers, 2, experts], "mean_weight": [layers, 2, experts], "layers":
    [global layer numbers]} on every rank; layers without MoE are left out.
    """
    dev = device() if torch.distributed.is_initialized() else torch.device("cpu")
    routers = [m for m in model.modules() if isinstance(getattr(m, "stats", None), RoutingStats)]
    num_layers = routers[0].config.num_layers if routers else 0
    num_experts = routers[0].mamoe.num_experts if routers else 0
    sizes = torch.tensor([num_layers, num_experts], dtype=torch.long, device=dev)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
    num_layers, num_experts = sizes.tolist()
    table = torch.zeros(2, num_layers, len(NAMES), num_experts, dtype=torch.float64, device=dev)
    present = torch.zeros(num_layers, dtype=torch.float64, device=dev)
    for router in routers:
        table[0, router.layer_number - 1] += router.stats.tokens.to(dev)
        table[1, router.layer_number - 1] += router.stats.weight.to(dev)
        present[router.layer_number - 1] = 1
        if reset:
            router.stats.reset()
    if torch.distributed.is_initialized():
        # Each rank routes its own tokens (data, sequence and expert parallel ranks alike) and each
        # pipeline stage owns its layers, so a sum over all ranks is the global count. Tensor-
        # parallel ranks without sequence parallelism see the same tokens: divide them out.
        torch.distributed.all_reduce(table)
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
        table /= _replication(routers, dev)
    table, present = table.cpu(), present.cpu()
    layers = present.nonzero().view(-1)
    tokens, weight = table[0, layers], table[1, layers]
    return {
        "layers": (layers + 1).tolist(),
        "tokens": tokens,
        "mean_weight": weight / tokens.clamp(min=1),
    }


def _replication(routers, dev) -> float:
    replicated = routers and not routers[0].config.sequence_parallel
    factor = torch.tensor([parallel_state.get_tensor_model_parallel_world_size() if replicated else 1.0], device=dev)
    torch.distributed.all_reduce(factor, op=torch.distributed.ReduceOp.MAX)
    return factor.item()


def heatmap(stats: dict, path: str | Path, title: str = "MAMoE routing") -> Path:
    """Render the gathered counts as a PNG, in this process (`heatmap_png.draw`)."""
    return heatmap_png.draw(stats["tokens"].numpy(), list(stats["layers"]), list(NAMES), path, title)


def save_counts(stats: dict, path: str | Path) -> Path:
    """The gathered token counts as an .npz (`tokens` [layers, modality, experts], `layers`,
    `names`): kept beside the heatmap for analysis, and the input of `heatmap_png` as a script."""
    path = Path(path)
    np.savez(path, tokens=stats["tokens"].numpy(), layers=np.asarray(stats["layers"]), names=np.asarray(NAMES))
    return path


def heatmap_command(counts: str | Path, path: str | Path, title: str) -> list[str]:
    """The command that renders `save_counts`'s file to a PNG in a process of its own."""
    return [sys.executable, heatmap_png.__file__, str(counts), str(path), title]
