"""The pretraining loop's logs (training/metrics.py): metrics.jsonl records appended across a
resume, Megatron-LM's log line field by field, TensorBoard scalars/text/images read back, wandb
offline files (when wandb is installed) and a failing wandb that training outlives, silent
non-writer ranks, and the throughput helpers against answers worked out by hand."""

from __future__ import annotations

import datetime
import json
import re
import sys
import types

import numpy as np
import psutil
import pytest
import torch
from matplotlib import pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_most.training import metrics as M

VALUES = {  # what the loop passes at a logged step, in its order
    "consumed_samples": 256000,
    "ms_per_iter": 812.34,
    "tflops_per_gpu": 123.44,
    "lr": 2.999e-4,
    "global_batch_size": 512,
    "lm loss": 2.345678,
    "loss/asr": 1.5,
    "loss/text tokens": 3.25,
    "load_balancing_loss": 1.0125,
    "z_loss": None,  # not measured this run: left out everywhere
    "loss_scale": 1.0,
    "grad_norm": 0.8123,
    "skipped": False,
    "nan_iterations": 0,
    "tokens_per_s": 2581745.6,
    "mfu": 0.1248,
    "mem_gb": 45.23,
    "router_entropy": torch.tensor(0.693147),
}
LOGGED = {key for key, value in VALUES.items() if value is not None}
SPELLED_AS_MEGATRON = {  # the same step under the line's own labels (Megatron's and ours)
    "consumed samples": 256000,
    "elapsed time per iteration (ms)": 812.34,
    "throughput per GPU (TFLOP/s/GPU)": 123.44,
    "learning rate": 2.999e-4,
    "lm loss": 2.345678,
    "global batch size": 512,  # out of Megatron's order: the line puts it back
    "loss/asr": 1.5,
    "loss/text tokens": 3.25,
    "load balancing loss": 1.0125,
    "grad norm": 0.8123,
    "loss scale": 1.0,
    "skipped iterations": 0,
    "nan iterations": 0,
    "tokens per second": 2581745.6,
    "MFU": 0.1248,
    "memory (GB)": 45.23,
    "router entropy": 0.693147,
}


def make(tmp_path, log=None, **kwargs):
    options = dict(
        log_dir=str(tmp_path / "logs"),
        tensorboard_dir=str(tmp_path / "tb"),
        wandb_project=None,
        wandb_exp_name=None,
        config={"train_iters": 10000, "save": tmp_path, "layout": (2, 1)},
        is_writer=True,
        log=(log if log is not None else (lambda line: None)),
    )
    return M.Metrics(**{**options, **kwargs})


def read_jsonl(tmp_path):
    return [json.loads(row) for row in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]


def read_tensorboard(tmp_path):
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def write_png(path, height=6, width=10):
    plt.imsave(path, np.linspace(0, 1, height * width).reshape(height, width))
    return path


# ------------------------------------------------------------------------------- jsonl


def test_jsonl_records_and_resume_appends(tmp_path):
    with make(tmp_path) as metrics:
        metrics.step(10, VALUES, train_iters=100)
        metrics.step(20, {"lm loss": float("nan"), "skipped": True}, train_iters=100)
    with make(tmp_path) as metrics:  # the resumed run: same log_dir
        metrics.event(20, "resumed from iteration 20")
        metrics.step(30, {"lm loss": 2.0}, train_iters=100)
    first, nan_step, event, resumed = read_jsonl(tmp_path)
    assert set(first) == {"iteration"} | LOGGED
    assert first["iteration"] == 10 and first["lm loss"] == 2.345678 and first["loss/text tokens"] == 3.25
    assert first["consumed_samples"] == 256000 and isinstance(first["consumed_samples"], int)
    assert first["skipped"] == 0 and first["router_entropy"] == pytest.approx(0.693147)
    assert nan_step == {"iteration": 20, "lm loss": None, "skipped": 1}  # strict JSON: NaN as null
    assert event == {"iteration": 20, "event": "resumed from iteration 20"}
    assert resumed == {"iteration": 30, "lm loss": 2.0}


