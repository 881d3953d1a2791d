"""The multi-process harness's device guard: a collective that receives a tensor made without a
device fails, under gloo as it would under NCCL.

On a GPU node every tensor that enters an NCCL collective must live on the GPU; `torch.tensor([x])`
without `device=` makes a CPU tensor, which NCCL refuses ("no backend for device cpu") but gloo on
a CPU machine silently reduces. Inside each test rank the guard marks every tensor that the
package's own code (megatron_most/) makes with a factory call without `device=` (and
`torch.from_numpy`'s) outside module constructors (module state moves with its module), carries the mark through the ops that use a marked tensor (so features
left on the CPU mark the activations they reach), clears it on an explicit move (`.to(device)`,
`.cuda()`), and fails any collective that gets a marked tensor. Test code and Megatron-Core's
own tensors are not marked: tests build CPU models on purpose, and Megatron places its buffers
on `torch.cuda.current_device()` itself.
"""

from __future__ import annotations

import sys
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)

PACKAGE = str(Path(__file__).resolve().parents[1] / "megatron_most")
_watched = [PACKAGE]  # source roots whose factory calls are marked


def watch(path) -> None:
    """Also mark tensors made by code under `path` (the guard's own test watches itself)."""
    _watched.append(str(Path(path).resolve()))


_marked: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> tensor made off-device
_origin: dict[int, str] = {}  # id -> where the tensor (or the one it derives from) was made


class HostTensorError(RuntimeError):
    """A collective received a tensor created without a device."""


def _is_marked(value) -> bool:
    return isinstance(value, torch.Tensor) and _marked.get(id(value)) is value


def _mark(value, origin: str) -> None:
    if isinstance(value, torch.Tensor):
        _marked[id(value)] = value
        _origin[id(value)] = origin
    elif isinstance(value, (tuple, list)):
        for item in value:
            _mark(item, origin)


def _moves(func, args, kwargs) -> bool:
    """An explicit move: `.cuda()`, `.to(device)`, `.to(other_tensor)`, `.to(device=...)`."""
    if func is torch.Tensor.cuda:
        return True
    if func is torch.Tensor.to:
        target = args[1] if len(args) > 1 else None
        return kwargs.get("device") is not None or isinstance(target, (torch.device, str, torch.Tensor))
    return False


_MODES = (str(Path(PACKAGE) / "platform" / "compat_cpu.py"), str(Path(torch.__file__).parent))


def _caller() -> tuple[str, int]:
    """(file, line) of the code that called the factory, past other function modes
    (compat_cpu's) and torch's own Python wrappers."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_MODES):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("", 0)


def _in_module_init() -> bool:
    """Inside an nn.Module constructor: module state (parameters, buffers) is placed by the
    module (platform.init_device) and moves with it, so it is not a stray host tensor."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module):
            return True
        frame = frame.f_back
    return False


def _shallow(values):
    """The values and the items of list/tuple values (torch.cat([...]), torch.stack([...]))."""
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from value
        else:
            yield value


class _MarkHostTensors(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES or func is torch.from_numpy:
            where, line = _caller()
            if kwargs.get("device") is None and where.startswith(tuple(_watched)) and not _in_module_init():
                _mark(out, f"{where}:{line} ({func.__name__})")
        elif _moves(func, args, kwargs):
            _marked.pop(id(out), None)
        elif isinstance(out, torch.nn.Parameter):
            pass  # parameters are placed by the modules (platform.init_device) and moved by training
        else:
            source = next((t for t in _shallow((*args, *kwargs.values())) if _is_marked(t)), None)
            if source is not None:
                _mark(out, _origin[id(source)])
        return out


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _guarded(name, collective):
    def call(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            for tensor in _tensors(value):
                if _is_marked(tensor):
                    site = "".join(traceback.format_stack(limit=6)[:-1])
                    raise HostTensorError(
                        f"torch.distributed.{name} got a tensor created without device= (shape "
                        f"{tuple(tensor.shape)}, {tensor.dtype}; it derives from a tensor made at {_origin[id(tensor)]}): "
                        "NCCL on a GPU node refuses CPU tensors; create it on megatron_most.platform.device() or "
                        f"move it there first. Called from:\n{site}"
                    )
        return collective(*args, **kwargs)

    call.__wrapped__ = collective
    return call


def install() -> None:
    """Turn the guard on for this process (idempotent)."""
    if getattr(dist, "_device_guard", False):
        return
    c10d = dist.distributed_c10d
    for name in COLLECTIVES:
        wrapper = _guarded(name, getattr(c10d, name))
        # both names: P2POp accepts only ops identical to distributed_c10d's own isend/irecv
        setattr(dist, name, wrapper)
        setattr(c10d, name, wrapper)
    dist._device_guard = True
    _MarkHostTensors().__enter__()  # stays on the mode stack for the life of the rank


class GuardedBody:
    """A test body that runs with the guard on (picklable when `body` is a module-level function)."""

    def __init__(self, body):
        self.body = body
        self.__name__ = getattr(body, "__name__", "body")

    def __call__(self, *args, **kwargs):
        install()
        return self.body(*args, **kwargs)
