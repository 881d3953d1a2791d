"""What the loop reports, between its steps and `metrics.Metrics`: values averaged over each
--log-interval (losses per task and per target modality, balance and z-loss, throughput,
memory), loss spikes, MAMoE routing statistics with the heatmap every --mamoe-stats-interval,
and validation. Every collective here is run by every rank at the same step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe import moe_utils

from megatron_most.model.config import write_config
from megatron_most.moe import NAMES, stats
from megatron_most.platform import device
from megatron_most.platform.spawn import single_process_env
from megatron_most.training import metrics
from megatron_most.training.batches import MODALITY_KEYS

SPIKE_WARMUP = 10
"""Steps before loss spikes are judged (the running mean needs a few values)."""


def per_task(totals: dict[str, float], tasks: list[str], prefix: str = "") -> dict[str, float]:
    """Mean losses from summed reports: per task and per target modality (text, unit tokens)."""
    out = {}
    for task in dict.fromkeys(tasks):
        tokens = totals.get(f"tokens/{task}", 0.0)
        if tokens:
            out[f"{prefix}loss/{task}"] = totals[f"loss sum/{task}"] / tokens
    for kind in ("text", "unit"):
        tokens = totals.get(f"{kind} tokens", 0.0)
        if tokens:
            out[f"{prefix}loss/{kind} tokens"] = totals[f"{kind} loss sum"] / tokens
    return out


def flops_per_token(most, seq_len: int) -> int:
    """Counted once by rank 0 in a child process (counting builds the whole model, which this
    process's parallel groups forbid; the CPU suffices: it is built on the meta device) and
    broadcast."""
    box = [None]
    if torch.distributed.get_rank() == 0:
        with tempfile.TemporaryDirectory(prefix="most_flops_") as tmp:
            write_config(tmp, most)
            cmd = [sys.executable, "-m", "megatron_most.model.estimate", tmp, str(seq_len)]
            env = single_process_env(CUDA_VISIBLE_DEVICES="")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True).stdout
        box[0] = json.loads(out.strip().splitlines()[-1])["flops_per_token"]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class Monitor:
    def __init__(self, cfg, most, run, log=print):
        self.cfg, self.most, self.run, self.log = cfg, most, run, log
        self.sums: dict[str, float] = {}
        self.steps, self.updated, self.seconds, self.tokens = 0, 0, 0.0, 0
        self.mean_loss = None
        self.world = torch.distributed.get_world_size()
        self.flops = flops_per_token(most, most.seq_length) if cfg.log_throughput else None
        self.peak = metrics.device_peak_tflops()
        self.reported = (run.counters.skipped_iterations, run.counters.nan_iterations)
        self.aux_names = _aux_loss_names(most)
        # Heatmaps render in a process of their own (matplotlib would hold this interpreter for
        # about 0.3 s each); a finished one goes to the sinks at a later step.
        self._rendering: list[tuple[int, Path, subprocess.Popen, typing.IO]] = []

    # ------------------------------------------------------------------ every step
    def step(self, result: dict, seconds: float) -> None:
        c = self.run.counters
        self.publish(wait=False)
        if result["updated"]:  # skipped steps are left out of the averages, as in Megatron-LM
            for key in ("lm_loss", "grad_norm", *MODALITY_KEYS, *self.run.keys):
                self.sums[key] = self.sums.get(key, 0.0) + result[key]
            self.updated += 1
        self.steps += 1
        self.seconds += seconds
        self.tokens += result["global_batch"] * self.most.seq_length
        self._spike(c.iteration, result["lm_loss"])
        if not result["updated"]:
            self.run.metrics.event(
                c.iteration, f"skipped the update: loss {result['lm_loss']}, grad norm {result['grad_norm']}"
            )
        if c.iteration % self.cfg.log_interval == 0:
            self._log(c.iteration, result)
        if self.cfg.mamoe_stats_interval and c.iteration % self.cfg.mamoe_stats_interval == 0:
            self.routing(c.iteration)

    def _spike(self, iteration: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if (
            self.mean_loss is not None
            and iteration > SPIKE_WARMUP
            and loss > self.cfg.loss_spike_factor * self.mean_loss
        ):
            self.run.metrics.event(
                iteration,
                f"loss spike: {loss:.4f} > {self.cfg.loss_spike_factor} x running mean {self.mean_loss:.4f}",
            )
        self.mean_loss = loss if self.mean_loss is None else 0.9 * self.mean_loss + 0.1 * loss

    def _log(self, iteration: int, result: dict) -> None:
        run, c, n = self.run, self.run.counters, max(1, self.steps)
        updated = self.updated or math.nan
        values = {
            "lm loss": self.sums.get("lm_loss", math.nan) / updated,
            "learning rate": run.optimizer.param_groups[0]["lr"],
            "global batch size": result["global_batch"],
            "grad norm": self.sums.get("grad_norm", math.nan) / updated,
            "consumed samples": c.consumed_train_samples,
            "skipped iterations": c.skipped_iterations - self.reported[0],  # since the last line, as Megatron
            "nan iterations": c.nan_iterations - self.reported[1],
            "elapsed time per iteration (ms)": 1e3 * self.seconds / n,
            "tokens per second": self.tokens / max(self.seconds, 1e-9),
            "memory (GiB)": metrics.memory_gb(),
            **per_task(self.sums, run.tasks),
            **self._aux_losses(n),  # the router logs every step's, skipped or not
        }
        if self.flops is not None:
            tflops = metrics.tflops_per_gpu(self.flops, values["tokens per second"], self.world)
            values["throughput per GPU (TFLOP/s/GPU)"] = tflops
            if self.peak:
                values["MFU"] = metrics.mfu(tflops, self.peak)
        run.metrics.step(iteration, values, train_iters=self.cfg.train_iters)
        self.sums, self.steps, self.updated, self.seconds, self.tokens = {}, 0, 0, 0.0, 0
        self.reported = (c.skipped_iterations, c.nan_iterations)

    def _aux_losses(self, steps: int) -> dict[str, float]:
        """Balance and z-losses (unscaled), averaged over MoE layers, micro-batches and steps:
        summed over every rank's share (SP shares add up; each stage holds its layers), divided
        by the data-parallel replicas."""
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        layers = self.most.num_layers - self.most.first_k_dense
        out = {}
        for name in self.aux_names:
            entry = tracker.setdefault(name, {"values": torch.zeros(self.most.num_layers, device=device())})
            values = entry["values"].to(device()).clone()
            torch.distributed.all_reduce(values)
            per_step = self.run.dp * steps * max(1, get_num_microbatches())
            out[name.replace("_", " ")] = values.sum().item() / (per_step * max(1, layers))
            entry["values"].zero_()
        return out

    # ------------------------------------------------------------------ intervals
    def routing(self, iteration: int) -> None:
        """Per-layer, per-modality expert load over the interval, and the heatmap."""
        gathered = stats.collect(torch.nn.ModuleList(self.run.chunks))
        tokens = gathered["tokens"]  # [layers, modality, experts]
        if not len(gathered["layers"]):
            return
        groups = self.most.mamoe.groups()
        values = {}
        for m, name in enumerate(NAMES):
            own = tokens[:, m, list(groups[m])]  # [layers, own experts]
            other = tokens[:, m, list(groups[1 - m])]
            values[f"routing/{name} max/mean load"] = (own.max(-1).values / own.mean(-1).clamp(min=1e-9)).max().item()
            values[f"routing/{name} experts without tokens"] = int((own == 0).sum().item())
            values[f"routing/{name} tokens outside the group"] = int(other.sum().item())
        self.run.metrics.step(iteration, values, train_iters=self.cfg.train_iters)
        directory = self.cfg.log_dir or self.cfg.save
        if self.run.rank == 0 and directory:
            path = Path(directory) / "routing" / f"routing_{iteration:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.publish(wait=True)  # one at a time
            counts = stats.save_counts(gathered, path.with_suffix(".npz"))
            title = f"MAMoE routing, iteration {iteration}"
            output = tempfile.TemporaryFile()
            proc = subprocess.Popen(stats.heatmap_command(counts, path, title), stdout=output, stderr=output)
            self._rendering.append((iteration, path, proc, output))

    def publish(self, wait: bool) -> None:
        """Hand finished heatmaps to the sinks (all of them with `wait`). A heatmap that failed
        (or whose process was killed: SIGTERM reaches a whole SLURM step) is an event, never
        the end of the run."""
        while self._rendering and (wait or self._rendering[0][2].poll() is not None):
            iteration, path, proc, output = self._rendering.pop(0)
            if proc.wait() == 0:
                self.run.metrics.image(iteration, "routing", str(path))
            else:
                output.seek(0)
                tail = output.read().decode(errors="replace").strip().splitlines()[-1:]
                self.run.metrics.event(iteration, f"routing heatmap not drawn (exit {proc.returncode}): {tail}")
            output.close()

    def close(self) -> None:
        """Wait for the last heatmap and publish it."""
        self.publish(wait=True)

    def validation(self, values: dict[str, float]) -> None:
        self.run.metrics.step(self.run.counters.iteration, values, train_iters=self.cfg.train_iters)


def _aux_loss_names(most) -> list[str]:
    mamoe = most.mamoe
    names = []
    if mamoe.balance_coeff > 0:
        names += ["load_balancing_loss"] if mamoe.balance_loss == "global" else [
            "text_load_balancing_loss",
            "audio_load_balancing_loss",
        ]  # fmt: skip
    if mamoe.z_loss_coeff:
        names.append("z_loss")
    return names
