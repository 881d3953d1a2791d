"""Device and backend selection: NCCL + CUDA (+ Transformer Engine) on GPUs, gloo + CPU elsewhere."""

from megatron_most.platform.layout import ParallelLayout
from megatron_most.platform.runtime import (
    backend,
    choose_device,
    device,
    fusion_settings,
    has_gpu,
    has_transformer_engine,
    initialize,
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
    "device",
    "fusion_settings",
    "has_gpu",
    "has_transformer_engine",
    "initialize",
    "prepare_process",
    "shutdown",
]
