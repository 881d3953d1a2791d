"""Training checkpoints (megatron_most/training/checkpoint.py) on the tiny MoST preset.

Each test compares with something computed independently of the checkpoint being tested: the
objects' own state before saving, the weights a run wrote with `model.checkpoint.save_values`,
the losses of the same run continued without a checkpoint, or the files a killed process left.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


# ------------------------------------------------------------------------------ helpers (run in ranks)


def _setup(layout, distributed_optimizer: bool, **overrides):
    """Tiny MoST at `layout`, DDP-wrapped, with Adam and a warmup + cosine LR schedule."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_most.model.config import preset
    from megatron_most.model.most import build_model
    from megatron_most.platform import initialize
    from megatron_most.training.engine import wrap

    most = dataclasses.replace(preset("tiny"), **overrides)
    initialize(layout, num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config(layout, precision="fp32", ddp=True))
    config = OptimizerConfig(
        optimizer="adam",
        lr=LR,
        min_lr=LR / 10,
        use_distributed_optimizer=distributed_optimizer,
        params_dtype=torch.float32,
    )
    ddp, optimizer = wrap(model, config)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=LR,
        min_lr=LR / 10,
        lr_warmup_steps=2,
        lr_decay_steps=20,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=20,
        wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def _train(ddp, optimizer, scheduler, steps: int) -> list[float]:
    """`steps` optimizer steps on the self-check's fixed MoST batch; the losses."""
    from megatron.core import parallel_state

    from megatron_most.training import selfcheck
    from megatron_most.training.engine import train_step

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    schedule = dict(
        num_microbatches=selfcheck.GLOBAL // (selfcheck.MICRO * dp),
        seq_length=selfcheck.SEQ,
        micro_batch_size=selfcheck.MICRO,
    )
    losses = []
    for _ in range(steps):
        tokens = selfcheck.most_tokens(torch.Generator().manual_seed(1000)).chunk(dp)[dp_rank]
        step = functools.partial(selfcheck.forward_step, kind="most")
        losses.append(train_step(ddp, optimizer, step, iter(tokens.split(selfcheck.MICRO)), **schedule).loss)
        scheduler.step(increment=1)
    return losses


def _weights(ddp) -> dict:
    return {name: p.detach().clone() for name, p in ddp.module.named_parameters()}


def _optimizer_states(optimizer) -> list:
    """Every per-parameter state tensor (exp_avg, exp_avg_sq, step), in parameter order."""
    states = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                states.append({k: torch.as_tensor(v).clone() for k, v in sub.optimizer.state[p].items()})
    return states


def _draws() -> tuple:
    """One draw from each RNG a checkpoint restores."""
    import numpy as np
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), tracked.tolist()


# ------------------------------------------------------------------------------ 1. round trip


def _round_trip(tmp: Path, distributed_optimizer: bool, target_steps: int):
    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import Checkpointer, checkpoint_dir, latest_iteration, load

    ddp, optimizer, scheduler = _setup(ParallelLayout(), distributed_optimizer)
    _train(ddp, optimizer, scheduler, 2)
    state = {"consumed_samples": 16, "config": {"preset": "tiny", "lr": LR}}
    Checkpointer(tmp, log=lambda m: None).save(2, [ddp], optimizer, scheduler, state)
    weights, states, sched, draws = _weights(ddp), _optimizer_states(optimizer), scheduler.state_dict(), _draws()

    fresh, fresh_optimizer, fresh_scheduler = _setup(ParallelLayout(), distributed_optimizer)
    _train(fresh, fresh_optimizer, fresh_scheduler, target_steps)  # a fresh or an already trained target
    assert not all(torch.equal(weights[n], p) for n, p in fresh.module.named_parameters())
    iteration, loaded_state = load(tmp, [fresh], fresh_optimizer, fresh_scheduler, log=lambda m: None)

    assert (iteration, loaded_state, latest_iteration(tmp)) == (2, state, 2)
    assert json.loads((checkpoint_dir(tmp, 2) / "train_state.json").read_text()) == {"iteration": 2, "state": state}
    assert all(torch.equal(weights[n], p) for n, p in fresh.module.named_parameters())
    loaded = _optimizer_states(fresh_optimizer)
    assert len(loaded) == len(states) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(states, loaded)
    )
    assert fresh_scheduler.state_dict() == sched
    assert _draws() == draws  # RNG states restored as they were at the save
    # one more step on each: everything the update reads (e.g. Adam's step counts) was restored
    assert _train(fresh, fresh_optimizer, fresh_scheduler, 1) == _train(ddp, optimizer, scheduler, 1)
    assert all(torch.equal(p, q) for p, q in zip(fresh.module.parameters(), ddp.module.parameters()))
    return sorted(p.name for p in tmp.iterdir())


