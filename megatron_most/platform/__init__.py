"""Floor 1: device and backend selection (NCCL + CUDA (+ Transformer Engine) on GPUs, gloo + CPU
elsewhere), parallel layout checks, CPU compatibility for Megatron-Core, spawning local ranks.
Nothing here imports from a higher floor.
"""

# isort: off
from megatron_most.platform import quiet_import  # noqa: F401 - first: silences Megatron's import-time warnings

# isort: on
from megatron_most.platform.layout import ParallelLayout
from megatron_most.platform.runtime import (
    backend,
    choose_device,
    compute_dtype,
    device,
    fusion_settings,
    has_gpu,
    has_transformer_engine,
    init_device,
    initialize,
    place,
    precision_settings,
    prepare_process,
    shutdown,
)
from megatron_most.platform.version import MEGATRON_CORE_VERSION, check_megatron_core

__all__ = [
    "MEGATRON_CORE_VERSION",
    "ParallelLayout",
    "backend",
    "check_megatron_core",
    "choose_device",
    "compute_dtype",
    "device",
    "fusion_settings",
    "has_gpu",
    "has_transformer_engine",
    "init_device",
    "initialize",
    "place",
    "precision_settings",
    "prepare_process",
    "shutdown",
]
