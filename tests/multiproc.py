"""Run a test body in N gloo processes, torchrun-style, and collect what each rank returns.

    results = run_distributed(body, world_size=2, args=(...))

The spawner is the library's (megatron_most.platform.spawn, also used by the converter's
--verify); tests run every rank with one intra-op thread (this is a 2-core machine) and with the
device guard on (tests/device_guard.py): a collective given a tensor made without a device fails
here as it would under NCCL on a GPU node.
"""

from __future__ import annotations

from megatron_most.platform.spawn import RankError, run_ranks
from tests.device_guard import GuardedBody

DistributedTestError = RankError


def run_distributed(body, world_size: int, args=(), kwargs=None, timeout_s: float = 600.0, guard: bool = True) -> list:
    return run_ranks(GuardedBody(body) if guard else body, world_size, args, kwargs, timeout_s, threads=1)