@pytest.mark.parametrize(
    "distributed_optimizer, target_steps", [(False, 1), (True, 0)], ids=["adam-into-trained", "distributed-into-fresh"]
)
def test_round_trip_restores_weights_optimizer_scheduler_rng_and_state(tmp_path, distributed_optimizer, target_steps):
    files = run_distributed(_round_trip, 1, args=(tmp_path, distributed_optimizer, target_steps))[0]
    assert files == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"


# ------------------------------------------------------------------------------ 2. another layout


def _save_and_continue(tmp: Path, layout):
    from megatron_most.model.checkpoint import save_values
    from megatron_most.training.checkpoint import Checkpointer

    ddp, optimizer, scheduler = _setup(layout, True)
    _train(ddp, optimizer, scheduler, 2)
    Checkpointer(tmp / "run", log=lambda m: None).save(2, [ddp], optimizer, scheduler, {"step": 2})
    save_values(ddp.module, _weights(ddp), tmp / "reference")
    return _train(ddp, optimizer, scheduler, 2)


def _resume_at_one_rank(tmp: Path):
    from megatron_most.model.checkpoint import load_values
    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import load

    ddp, optimizer, scheduler = _setup(ParallelLayout(), True)
    notes = []
    iteration, state = load(tmp / "run", [ddp], optimizer, scheduler, log=notes.append)
    reference = load_values(ddp.module, tmp / "reference")
    same = all(torch.equal(reference[n], p) for n, p in ddp.module.named_parameters())
    return iteration, state, same, notes, _train(ddp, optimizer, scheduler, 2)


@pytest.mark.parametrize("layout", [dict(ep=2), dict(tp=2, sp=True), dict(pp=2)], ids=["ep2", "tp2", "pp2"])
def test_resume_at_another_layout_reshards_weights_and_optimizer(tmp_path, layout):
    from megatron_most.platform import ParallelLayout

    continued = run_distributed(_save_and_continue, 2, args=(tmp_path, ParallelLayout(**layout)))[0]
    iteration, state, same, notes, resumed = run_distributed(_resume_at_one_rank, 1, args=(tmp_path,))[0]
    assert (iteration, state, same) == (2, {"step": 2}, True)
    assert any("RNG states not restored" in n for n in notes)  # (PP, TP) or, with EP, (PP, TP, DP) changed
    # the second step's loss depends on the Adam moments and the LR schedule, not only the weights
    for ours, theirs in zip(resumed, continued):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs), (resumed, continued)


# ------------------------------------------------------------------------------ 3. killed save


def save_forever(save_dir: str) -> None:
    """Child process of the SIGKILL test: save iterations 1, 2, 3, ... until killed."""
    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import Checkpointer

    ddp, optimizer, scheduler = _setup(ParallelLayout(), True)
    checkpointer = Checkpointer(save_dir, log=lambda m: None)
    for iteration in range(1, 10_000):
        checkpointer.save(iteration, [ddp], optimizer, scheduler, {"iteration": iteration})


def _writing(save_dir: Path) -> bool:
    """A partial folder holds files (it may be renamed under our feet)."""
    for partial in save_dir.glob(".iter_*.partial"):
        try:
            if any(partial.iterdir()):
                return True
        except FileNotFoundError:
            pass
    return False


def _kill_while_saving(save_dir: Path, deadline_s: float = 120.0) -> int:
    """Start `save_forever`, SIGKILL it while a partial folder holds files; the tracked iteration."""
    from megatron_most.platform.spawn import single_process_env

    code = f"from tests.test_train_checkpoint import save_forever; save_forever({str(save_dir)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=single_process_env(OMP_NUM_THREADS="1"))
    try:
        start = time.time()
        while time.time() - start < deadline_s and child.poll() is None:
            if (save_dir / "latest_checkpointed_iteration.txt").exists() and _writing(save_dir):
                time.sleep(random.uniform(0, 0.02))
                break
            time.sleep(0.002)
        else:
            raise AssertionError(f"the saving child never started a second save (exit code {child.poll()})")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return int((save_dir / "latest_checkpointed_iteration.txt").read_text())


