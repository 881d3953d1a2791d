"""Time per iteration of the full pretraining loop over the bare step, tiny preset, one CPU rank.

The full loop (`training.loop.train`) reads its micro-batches from the packed blended datasets,
logs every --log-interval steps (line, metrics.jsonl), collects MAMoE routing statistics and
renders the heatmap every --mamoe-stats-interval steps and validates every --eval-interval
steps, at the tiny CPU example's intervals. The bare step runs the same model, optimizer and
schedule on the same batches, fetched beforehand: zero grads, forward-backward, optimizer
step. Rounds alternate (loop, bare, loop, ...) and the medians are compared, because this
machine is noisy. Also prints tokens/s of the full loop at 1 and 2 ranks.

    python -m benchmarks.train_loop [--rounds 4] [--steps 20]

The last line is `train loop/bare step time ratio: X`; the target is <= 1.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_most.platform.spawn import run_ranks
from megatron_most.training import batches
from megatron_most.training.config import parse
from megatron_most.training.engine import optimizer_step, run_schedule, zero_grads
from megatron_most.training.loop import Run, forward_step, preflight, train
from tests.packed_data import write_tiny_blend

SEQ, MICRO, GLOBAL = 128, 4, 8


def job(data: list[str], steps: int, log_dir: str, extra=()) -> list[str]:
    """The tiny CPU example's settings (examples/tiny_cpu/stage1.yaml) on synthetic packed data."""
    return [
        "--preset", "tiny", "--seq-length", str(SEQ), "--micro-batch-size", str(MICRO),
        "--global-batch-size", str(GLOBAL), "--train-iters", str(steps), "--lr", "3e-3",
        "--data-path", "0.4", data[0], "0.4", data[1], "0.2", data[2], "--split", "90,10,0",
        "--num-workers", "0", "--log-interval", "10", "--mamoe-stats-interval", "50", "--eval-interval", "50",
        "--eval-iters", "2", "--log-dir", log_dir, "--use-distributed-optimizer", *extra,
    ]  # fmt: skip


def bare_steps(run: Run, micro_batches: list[list[dict]]) -> float:
    """Seconds for the bare steps over prefetched micro-batches (one list per step)."""
    step = lambda it, model: forward_step(run.tasks, run.most, it, model)  # noqa: E731
    start = time.perf_counter()
    for micro in micro_batches:
        zero_grads(run.ddps, run.optimizer)
        report = run_schedule(
            run.ddps, step, [iter(micro) for _ in run.ddps], num_microbatches=len(micro),
            seq_length=SEQ, micro_batch_size=MICRO, report_keys=run.keys,
        )  # fmt: skip
        optimizer_step(run.optimizer, math.isfinite(report["loss"]))
    return time.perf_counter() - start


def loop_steps(run: Run, steps: int) -> float:
    """Seconds for `steps` more iterations of the full loop."""
    run.cfg = dataclasses.replace(run.cfg, train_iters=run.counters.iteration + steps)
    run.monitor.cfg = run.cfg
    start = time.perf_counter()
    train(run)
    return time.perf_counter() - start


def compare(data: list[str], rounds: int, steps: int, log_dir: str) -> tuple[float, float]:
    """(median loop seconds per step, median bare seconds per step), in this process."""
    cfg = parse(job(data, 10 * rounds * steps, log_dir))
    run = Run(cfg, preflight(cfg), log=lambda *a, **k: None)
    n = GLOBAL // MICRO
    prefetched = batches.loader(run.train_data, cfg, dp_rank=0, dp_size=1, workers=0)
    micro = [[next(prefetched) for _ in range(n)] for _ in range(steps)]
    loop_steps(run, 2)  # warm-up of both paths
    bare_steps(run, micro[:2])
    loop_times, bare_times = [], []
    for _ in range(rounds):
        loop_times.append(loop_steps(run, steps) / steps)
        bare_times.append(bare_steps(run, micro) / steps)
    run.close()
    return statistics.median(loop_times), statistics.median(bare_times)


def _tokens_per_second(data: list[str], steps: int, log_dir: str) -> float:
    """Rank body: tokens/s of the whole job (all ranks), after two warm-up steps."""
    cfg = parse(job(data, steps + 2, log_dir, ["--expert-model-parallel-size", os.environ["WORLD_SIZE"]]))
    run = Run(cfg, preflight(cfg), log=lambda *a, **k: None)
    loop_steps(run, 2)
    seconds = loop_steps(run, steps)
    run.close()
    return steps * GLOBAL * SEQ / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurement rounds")
    parser.add_argument("--steps", type=int, default=20, help="steps per round and path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        blend = write_tiny_blend(Path(tmp) / "data", sizes=(600, 600, 900))
        data = [blend[name][0] for name in ("asr", "tts", "text")]
        for world in (1, 2):
            tps = run_ranks(_tokens_per_second, world, args=(data, args.steps, f"{tmp}/tps{world}"), timeout_s=1800)
            print(f"full loop at {world} rank(s), EP{world}: {tps[0]:.0f} tokens/s")
        loop, bare = compare(data, args.rounds, args.steps, f"{tmp}/ratio")
    print(f"tiny preset, seq {SEQ}, global batch {GLOBAL} ({GLOBAL // MICRO} micro-batches of {MICRO}), 1 CPU thread")
    print(f"full loop {loop * 1e3:.1f} ms/step, bare step {bare * 1e3:.1f} ms/step (medians of {args.rounds} rounds)")
    print(f"train loop/bare step time ratio: {loop / bare:.3f}")


if __name__ == "__main__":
    main()