# ------------------------------------------------------------------------------- the line


@pytest.mark.parametrize("values", [VALUES, SPELLED_AS_MEGATRON], ids=["short keys", "megatron labels"])
def test_line_is_megatrons_then_ours(values):
    now = datetime.datetime(2026, 11, 27, 21, 0, 0, 123456)
    line = M.format_line(500, 10000, values, now=now)
    loss, entropy = (
        ("load_balancing_loss", "router_entropy") if values is VALUES else ("load balancing loss", "router entropy")
    )
    expected = (
        " [2026-11-27 21:00:00.123456] iteration      500/   10000 | consumed samples:       256000 |"
        " elapsed time per iteration (ms): 812.3 | throughput per GPU (TFLOP/s/GPU): 123.4 |"
        " learning rate: 2.999000E-04 | global batch size:   512 | lm loss: 2.345678E+00 |"
        f" loss/asr: 1.500000E+00 | loss/text tokens: 3.250000E+00 | {loss}: 1.012500E+00 |"
        " loss scale: 1.0 | grad norm: 0.812 | number of skipped iterations:   0 |"
        " number of nan iterations:   0 | tokens/s: 2581746 | MFU: 12.5% | memory (GiB): 45.2 |"
        f" {entropy}: 0.6931 |"
    )
    assert line == expected


