"""The pretraining loop's logs: one Megatron-LM-style line per logged step, and the same record
under the same keys in `metrics.jsonl`, TensorBoard and wandb, side by side.

    with Metrics(log_dir=..., tensorboard_dir=..., wandb_project=..., wandb_exp_name=..., config=cfg,
                 is_writer=None) as metrics:                      # None = global rank 0 writes
        metrics.step(iteration, {"lm loss": 2.3, "lr": 3e-4, ...}, train_iters=train_iters)
        metrics.event(iteration, "loss spike: 7.1 > 3 x 2.2")
        metrics.image(iteration, "routing", "heatmap.png")

The loop reduces the values first, so every rank holds them and only the writer rank writes.
Megatron-LM users grep its `training_log` line (megatron/training/training.py, core_v0.16.1): its
fields come first, in its order and number formats; ours (tokens/s, MFU, memory, any other key)
follow. Keys are free-form and stay as given in every sink; a field of the line is found under its
label or a short name, compared lowercased with "_" as " " (`lr` or `learning rate`, `grad_norm`
or `grad norm`; the tables below). Other keys with "loss" in them join the losses, in the order
given; the rest end the line. `mfu` is a fraction (printed in %), memory in GiB.

wandb is optional and must never stop training: any error it raises is printed once and turns it
off for the rest of the run. `metrics.jsonl` is appended to, so a resumed run continues the same
file; steps logged after the checkpoint it resumed from then appear twice (the later one counts).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Callable

import psutil
import torch
from matplotlib import image as mpimg
from torch.utils.tensorboard import SummaryWriter

from megatron_most.platform import has_gpu

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (half their
# "with sparsity" figure): A100, H100 (SXM / PCIe / NVL), H200 (SXM / NVL), GH200, HGX B200,
# A10, A10G (NVIDIA's A10G datasheet for AWS), L4, L40, L40S. torch names the H100 SXM
# "NVIDIA H100 80GB HBM3": a plain "H100" is the SXM part.
PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "A800": 312.0,
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "H200": 989.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A10": 125.0,
    "A10G": 70.0,
    "L4": 121.0,
    "L40": 181.0,
    "L40S": 362.0,
}

# Megatron-LM's fields around the losses: (its label, its format, other names for the key).
_BEFORE_LOSSES = (
    ("consumed samples", "{:12d}", ()),
    ("skipped samples", "{:12d}", ()),
    ("elapsed time per iteration (ms)", "{:.1f}", ("ms per iter",)),
    ("throughput per GPU (TFLOP/s/GPU)", "{:.1f}", ("tflops per gpu",)),
    ("learning rate", "{:.6E}", ("lr",)),
    ("global batch size", "{:5d}", ()),
)
_AFTER_LOSSES = (
    ("loss scale", "{:.1f}", ()),
    ("grad norm", "{:.3f}", ()),
    ("num zeros", "{:d}", ()),
    ("params norm", "{:.3f}", ()),
    ("number of skipped iterations", "{:3d}", ("skipped", "skipped iterations")),
    ("number of nan iterations", "{:3d}", ("nan iterations",)),
)
# Ours, after Megatron's: short labels keep the line readable.
_OURS = (
    ("tokens/s", "{:.0f}", ("tokens per s", "tokens per second")),
    ("MFU", "{:.1%}", ()),
    ("memory (GiB)", "{:.1f}", ("mem gb", "memory gb", "memory (gb)")),
)
_LOSS_FORMAT = "{:.6E}"  # Megatron's, for every loss
_OTHER_FORMAT = "{:.4g}"


def _name(key: str) -> str:
    """How keys are compared with the line's fields: `grad_norm` is `grad norm`, `MFU` is `mfu`."""
    return key.lower().replace("_", " ")


_LABEL_OF = {
    _name(name): label for label, _, names in _BEFORE_LOSSES + _AFTER_LOSSES + _OURS for name in (label, *names)
}


# ------------------------------------------------------------------------------- throughput


