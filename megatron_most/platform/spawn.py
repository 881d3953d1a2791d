"""Run a function in N gloo processes on this machine, torchrun-style, and collect what each
rank returns.

    results = run_ranks(body, world_size=2, args=(...))

`body` must be importable (a module-level function). Each rank gets torchrun's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and `threads` intra-op threads, and
its return value comes back in rank order. If a rank raises, the other ranks (likely blocked in
a collective) are killed and RankError carries that rank's traceback; if the ranks do not finish
within `timeout_s`, all are killed and RankError names the ranks still running. No rank is ever
left hanging. Used by the tests and by `convert_checkpoint.py --verify` at a parallel layout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback

import torch

from megatron_most.platform.runtime import free_port as _free_port
from megatron_most.platform.runtime import shutdown

TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def single_process_env(**overrides: str) -> dict:
    """os.environ without torchrun's variables (which `platform.initialize` also sets for a
    single process): a child process started with it forms its own one-rank job."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    return {**env, **overrides}


class RankError(AssertionError):
    """A rank failed, died or did not finish (an AssertionError so a test reports it as a failure)."""


def _rank_main(body, args, kwargs, rank, world_size, port, threads, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore",
    )

    torch.set_num_threads(threads)
    try:
        # Plain pickle bytes: torch's queue pickler would share tensors through file descriptors
        # that vanish when this process exits.
        results.put((rank, True, pickle.dumps(body(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            shutdown()


def _others(procs, done, failed=None) -> str:
    states = []
    for r, p in enumerate(procs):
        if r == failed or r in done:
            continue
        states.append(f"rank {r} exited with code {p.exitcode}" if p.exitcode is not None else f"rank {r} running")
    return ", ".join(states) or "no other rank outstanding"


PORT_ATTEMPTS = 3
"""Spawns tried when the rendezvous port was taken between choosing it and binding it."""


def run_ranks(body, world_size: int, args=(), kwargs=None, timeout_s: float = 600.0, threads: int = 1) -> list:
    for attempt in range(PORT_ATTEMPTS):
        try:
            return _spawn(body, world_size, args, kwargs, timeout_s, threads, _free_port())
        except RankError as err:
            # Another process (a parallel test worker) can take the free port before rank 0
            # listens on it: the rendezvous fails before the body ran anything distributed.
            if "EADDRINUSE" not in str(err) or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _spawn(body, world_size: int, args, kwargs, timeout_s: float, threads: int, port: int) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(body, args, kwargs or {}, rank, world_size, port, threads, results))
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
                raise RankError(
                    f"{body.__name__}: ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 5.0))
            except queue.Empty as empty:
                dead = [r for r, p in enumerate(procs) if r not in done and not p.is_alive()]
                if dead:
                    raise RankError(
                        f"{body.__name__}: rank(s) {dead} died without a result ({_others(procs, done)})"
                    ) from empty
                continue
            if not ok:
                time.sleep(1.0)  # let a rank whose death caused this failure show its exit code
                raise RankError(
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