def _after_kill(save_dir: Path, tracked: int):
    from megatron.core import dist_checkpointing

    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import Checkpointer, checkpoint_dir, latest_iteration, load

    partial = save_dir / f".iter_{tracked + 1:07d}.partial"
    before = sorted(p.name for p in partial.iterdir())
    ddp, optimizer, scheduler = _setup(ParallelLayout(), True)
    assert latest_iteration(save_dir) == tracked
    assert load(save_dir, [ddp], optimizer, scheduler, log=lambda m: None) == (tracked, {"iteration": tracked})
    Checkpointer(save_dir, log=lambda m: None).save(tracked + 1, [ddp], optimizer, scheduler, {"after": "kill"})
    assert not partial.exists() and latest_iteration(save_dir) == tracked + 1
    assert dist_checkpointing.check_is_distributed_checkpoint(str(checkpoint_dir(save_dir, tracked + 1)))
    assert load(save_dir, [ddp], log=lambda m: None) == (tracked + 1, {"after": "kill"})
    return before


def test_a_killed_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    for attempt in range(5):
        save_dir = tmp_path / f"attempt{attempt}"
        tracked = _kill_while_saving(save_dir)
        if (save_dir / f".iter_{tracked + 1:07d}.partial").is_dir():
            break  # killed inside the save of tracked + 1 (not between a rename and the tracker)
    else:
        pytest.fail("no attempt was killed in the middle of a save")
    assert not (save_dir / f"iter_{tracked + 1:07d}").exists()
    files = run_distributed(_after_kill, 1, args=(save_dir, tracked))[0]
    assert "train_state.json" not in files  # written only when the folder is published


# ------------------------------------------------------------------------------ 4. keep_last, pretrained


def _keep_last_and_pretrained(tmp: Path):
    from megatron_most.model.checkpoint import save_values
    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import Checkpointer, latest_iteration, load_pretrained

    ddp, optimizer, scheduler = _setup(ParallelLayout(), False)
    notes = []
    checkpointer = Checkpointer(tmp / "run", keep_last=2, async_save=True, log=notes.append)
    listing = []
    for iteration in (10, 20, 30):
        checkpointer.save(iteration, [ddp], optimizer, scheduler, {})
        checkpointer.finalize()
        listing.append(sorted(p.name for p in (tmp / "run").iterdir()))
    checkpointer.save(30, [ddp], optimizer, scheduler, {"again": True})  # replaces iter_0000030
    checkpointer.finalize(blocking=True)
    listing.append(sorted(p.name for p in (tmp / "run").iterdir()))
    weights = _weights(ddp)
    save_values(ddp.module, weights, tmp / "converted")  # a plain torch_dist folder, as the converter writes

    fresh, fresh_optimizer, _ = _setup(ParallelLayout(), False)
    load_pretrained(tmp / "run", [fresh], optimizer=fresh_optimizer, log=lambda m: None)
    from_run = all(torch.equal(weights[n], p) for n, p in fresh.module.named_parameters())
    other, _, _ = _setup(ParallelLayout(), False)
    load_pretrained(tmp / "converted", [other], log=lambda m: None)
    from_plain = all(torch.equal(weights[n], p) for n, p in other.module.named_parameters())
    again = json.loads((tmp / "run" / "iter_0000030" / "train_state.json").read_text())["state"]
    return listing, latest_iteration(tmp / "run"), notes, from_run, from_plain and again == {"again": True}


def test_keep_last_async_fallback_and_load_pretrained(tmp_path):
    listing, latest, notes, from_run, from_plain = run_distributed(_keep_last_and_pretrained, 1, args=(tmp_path,))[0]
    tracker = "latest_checkpointed_iteration.txt"
    assert listing == [
        ["iter_0000010", tracker],
        ["iter_0000010", "iter_0000020", tracker],
        ["iter_0000020", "iter_0000030", tracker],
        ["iter_0000020", "iter_0000030", tracker],
    ]
    assert latest == 30 and from_run and from_plain
    if not torch.cuda.is_available():
        assert any("written synchronously" in n for n in notes)