def tokens_per_second(tokens: float, seconds: float) -> float | None:
    """None when no time was measured (then nothing derived from it is logged)."""
    return tokens / seconds if seconds > 0 else None


def tflops_per_gpu(flops_per_token: float, tokens_per_second: float | None, num_gpus: int) -> float | None:
    """Megatron's "throughput per GPU": training FLOPs (forward + backward, e.g.
    `model.estimate.Estimate.flops_per_token`) per second over all GPUs of the job, per GPU."""
    if tokens_per_second is None:
        return None
    return flops_per_token * tokens_per_second / num_gpus / 1e12


def mfu(tflops: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of the GPU's dense bf16 peak; None without a peak."""
    return None if tflops is None or not peak_tflops else tflops / peak_tflops


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name (`torch.cuda.get_device_name()`); None for a CPU
    or a GPU not in PEAK_BF16_TFLOPS. The most specific name wins ("H100 PCIe" over "H100"), and
    names match whole words only ("RTX A1000" is not an A100)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", device_name.lower()):
            return PEAK_BF16_TFLOPS[key]
    return None


def device_peak_tflops() -> float | None:
    """peak_tflops of this rank's GPU; None on CPU machines."""
    return peak_tflops(torch.cuda.get_device_name()) if has_gpu() else None


def memory_gb() -> float:
    """Peak GPU memory allocated by this process, in GiB (2**30 bytes, as model/estimate.py
    counts): tensors only, not the allocator's cached reserve. On CPU machines, where there is
    no allocator to ask, the process's resident memory instead."""
    if has_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


# ------------------------------------------------------------------------------- log line


def format_line(iteration: int, train_iters: int, values: dict, now: datetime.datetime | None = None) -> str:
    """Megatron-LM's `training_log` line for `values`, then ours."""
    now, values = now or datetime.datetime.now(), _clean(values)
    line = f" [{now.strftime('%Y-%m-%d %H:%M:%S.%f')}] iteration {iteration:8d}/{train_iters:8d} |"
    placed = {_LABEL_OF[_name(key)]: value for key, value in values.items() if _name(key) in _LABEL_OF}
    rest = [(key, value) for key, value in values.items() if _name(key) not in _LABEL_OF]
    fields = (
        *[(label, fmt, placed[label]) for label, fmt, _ in _BEFORE_LOSSES if label in placed],
        *[(key, _LOSS_FORMAT, value) for key, value in rest if "loss" in _name(key)],
        *[(label, fmt, placed[label]) for label, fmt, _ in _AFTER_LOSSES + _OURS if label in placed],
        *[(key, _OTHER_FORMAT, value) for key, value in rest if "loss" not in _name(key)],
    )
    return line + "".join(f" {label}: {_number(fmt, value)} |" for label, fmt, value in fields)


def _number(fmt: str, value: float) -> str:
    if fmt.endswith("d}"):  # Megatron's counters: print as integers, nan as nan
        return fmt.format(int(value)) if math.isfinite(value) else str(value)
    return fmt.format(value)


def _clean(values: dict) -> dict[str, float | int]:
    """None dropped (not measured), tensors and numpy scalars made Python numbers, bools 0/1."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        value = value.item() if hasattr(value, "item") else value
        out[str(key)] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def _json_safe(value: float | int) -> float | int | None:
    """Non-finite numbers as null: a NaN literal makes the line unreadable for strict JSON readers."""
    return value if math.isfinite(value) else None


def _is_global_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ------------------------------------------------------------------------------- writer


class Metrics:
    """All of a run's logs. Create it on every rank; only the writer rank (`is_writer`, None =
    global rank 0) prints or writes anything, the others accept every call and do nothing."""

    def __init__(
        self,
        *,
        log_dir: str | None,
        tensorboard_dir: str | None,
        wandb_project: str | None,
        wandb_exp_name: str | None,
        config: dict,
        is_writer: bool | None = None,
        log: Callable[[str], None] = functools.partial(print, flush=True),
    ):
        self.is_writer = _is_global_rank0() if is_writer is None else is_writer
        self.log = log
        self._file = self._tb = self._run = self._wandb_module = None
        if not self.is_writer:
            return
        config = json.loads(json.dumps(config, default=str))  # paths, tuples, enums: plain JSON
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        if tensorboard_dir is not None:
            self._tb = SummaryWriter(log_dir=tensorboard_dir, flush_secs=30)
            text = json.dumps(config, indent=2, sort_keys=True)
            self._tb.add_text("config", "\n".join("    " + row for row in text.splitlines()), 0)  # a code block
        if wandb_project is not None:
            self._start_wandb(wandb_project, wandb_exp_name, log_dir, config)

    def step(self, iteration: int, values: dict, *, train_iters: int) -> None:
        """Log one step: the record to every sink under the loop's own keys, and the line."""
        if not self.is_writer:
            return
        values = _clean(values)
        self._record({"iteration": iteration, **{key: _json_safe(value) for key, value in values.items()}})
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, iteration)
        self._wandb("log", lambda run: run.log(values, step=iteration))
        self.log(format_line(iteration, train_iters, values))

    def event(self, iteration: int, message: str) -> None:
        """Something that happened at a step (a loss spike, a skipped update): printed, and kept
        in metrics.jsonl and TensorBoard's text tab."""
        if not self.is_writer:
            return
        self._record({"iteration": iteration, "event": message})
        if self._tb is not None:
            self._tb.add_text("events", message, iteration)
        self.text(f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S.%f}] iteration {iteration}: {message}")

    def text(self, message: str) -> None:
        """A free line on the writer rank's log, recorded nowhere else."""
        if self.is_writer:
            self.log(message)

    def image(self, iteration: int, name: str, path: str | os.PathLike) -> None:
        """A PNG already on disk (e.g. `moe.stats.heatmap`) to TensorBoard and wandb; its path
        to metrics.jsonl."""
        if not self.is_writer:
            return
        self._record({"iteration": iteration, "image": name, "path": str(path)})
        if self._tb is not None:
            pixels = mpimg.imread(path)
            self._tb.add_image(name, pixels, iteration, dataformats="HWC" if pixels.ndim == 3 else "HW")
        self._wandb("image", lambda run: run.log({name: self._wandb_module.Image(str(path))}, step=iteration))

    def close(self) -> None:
        """Flush and close every sink; safe to call again."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._wandb("finish", self._finish_wandb)
        self._run = None

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- sinks

    def _record(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def _start_wandb(self, project: str, name: str | None, log_dir: str | None, config: dict) -> None:
        try:
            import wandb  # optional and slow to import: only when asked for
        except ImportError:
            self.log("metrics: wandb is not installed (pip install wandb): logging without it")
            return
        # WANDB_MODE, when set, is wandb's to read; otherwise a run without an API key stays
        # offline (`wandb sync` uploads it later) instead of waiting on a login.
        mode = None if os.environ.get("WANDB_MODE") else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        try:
            self._run = wandb.init(
                project=project, name=name, dir=os.environ.get("WANDB_DIR") or log_dir, config=config, mode=mode
            )
            self._wandb_module = wandb
        except Exception as e:  # whatever wandb raises, training goes on
            self.log(f"metrics: wandb init failed ({type(e).__name__}: {e}); logging without wandb")

    def _finish_wandb(self, run) -> None:
        """finish() can return before wandb's service process has written the run to disk (seen
        offline on a busy machine); teardown() waits for that process (the run is this one's only)."""
        run.finish()
        self._wandb_module.teardown()

    def _wandb(self, what: str, call: Callable) -> None:
        """Run `call(run)`; on any error say so once and drop wandb for the rest of the run."""
        if self._run is None:
            return
        try:
            call(self._run)
        except Exception as e:  # whatever wandb raises, training goes on
            self.log(f"metrics: wandb {what} failed ({type(e).__name__}: {e}); wandb is off for the rest of this run")
            self._run = None
