"""Run Megatron-Core's GPU code paths unchanged on a CPU-only machine.

Megatron-Core 0.16.1 assumes a CUDA device in places that have nothing to do with the math:
buffers allocated with `device=torch.cuda.current_device()` (tensor-parallel mappings, p2p
communication, the global memory buffer, DDP buckets), `device="cuda"` literals (pipeline
schedules, grad clipping, optimizer flags), `.cuda()` calls, `torch.cuda.Stream`/`synchronize`
(alltoall dispatcher, DDP, dist_checkpointing), the CUDA RNG tracker, and type checks on
`'torch.cuda.FloatTensor'` strings (distributed optimizer, grad clipping).

Rather than copy those files, `enable()` makes "the CUDA device" mean the CPU, in three parts:

1. `_CudaMeansCpu`, a TorchFunctionMode: every CUDA device argument (`device="cuda"`,
   `device=0`, `.cuda()`, `.to("cuda")`) becomes the CPU, `pin_memory` is dropped, and a CPU
   tensor's `.type()` reads `torch.cuda.*` so the string checks take their fp32/bf16 branches.
2. `torch.cuda` stand-ins: `current_device()` is the CPU device, no-op `synchronize`/`empty_cache`, inert
   streams and events, and the "CUDA" RNG is the CPU default generator, so the model-parallel
   RNG tracker forks the generator that CPU dropout actually draws from.
3. Named Megatron seams that the above cannot reach (see `_patch_megatron`).

It is activated only when `torch.cuda.is_available()` is False (`platform.initialize` does
that), is idempotent, and `torch.cuda.is_available()` keeps returning False so code that
chooses CPU-friendly paths still does. Each item is exercised by tests/test_compat_cpu.py.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index names a CUDA device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaMeansCpu(TorchFunctionMode):
    """Redirect CUDA device arguments of any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """A CUDA stream stand-in: CPU work is already ordered, so every call is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, event=None):
        return event or _InertEvent()


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_DEFAULT_STREAM = _InertStream()
_CPU = torch.device("cpu")


def _cpu_rng_state(device=None):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, device=None, graph_safe=False):
    torch.set_rng_state(state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device object, not an index: allocations made inside autograd backward (e.g. the
    # all-to-all and gather mappings) run outside the function mode and must land on the CPU.
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.get_rng_state = cuda.random.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = cuda.random.set_rng_state = _set_cpu_rng_state
    cuda.manual_seed = cuda.random.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.default_generators = (torch.default_generator,)


def _patch_megatron() -> None:
    """Megatron-Core internals the mode and the torch.cuda stand-ins cannot reach."""
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The RNG tracker sets state through torch.cuda._lazy_call, which on a CPU-only build
    # queues the callback forever; read and write the CPU generator directly instead.
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state

    # The alltoall dispatcher moves split sizes to host numpy arrays only for CUDA tensors;
    # on the CPU they stayed tensors, which all_to_all_single does not take as split sizes.
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def patch_missing_transformer_engine() -> None:
    """Without Transformer Engine, moe_utils never defines `te_general_gemm` and the router's
    gating GEMM raises NameError (GPU or not); define it as absent so torch.mm is used."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def enable() -> None:
    """Make CUDA mean the CPU for this process. Refuses to run where a GPU exists."""
    global _enabled
    with _lock:
        if _enabled:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "compat_cpu.enable() called on a machine with a GPU: it is only for CPU-only "
                "machines; use megatron_most.platform.initialize(), which picks the backend"
            )
        _patch_torch_cuda()
        _patch_megatron()
        patch_missing_transformer_engine()
        _CudaMeansCpu().__enter__()  # stays on the mode stack for the life of the process
        _enabled = True


def is_enabled() -> bool:
    return _enabled