def test_line_parses_with_megatron_log_regexes(tmp_path):
    """What scripts written for Megatron-LM's log read from it, on the line Metrics.step prints."""
    printed = []
    with make(tmp_path, log=printed.append) as metrics:
        metrics.step(500, VALUES, train_iters=10000)
        metrics.step(510, {"lm loss": 2.0, "skipped": 3}, train_iters=10000)
    assert len(printed) == 2
    first, second = printed
    assert re.match(r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration +500/ +10000 \|", first)
    megatron = {
        "consumed samples": r" +(\d+)",
        "elapsed time per iteration \(ms\)": r" ([\d.]+)",
        "throughput per GPU \(TFLOP/s/GPU\)": r" ([\d.]+)",
        "learning rate": r" ([\d.E+-]+)",
        "global batch size": r" +(\d+)",
        "lm loss": r" ([\d.E+-]+)",
        "loss scale": r" ([\d.]+)",
        "grad norm": r" ([\d.]+)",
        "number of skipped iterations": r" +(\d+)",
        "number of nan iterations": r" +(\d+)",
    }
    found = [re.search(rf"\| {label}:{number} \|", first) for label, number in megatron.items()]
    assert all(found), [label for label, match in zip(megatron, found) if not match]
    assert [m.start() for m in found] == sorted(m.start() for m in found)  # Megatron's order
    numbers = [float(m.group(1)) for m in found]
    assert numbers == [256000, 812.3, 123.4, 2.999e-4, 512, 2.345678, 1.0, 0.812, 0, 0]
    assert re.search(r"\| number of skipped iterations: +3 \|", second)
    assert "consumed samples" not in second  # only what was passed


# ------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_config_and_image(tmp_path):
    png = write_png(tmp_path / "routing.png")
    with make(tmp_path) as metrics:
        metrics.step(10, VALUES, train_iters=100)
        metrics.step(20, {**VALUES, "lm loss": 2.0}, train_iters=100)
        metrics.event(20, "loss spike")
        metrics.image(20, "routing/layer heatmap", png)
    events = read_tensorboard(tmp_path)
    assert set(events.Tags()["scalars"]) == LOGGED  # the jsonl's keys, no others
    assert [(e.step, e.value) for e in events.Scalars("lm loss")] == [(10, pytest.approx(2.345678)), (20, 2.0)]
    assert events.Scalars("consumed_samples")[0].value == 256000
    assert events.Scalars("loss/asr")[1].value == 1.5
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"train_iters": 10000' in config and str(tmp_path) in config
    assert events.Tensors("events/text_summary")[0].tensor_proto.string_val[0].decode() == "loss spike"
    (image,) = events.Images("routing/layer heatmap")
    assert (image.step, image.height, image.width) == (20, 6, 10)
    assert read_jsonl(tmp_path)[-1] == {"iteration": 20, "image": "routing/layer heatmap", "path": str(png)}


# ------------------------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self, fail_on=()):
        self.fail_on, self.logged, self.finished = fail_on, [], 0

    def log(self, data, step):
        if "log" in self.fail_on:
            raise RuntimeError("disk full")
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1


def fake_wandb(monkeypatch, run=None, init_error=None):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if init_error:
            raise init_error
        return run

    module = types.SimpleNamespace(
        init=init, Image=lambda path: ("image", path), teardown=lambda: calls.append("teardown")
    )
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_the_same_keys_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = FakeRun()
    calls = fake_wandb(monkeypatch, run)
    png = write_png(tmp_path / "h.png")
    with make(tmp_path, wandb_project="most", wandb_exp_name="stage1") as metrics:
        metrics.step(10, VALUES, train_iters=100)
        metrics.image(10, "routing", png)
    init, teardown = calls
    assert teardown == "teardown"  # after finish: the offline run is on disk
    assert (init["project"], init["name"], init["mode"]) == ("most", "stage1", "offline")
    assert init["dir"] == str(tmp_path / "logs")
    assert init["config"]["save"] == str(tmp_path) and init["config"]["layout"] == [2, 1]
    (step, record), image = run.logged
    assert step == 10 and set(record) == LOGGED == set(read_jsonl(tmp_path)[0]) - {"iteration"}
    assert record["lm loss"] == 2.345678 and record["skipped"] == 0
    assert image == (10, {"routing": ("image", str(png))})
    assert run.finished == 1


@pytest.mark.parametrize(
    ("env", "mode"), [({"WANDB_API_KEY": "k"}, "online"), ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, None)]
)
def test_wandb_mode_follows_the_key_and_wandbs_own_setting(tmp_path, monkeypatch, env, mode):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = fake_wandb(monkeypatch, FakeRun())
    make(tmp_path, wandb_project="most").close()
    assert calls[0]["mode"] == mode  # None: wandb reads WANDB_MODE itself


