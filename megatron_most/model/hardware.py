"""GPU and interconnect figures the planner projects onto: inputs, stated here with their source.

Peaks are the vendors' dense (no sparsity) tensor-core figures for the SXM parts. Link
bandwidths are per GPU and per direction (what one GPU can send while it receives as much):
NVLink's "600 GB/s" (A100) and "900 GB/s" (H100/H200) are bidirectional totals, so 300 and 450
GB/s here; InfiniBand is one NIC per GPU, HDR 200 Gb/s (25 GB/s) on A100 clusters and NDR
400 Gb/s (50 GB/s) on H100/H200 clusters (DGX SuperPOD reference designs).
"""

from __future__ import annotations

import dataclasses

from megatron_most.options import ConfigError


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    """Device memory (GiB)."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak (TFLOP/s); MFU is measured against it."""
    fp8_tflops: float | None
    """Dense FP8 peak (TFLOP/s); None: no FP8 tensor cores."""
    nvlink_gbs: float
    """NVLink bandwidth per GPU per direction (GB/s), inside a node."""
    ib_gbs: float
    """InfiniBand bandwidth per GPU per direction (GB/s), between nodes."""
    gpus_per_node: int = 8


GPUS = {
    "a100-40g": GPU("A100-SXM4-40GB", 40, 312, None, 300, 25),
    "a100-80g": GPU("A100-SXM4-80GB", 80, 312, None, 300, 25),
    "h100-80g": GPU("H100-SXM5-80GB", 79.6, 989, 1979, 450, 50),
    "h200": GPU("H200-SXM-141GB", 140, 989, 1979, 450, 50),
}
"""--gpu choices. H100's 80 GB is 79.6 GiB usable by CUDA, H200's 141 GB about 140 GiB."""

GEMM_EFFICIENCY = 0.65
"""Achieved fraction of the tensor-core peak over a training step's GEMMs and attention
(large bf16 GEMMs reach ~0.7-0.8 of peak, grouped expert GEMMs and flash attention less; the
dense Megatron GPT runs at ~0.47 MFU including communication and bubbles)."""
FP8_EFFICIENCY = 0.45
"""The same for FP8 GEMMs, as a fraction of the FP8 peak (quantisation/scaling kernels and
smaller effective tiles keep FP8 further from its peak)."""
LINK_EFFICIENCY = 0.8
"""Achieved fraction of link bandwidth by NCCL collectives (ring bus bandwidth)."""
MEMORY_USABLE = 0.92
"""Fraction of device memory the planner lets a plan use: the rest is the CUDA context, NCCL
buffers, cuBLAS/TE workspaces and allocator fragmentation, which no formula here counts."""


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ConfigError(f"gpu={name!r}: unknown GPU; choose one of {sorted(GPUS)}")
    return GPUS[name]