def _async_save(tmp: Path):
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import Checkpointer, load

    ddp, optimizer, scheduler = _setup(ParallelLayout(), True)
    _train(ddp, optimizer, scheduler, 1)
    checkpointer = Checkpointer(tmp, log=lambda m: None)
    checkpointer.async_save, checkpointer._queue = True, AsyncCallsQueue()  # what a GPU machine gets
    checkpointer.save(1, [ddp], optimizer, scheduler, {"async": True})
    pending = sorted(p.name for p in tmp.iterdir())
    weights = _weights(ddp)
    _train(ddp, optimizer, scheduler, 1)  # training goes on while the checkpoint is written
    checkpointer.finalize(blocking=True)
    done = sorted(p.name for p in tmp.iterdir())
    fresh, fresh_optimizer, fresh_scheduler = _setup(ParallelLayout(), True)
    loaded = load(tmp, [fresh], fresh_optimizer, fresh_scheduler, log=lambda m: None)
    same = all(torch.equal(weights[n], p) for n, p in fresh.module.named_parameters())
    return pending, done, loaded, same


def test_async_save_publishes_at_finalize(tmp_path):
    """The async path on two CPU ranks (Checkpointer uses it on GPUs only; the fork-based writer
    works here too): nothing is published before `finalize`, and the checkpoint holds the state at
    `save` although training went on."""
    for pending, done, loaded, same in run_distributed(_async_save, 2, args=(tmp_path,)):
        assert pending == [".iter_0000001.partial"]
        assert done == ["iter_0000001", "latest_checkpointed_iteration.txt"]
        assert loaded == (1, {"async": True}) and same


# ------------------------------------------------------------------------------ 5. another model


def _load_another_shape(tmp: Path):
    from megatron_most.platform import ParallelLayout
    from megatron_most.training.checkpoint import Checkpointer, load

    ddp, optimizer, scheduler = _setup(ParallelLayout(), False)
    Checkpointer(tmp, log=lambda m: None).save(1, [ddp], optimizer, scheduler, {})
    errors = []
    for overrides, distributed in ((dict(dense_ffn_size=96), False), (dict(num_layers=5), False), ({}, True)):
        other, other_optimizer, _ = _setup(ParallelLayout(), distributed, **overrides)
        try:
            load(tmp, [other], other_optimizer if distributed else None, log=lambda m: None)
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_loading_another_model_shape_names_the_tensor(tmp_path):
    wider, deeper, switched = run_distributed(_load_another_shape, 1, args=(tmp_path,))[0]
    assert (
        wider.startswith("CheckpointKeyError")
        and "decoder.layers.0.mlp.linear_fc1.weight (256, 64) (model: (192, 64))" in wider
    ), wider
    assert deeper.startswith("CheckpointKeyError") and "decoder.layers.4." in deeper, deeper
    assert switched.startswith("CheckpointError") and "use_distributed_optimizer=False" in switched, switched


def test_latest_iteration_without_a_checkpoint(tmp_path):
    from megatron_most.training.checkpoint import CheckpointError, checkpoint_dir, latest_iteration

    assert latest_iteration(tmp_path) is None
    assert checkpoint_dir(tmp_path, 500) == tmp_path / "iter_0000500"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("soon\n")
    with pytest.raises(CheckpointError, match="soon"):
        latest_iteration(tmp_path)
    assert os.listdir(tmp_path) == ["latest_checkpointed_iteration.txt"]


def test_check_model_names_fields_before_any_process_group(tmp_path):
    from megatron_most.model.config import preset, write_config
    from megatron_most.options import ConfigError
    from megatron_most.training.checkpoint import check_model

    tiny = preset("tiny")
    check_model(tmp_path / "run", tiny)  # nothing saved yet: a fresh run
    (tmp_path / "run" / "iter_0000005").mkdir(parents=True)
    write_config(tmp_path / "run" / "iter_0000005", tiny)  # as every training checkpoint holds it
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("5")
    (tmp_path / "converted").mkdir()
    write_config(tmp_path / "converted", tiny)  # as the converter writes it
    for path in (tmp_path / "run", tmp_path / "converted"):
        check_model(path, dataclasses.replace(tiny, seq_length=128))  # a training setting, not a weight size
        with pytest.raises(ConfigError, match=r"hidden_size: 64 -> 96"):
            check_model(path, dataclasses.replace(tiny, hidden_size=96))
