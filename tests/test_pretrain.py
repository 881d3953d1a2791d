"""The pretraining loop's reliability, each case against an uninterrupted run of the same job:
resume (bit-exact at 1 rank, EP2 and PP2), resume at another layout, kill -9 during a save,
SIGTERM, non-finite steps, and bad configurations refused before any process group exists.

Jobs train the tiny preset on synthetic packed data (tests/packed_data.py: ASR with features,
TTS with units, text) for a few steps, logging every step to metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed
from tests.packed_data import write_tiny_blend

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pretrain_most.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    blend = write_tiny_blend(root, sizes=(200, 200, 300))
    return [blend[name][0] for name in ("asr", "tts", "text")]


def argv(data, out: Path, iters: int, *extra: str) -> list[str]:
    """A small job: tiny preset, seq 64, 4 sequences per step, every step logged."""
    return [
        "--preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2", "--min-lr", "3e-4",
        "--data-path", "0.4", data[0], "0.4", data[1], "0.2", data[2], "--split", "90,10,0",
        "--num-workers", "0", "--save", str(out), "--log-interval", "1", "--eval-interval", "1000",
        "--eval-iters", "1", "--seed", "7", "--use-distributed-optimizer", *extra,
    ]  # fmt: skip


def _pretrain(args: list[str]):
    """Rank body: run the job; return its exit status (and the final weights by name, rank 0)."""
    from megatron_most.training.config import parse
    from megatron_most.training.loop import pretrain

    return pretrain(parse(args), log=lambda *a, **k: None)


def train(args, world: int = 1) -> list:
    return run_distributed(_pretrain, world, args=(args,), timeout_s=600)


def losses(out: Path) -> dict[int, float]:
    """iteration -> logged lm loss (the last record of an iteration wins: a resume re-logs)."""
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm loss"] for r in records if "lm loss" in r}


def checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint in `out` (weights and optimizer states), read back
    whole with PyTorch's checkpoint reader in this process (no process group needed)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    iteration = int((out / "latest_checkpointed_iteration.txt").read_text())
    reader = FileSystemReader(str(out / f"iter_{iteration:07d}"))
    entries = reader.read_metadata().state_dict_metadata.items()
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries if isinstance(m, TensorStorageMetadata)
    }
    load(state, storage_reader=reader, no_dist=True)
    return state


def assert_same_run(straight: Path, resumed: Path):
    a, b = losses(straight), losses(resumed)
    assert a == b, (a, b)  # every logged loss identical
    wa, wb = checkpoint_tensors(straight), checkpoint_tensors(resumed)
    assert set(wa) == set(wb) and any(k.startswith("optimizer") for k in wa), sorted(set(wa) ^ set(wb))[:5]
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted 1-rank job of 6 steps that the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train(argv(data, out, 6)) == [0]
    return out


@pytest.fixture(scope="module")
def straight_ep2(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_ep2") / "run"
    assert train(argv(data, out, 6, "--expert-model-parallel-size", "2"), 2) == [0, 0]
    return out


# ---------------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(1, []), (2, ["--expert-model-parallel-size", "2"])], ids=["1rank", "EP2"])
def test_resume_is_bit_exact(data, tmp_path, request, world, layout):
    reference = request.getfixturevalue("straight" if world == 1 else "straight_ep2")
    resumed = tmp_path / "resumed"
    assert train(argv(data, resumed, 6, "--exit-interval", "3", *layout), world) == [0] * world  # saves, exits 0
    assert train(argv(data, resumed, 6, "--load", str(resumed), *layout), world) == [0] * world
    assert_same_run(reference, resumed)


@pytest.mark.slow
def test_resume_is_bit_exact_at_pp2(data, tmp_path):
    """PP2 with two virtual stages per rank: the interleaved schedule and chunked checkpoints."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pp2 = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    assert train(argv(data, straight, 6, *pp2), 2) == [0, 0]
    assert train(argv(data, resumed, 6, "--exit-interval", "3", *pp2), 2) == [0, 0]
    assert train(argv(data, resumed, 6, "--load", str(resumed), *pp2), 2) == [0, 0]
    assert_same_run(straight, resumed)


@pytest.mark.slow
def test_resume_at_another_layout(data, tmp_path, straight_ep2):
    """Saved at EP2, resumed at EP1: the losses go on within fp32 tolerance of the EP2 run."""
    moved = tmp_path / "moved"
    ep2 = ["--expert-model-parallel-size", "2"]
    assert train(argv(data, moved, 6, "--exit-interval", "3", *ep2), 2) == [0, 0]
    assert train(argv(data, moved, 6, "--load", str(moved)), 1) == [0]
    a, b = losses(straight_ep2), losses(moved)
    assert set(a) == set(b) == set(range(1, 7))
    for it in range(4, 7):
        assert math.isclose(a[it], b[it], rel_tol=1e-4), (it, a[it], b[it])