def test_a_failing_wandb_does_not_stop_training(tmp_path, monkeypatch):
    printed = []
    run = FakeRun(fail_on=("log",))
    fake_wandb(monkeypatch, run)
    with make(tmp_path, log=printed.append, wandb_project="most") as metrics:
        for iteration in (1, 2, 3):
            metrics.step(iteration, {"lm loss": 1.0 / iteration}, train_iters=3)
        metrics.image(3, "routing", write_png(tmp_path / "h.png"))
    warnings = [line for line in printed if "wandb" in line]
    assert len(warnings) == 1 and "wandb log failed (RuntimeError: disk full)" in warnings[0]
    assert sum("iteration" in line for line in printed) == 3
    assert [r["iteration"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 3]
    assert [e.step for e in read_tensorboard(tmp_path).Scalars("lm loss")] == [1, 2, 3]
    assert run.finished == 0  # dropped at the failure, not touched again


@pytest.mark.parametrize("broken", ["init", "missing"])
def test_wandb_that_cannot_start_is_reported_once(tmp_path, monkeypatch, broken):
    printed = []
    if broken == "init":
        fake_wandb(monkeypatch, init_error=ConnectionError("no network"))
    else:
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with make(tmp_path, log=printed.append, wandb_project="most") as metrics:
        metrics.step(1, {"lm loss": 1.0}, train_iters=2)
        metrics.step(2, {"lm loss": 0.5}, train_iters=2)
    warnings = [line for line in printed if "wandb" in line]
    reason = "ConnectionError: no network" if broken == "init" else "wandb is not installed"
    assert len(warnings) == 1 and reason in warnings[0]
    assert len(read_jsonl(tmp_path)) == 2


def test_wandb_offline_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb): its offline run is not checked")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    printed = []
    with make(tmp_path, log=printed.append, wandb_project="most", wandb_exp_name="stage1") as metrics:
        metrics.step(10, {"lm loss": 2.5, "loss/asr": 1.25}, train_iters=100)
        metrics.image(10, "routing", write_png(tmp_path / "h.png"))
    assert not [line for line in printed if "wandb" in line], printed
    (run_file,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()  # wandb's record log: the keys and the config are in it verbatim
    assert b"lm loss" in data and b"loss/asr" in data and b"routing" in data and b"train_iters" in data


# ------------------------------------------------------------------------------- ranks, close


def test_non_writer_ranks_write_nothing(tmp_path, monkeypatch):
    printed = []
    calls = fake_wandb(monkeypatch, FakeRun())
    with make(tmp_path, log=printed.append, is_writer=False, wandb_project="most") as metrics:
        metrics.step(1, VALUES, train_iters=2)
        metrics.event(1, "spike")
        metrics.text("hello")
        metrics.image(1, "routing", tmp_path / "never_read.png")
    assert printed == [] and calls == [] and list(tmp_path.iterdir()) == []


def test_writer_defaults_to_global_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert not make(tmp_path, is_writer=None).is_writer
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    with make(tmp_path, is_writer=None) as metrics:
        assert metrics.is_writer


def test_close_is_idempotent_and_only_for_given_sinks(tmp_path):
    printed = []
    metrics = M.Metrics(
        log_dir=None, tensorboard_dir=None, wandb_project=None, wandb_exp_name=None, config={}, log=printed.append
    )
    metrics.step(1, {"lm loss": 1.0}, train_iters=1)
    metrics.close()
    metrics.close()
    assert len(printed) == 1 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- throughput


def test_throughput_helpers_by_hand():
    assert M.tokens_per_second(512 * 4096, 0.5) == 4194304.0
    assert M.tokens_per_second(100, 0) is None
    # 6e9 FLOPs/token * 250k tokens/s = 1.5e15 FLOP/s over 8 GPUs = 187.5 TFLOP/s/GPU
    assert M.tflops_per_gpu(6e9, 250_000, 8) == pytest.approx(187.5)
    assert M.tflops_per_gpu(6e9, None, 8) is None
    assert M.mfu(187.5, 750.0) == pytest.approx(0.25)
    assert M.mfu(187.5, None) is None
    # Megatron's formula on the same step: FLOPs of the batch / (s/iter * 1e12 * world size)
    flops_per_token, tokens, seconds, gpus = 3.3e9, 512 * 4096, 0.8123, 16
    megatron = flops_per_token * tokens / (seconds * 1e12 * gpus)
    assert M.tflops_per_gpu(flops_per_token, M.tokens_per_second(tokens, seconds), gpus) == pytest.approx(megatron)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA A10G", 70),
        ("NVIDIA A10", 125),
        ("NVIDIA L4", 121),
        ("NVIDIA L40S", 362),
        ("NVIDIA RTX A1000", None),
        ("ACME XA100", None),  # made up: whole words only, on both sides
        ("cpu", None),
    ],
)
def test_peak_tflops(name, peak):
    assert M.peak_tflops(name) == peak


def test_memory_gb(monkeypatch):
    monkeypatch.setattr(M, "has_gpu", lambda: False)
    rss = psutil.Process().memory_info().rss / 2**30
    assert M.memory_gb() == pytest.approx(rss, rel=0.2) and M.memory_gb() > 0.01
    monkeypatch.setattr(M, "has_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30 + 2**29)
    assert M.memory_gb() == 3.5
