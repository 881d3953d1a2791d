"""Run a test body in N gloo processes, torchrun-style, and collect what each rank returns.

    results = run_distributed(body, world_size=2, args=(...))

The spawner is the library's (megatron_most.platform.spawn, also used by the converter's
--verify); tests run every rank with one intra-op thread (this is a 2-core machine).
"""

from __future__ import annotations

from megatron_most.platform.spawn import RankError

DistributedTestError = RankError


def run_distributed(body, world_size: int, args=(), kwargs=None, timeout_s: float = 600.0) -> list:
    from megatron_most.platform.spawn import run_ranks

    return run_ranks(body, world_size, args, kwargs, timeout_s, threads=1)