# ---------------------------------------------------------------------------------- signals and kills


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env["OMP_NUM_THREADS"] = "1"  # as the test harness's ranks: the same reduction order, the same bits
    return subprocess.Popen(
        [sys.executable, str(TOOL), *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def _wait_for(predicate, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the job ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_and_resumes_exactly(data, tmp_path, straight):
    stopped = tmp_path / "stopped"
    proc = _start(argv(data, stopped, 6), tmp_path / "job.log")
    _wait_for(lambda: (stopped / "metrics.jsonl").exists() and len(losses(stopped)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()
    saved = int((stopped / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 6
    assert train(argv(data, stopped, 6, "--load", str(stopped))) == [0]
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_checkpoint(data, tmp_path, straight):
    out = tmp_path / "killed"
    proc = _start(argv(data, out, 6, "--save-interval", "2"), tmp_path / "job.log")
    partial = lambda: any(p.name.startswith(".iter_0000004") for p in out.glob(".iter_*"))  # noqa: E731
    _wait_for(partial, proc)  # the save of iteration 4 is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert int((out / "latest_checkpointed_iteration.txt").read_text()) == 2
    assert not (out / "iter_0000004").exists()
    assert train(argv(data, out, 6, "--load", str(out))) == [0]  # resumes from 2, the partial ignored
    assert int((out / "latest_checkpointed_iteration.txt").read_text()) == 6
    assert_same_run(straight, out)


# ---------------------------------------------------------------------------------- non-finite steps


def _pretrain_with_nan(args: list[str], bad_iterations: list[int]):
    """Rank body: the job with a NaN loss injected at the given (1-based) iterations."""
    from megatron_most.training import loop
    from megatron_most.training.config import parse

    calls = {"n": 0}
    real = loop.forward_step

    def forward_step(tasks, most, data_iterator, model):
        output, loss_func = real(tasks, most, data_iterator, model)
        step = calls["n"] // 2 + 1  # 2 micro-batches per step at DP1
        calls["n"] += 1
        if step in bad_iterations:
            output = output * float("nan")
        return output, loss_func

    loop.forward_step = forward_step
    return loop.pretrain(parse(args), log=lambda *a, **k: None)


def test_one_bad_step_is_skipped_and_counted(data, tmp_path):
    out = tmp_path / "nan"
    assert run_distributed(_pretrain_with_nan, 1, args=(argv(data, out, 6), [3]))[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_iteration = {r["iteration"]: r for r in records if "lm loss" in r}
    assert by_iteration[3]["skipped iterations"] == 1 and by_iteration[3]["nan iterations"] == 1
    assert all(by_iteration[i]["skipped iterations"] == 0 for i in (1, 2, 4, 5, 6))
    assert all(math.isfinite(by_iteration[i]["lm loss"]) for i in (4, 5, 6))  # the weights were not touched
    assert any("skipped the update" in r.get("event", "") for r in records)


def test_persistent_bad_steps_stop_the_run_without_saving(data, tmp_path):
    out = tmp_path / "nan_stop"
    args = argv(data, out, 20, "--save-interval", "2", "--max-consecutive-skipped-iters", "3")
    assert run_distributed(_pretrain_with_nan, 1, args=(args, list(range(5, 21))))[0] == 1
    assert int((out / "latest_checkpointed_iteration.txt").read_text()) == 4  # the last good save stays latest
    assert not list(out.glob("iter_000000[6-9]"))


# ---------------------------------------------------------------------------------- bad configuration


def _refused(argv_list: list[str], monkeypatch=None, world: int = 1) -> str:
    """The ConfigError message of the job's checks, run as every rank runs them: before any
    process group (this process has none)."""
    from megatron_most.data.indexed import DatasetFormatError
    from megatron_most.options import ConfigError
    from megatron_most.training.config import parse
    from megatron_most.training.loop import preflight

    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises((ConfigError, DatasetFormatError)) as err:
        preflight(parse(argv_list))
    assert not torch.distributed.is_initialized()
    return str(err.value)


def test_the_tool_exits_2_naming_the_field(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    args = [*argv(data, tmp_path / "bad", 4), "--tensor-model-paralel-size", "2"]
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean --tensor-model-parallel-size" in proc.stderr, proc.stderr


def test_bad_configurations_are_refused_before_any_process_group(data, tmp_path, monkeypatch):
    base = argv(data, tmp_path / "bad", 4)
    # two ranks asked for by the layout, one process: refused without waiting for the other rank
    assert "world size" in _refused([*base, "--tensor-model-parallel-size", "2"], monkeypatch, world=1)
    missing = [a if a != data[2] else str(tmp_path / "nowhere") for a in base]
    assert "nowhere" in _refused(missing)
    negative = [a if a != "0.2" else "-0.2" for a in base]
    assert "blend weights must be positive" in _refused(negative)
    config_file = tmp_path / "job.yaml"
    config_file.write_text("train_itters: 5\n")
    assert "did you mean --train-iters" in _refused([*base, "--config", str(config_file)])


def test_data_of_another_tokenizer_or_codebook_is_refused(data, tmp_path):
    other = write_tiny_blend(tmp_path / "other", sizes=(20, 20, 20))
    header = Path(other["tts"][0] + ".json")
    values = json.loads(header.read_text())
    values["num_units"] = 64  # packed with another codebook
    header.write_text(json.dumps(values))
    args = argv([data[0], other["tts"][0], data[2]], tmp_path / "bad", 4)
    assert "num_units=64" in _refused(args)


def test_load_of_another_model_shape_is_refused(data, tmp_path):
    out = tmp_path / "small"
    assert train(argv(data, out, 3)) == [0]
    message = _refused([*argv(data, tmp_path / "other", 4, "--load", str(out)), "--mamoe-variant", "no_shared"])
    assert "holds a model of other sizes" in message and "shared experts: 64 -> 0" in message, message


# ---------------------------------------------------------------------------------- logs


@pytest.mark.slow
def test_the_logs_of_an_ep2_run(data, tmp_path):
    """metrics.jsonl of a 4-step EP2 job with stats and validation every 2 steps: counters with
    their known values, per-task and per-modality losses, MAMoE routing that never leaves the
    modality's expert group, the heatmaps on disk, TensorBoard events."""
    out = tmp_path / "run"
    extra = ["--expert-model-parallel-size", "2", "--mamoe-stats-interval", "2", "--eval-interval", "2"]
    extra += ["--tensorboard-dir", str(tmp_path / "tb"), "--log-throughput"]
    assert train(argv(data, out, 4, *extra), 2) == [0, 0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lm loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert [r["consumed samples"] for r in steps] == [4, 8, 12, 16]  # global batch 4
    seen = {key for r in steps for key in r}  # 4 samples a step: not every task is in every step
    assert {"loss/asr", "loss/tts", "loss/text", "loss/text tokens", "loss/unit tokens"} <= seen, sorted(seen)
    for r in steps:
        assert r["throughput per GPU (TFLOP/s/GPU)"] > 0 and r["tokens per second"] > 0
        assert math.isfinite(r["grad norm"]) and r["skipped iterations"] == 0
    routing = [r for r in records if "routing/text tokens outside the group" in r]
    assert [r["iteration"] for r in routing] == [2, 4]
    for r in routing:
        assert r["routing/text tokens outside the group"] == 0 and r["routing/audio tokens outside the group"] == 0
    images = [r for r in records if r.get("image") == "routing"]
    assert [r["iteration"] for r in images] == [2, 4]
    assert all(Path(r["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for r in images)
    valid = [r for r in records if any(k.startswith("valid loss/") for k in r)]
    assert [r["iteration"] for r in valid] == [2, 4]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def _pretrain_without_heatmaps(args: list[str]):
    """Rank body: the job with a heatmap process that fails, as one killed by a signal would."""
    from megatron_most.moe import stats
    from megatron_most.training.config import parse
    from megatron_most.training.loop import pretrain

    stats.heatmap_command = lambda counts, path, title: [sys.executable, "-c", "raise SystemExit('no figure today')"]
    return pretrain(parse(args), log=lambda *a, **k: None)


def test_a_failed_heatmap_is_an_event_not_the_end_of_the_run(data, tmp_path):
    out = tmp_path / "run"
    args = argv(data, out, 4, "--mamoe-stats-interval", "2")
    assert run_distributed(_pretrain_without_heatmaps, 1, args=(args,)) == [0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if "heatmap not drawn" in r.get("event", "")]
    assert [r["iteration"] for r in events] == [2, 4] and "no figure today" in events[0]["event"]
    assert not any(r.get("image") for r in records)
    assert (out / "routing" / "routing_0000002.npz").exists()  # the counts are kept all the same
    assert int((out / "latest_checkpointed_iteration.txt").read_text()) == 4
