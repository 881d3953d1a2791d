"""Run a test body in N gloo processes, torchrun-style, and collect what each rank returns.

    results = run_distributed(body, world_size=2, args=(...))

`body` must be importable (a module-level function). Each rank gets torchrun's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), one intra-op thread (this is a
2-core machine), and its return value comes back in rank order. If a rank raises, the other
ranks (likely blocked in a collective) are killed and the test fails with that rank's
traceback; if the ranks do not finish within `timeout_s`, all are killed and the test fails
naming the ranks still running. No rank is ever left hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(body, args, kwargs, rank, world_size, port, results):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle bytes: torch's queue pickler would share tensors through file descriptors
        # that vanish when this process exits.
        results.put((rank, True, pickle.dumps(body(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            from megatron_most.platform import shutdown

            shutdown()


def _others(procs, done, failed=None) -> str:
    states = []
    for r, p in enumerate(procs):
        if r == failed or r in done:
            continue
        states.append(f"rank {r} exited with code {p.exitcode}" if p.exitcode is not None else f"rank {r} running")
    return ", ".join(states) or "no other rank outstanding"


class DistributedTestError(AssertionError):
    pass


def run_distributed(body, world_size: int, args=(), kwargs=None, timeout_s: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(body, args, kwargs or {}, rank, world_size, port, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(done))
                raise DistributedTestError(
                    f"{body.__name__}: ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 5.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and not p.is_alive()]
                if dead:
                    raise DistributedTestError(
                        f"{body.__name__}: rank(s) {dead} died without a result ({_others(procs, done)})"
                    )
                continue
            if not ok:
                time.sleep(1.0)  # let a rank whose death caused this failure show its exit code
                raise DistributedTestError(
                    f"{body.__name__}: rank {rank} of {world_size} failed ({_others(procs, done, rank)}):\n{value}"
                )
            done[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(done) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [done[r] for r in range(world_size)]
