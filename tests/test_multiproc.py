"""A rank that fails, dies or hangs never leaves the others hanging."""

import os
import time

import pytest

from tests.multiproc import DistributedTestError, run_distributed


def _one_rank_raises():
    import torch

    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout())
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank one is broken")
    torch.distributed.barrier()  # would wait forever for rank 1


def _one_rank_dies():
    import torch

    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout())
    if torch.distributed.get_rank() == 1:
        os._exit(3)
    torch.distributed.barrier()


def _one_rank_hangs():
    if int(os.environ["RANK"]) == 1:
        time.sleep(600)


def _collective_times_out():
    import torch

    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), timeout_s=5)
    if torch.distributed.get_rank() == 1:
        time.sleep(30)
        return "slept"
    start = time.monotonic()
    try:
        torch.distributed.barrier()
    except Exception as err:  # noqa: BLE001 - the point is that it raises
        return f"{type(err).__name__} after {time.monotonic() - start:.0f}s: {err}"
    return "barrier returned"


def test_failing_rank_is_reported_and_others_killed():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one is broken"):
        run_distributed(_one_rank_raises, 2, timeout_s=300)
    assert time.monotonic() - start < 120


def test_dead_rank_is_reported():
    # gloo notices the closed connection, so rank 0 fails fast; the report names the dead rank
    with pytest.raises(DistributedTestError, match=r"rank 1 exited with code 3"):
        run_distributed(_one_rank_dies, 2, timeout_s=300)


def test_hanging_rank_times_out_with_message():
    with pytest.raises(DistributedTestError, match=r"ranks \[1\] of 2 did not finish within 20s"):
        run_distributed(_one_rank_hangs, 2, timeout_s=20)


def test_collectives_time_out_instead_of_hanging():
    waiting, sleeper = run_distributed(_collective_times_out, 2, timeout_s=120)
    assert sleeper == "slept"
    assert waiting != "barrier returned" and "after" in waiting, waiting
    assert float(waiting.split(" after ")[1].split("s:")[0]) < 25


def _reduce_host_tensor(on_device: bool):
    import torch

    from megatron_most.platform import ParallelLayout, device, initialize
    from tests import device_guard

    device_guard.watch(__file__)  # the guard marks the package's tensors; here, this test's too
    initialize(ParallelLayout())
    value = torch.tensor([1.0], device=device()) if on_device else torch.tensor([1.0])
    torch.distributed.all_reduce(value * 2)  # the mark follows the tensor through ops
    return value.item()


def test_device_guard_fails_a_collective_on_a_host_tensor():
    with pytest.raises(DistributedTestError, match="all_reduce got a tensor created without device="):
        run_distributed(_reduce_host_tensor, 2, args=(False,), timeout_s=120)
    assert run_distributed(_reduce_host_tensor, 2, args=(True,), timeout_s=120) == [1.0, 1.0]


def _ranks_after_rendezvous():
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout())
    import torch

    return torch.distributed.get_rank()


def test_a_rendezvous_port_taken_meanwhile_is_retried(monkeypatch):
    """Another process takes the chosen free port before rank 0 listens (parallel test workers):
    the spawn is retried on a new port instead of failing."""
    import socket

    from megatron_most.platform import spawn

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken, real = [busy.getsockname()[1]], spawn._free_port
        monkeypatch.setattr(spawn, "_free_port", lambda: taken.pop() if taken else real())
        assert spawn.run_ranks(_ranks_after_rendezvous, 2, timeout_s=300) == [0, 1]
        assert not taken  # the taken port was tried first
