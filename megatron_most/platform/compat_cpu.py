"""Run Megatron-Core's GPU code paths unchanged on a CPU-only machine.

Megatron-Core 0.16.1 assumes a CUDA device in places that have nothing to do with the math:
buffers allocated with `device=torch.cuda.current_device()` (tensor-parallel mappings, p2p
communication, the global memory buffer, DDP buckets), `device="cuda"` literals (pipeline
schedules, grad clipping, optimizer flags), `.cuda()` calls, `torch.cuda.Stream`/`synchronize`
(alltoall dispatcher, DDP, dist_checkpointing), the CUDA RNG tracker, and type checks on
`'torch.cuda.FloatTensor'` strings (distributed optimizer, grad clipping).

Rather than copy those files, `enable()` makes "the CUDA device" mean the CPU, in three parts:

1. Device arguments: `_CudaMeansCpu` (a TorchFunctionMode) turns every CUDA device argument
   of a torch call (`device="cuda"`, `.to("cuda")`, `torch.tensor(..., device="cuda")`) into
   the CPU and drops `pin_memory`. Function modes are off inside autograd backward, where
   activation recompute re-runs layer forwards, so `torch.autograd.backward` runs under
   `_CudaMeansCpuInBackward`, a dispatch mode doing the same for aten ops. `Tensor.cuda()`
   returns the tensor itself, and a CPU tensor's `.type()` reads `torch.cuda.*` so the
   distributed optimizer's and grad clipping's string checks take their fp32/bf16 branches.
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
import importlib.util
import threading

import torch
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer import multi_latent_attention
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_lock = threading.Lock()
_enabled = False


def _to_cpu(device):
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaMeansCpu(TorchFunctionMode):
    """Run torch calls that name a CUDA device (`device="cuda"`, `torch.tensor(..., device=
    "cuda")`, `.to("cuda")`, `pin_memory=True`) on the CPU. Torch validates these arguments
    before dispatch, so this has to act at the Python API level."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            return func(*args).replace("torch.", "torch.cuda.", 1)  # the optimizer's type checks
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class _CudaMeansCpuInBackward(TorchDispatchMode):
    """The same inside autograd backward, where function modes are off but activation
    recompute re-runs whole layer forwards (e.g. the causal mask on `device="cuda"`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _to_cpu(kwargs["device"])}
        return func(*args, **kwargs)


def _backward_on_cpu(original):
    def backward(*args, **kwargs):
        with _CudaMeansCpuInBackward():
            return original(*args, **kwargs)

    return backward


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
    # Python bindings call _lazy_init for a CUDA device argument before dispatch; without it
    # the op reaches _CudaMeansCpuInBackward, which moves it to the CPU.
    cuda._lazy_init = lambda: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU is the device
    torch.autograd.backward = _backward_on_cpu(torch.autograd.backward)  # Tensor.backward calls it
    # The CPU device, not an index: `device=torch.cuda.current_device()` then needs no rewrite.
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

    # The RNG tracker sets state through torch.cuda._lazy_call, which on a CPU-only build
    # queues the callback forever; read and write the CPU generator directly instead.
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
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
    """Two 0.16.1 modules misjudge a missing Transformer Engine (GPU or not):
    moe_utils never defines `te_general_gemm`, so the router's gating GEMM raises NameError;
    multi_latent_attention imports Megatron's TE extension, which succeeds with mocks, so it sets
    HAVE_TE=True and `isinstance(..., TELinear)` fails on the mock."""

    if importlib.util.find_spec("transformer_engine") is not None:
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    multi_latent_attention.HAVE_TE = False


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


@contextlib.contextmanager
def suspended():
    """Lift `_CudaMeansCpu` for a block that names no CUDA device (cached decoding): every torch
    call under the mode pays a Python `__torch_function__` hop. A CUDA device named inside the
    block fails loudly ("Torch not compiled with CUDA enabled"). No-op where the layer is off."""
    if not _enabled:
        yield
        return
    popped = []
    while torch._C._len_torch_function_stack():
        popped.append(torch._C._pop_torch_function_stack())
        if isinstance(popped[-1], _CudaMeansCpu):
            break
    try:
        yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)
