"""Time per iteration of the full pretraining loop over the bare step, tiny preset, one CPU rank.

The full loop (`training.loop.train`) reads its micro-batches from the packed blended datasets,
logs every --log-interval steps (line, metrics.jsonl), collects MAMoE routing statistics and
renders the heatmap every --mamoe-stats-interval steps, at the tiny CPU example's intervals.
Validation is timed on its own and left out of the ratio, as Megatron-LM leaves it out of its
iteration time (the loop's own ms/iter does the same). The bare step runs the same model, optimizer and
schedule on the same batches, fetched beforehand: zero grads, forward-backward, optimizer
step. A round is one stats interval of each path, alternating every 5 steps
(loop, bare, loop, ...) so that this noisy machine's drifts fall on both; the loop's interval
events fall mid-round (its heatmap, drawn in a process of its own, is done long before the
round ends, where it is collected). The median of the rounds' ratios is reported. Also prints
tokens/s of the full loop at 1 and 2 ranks.

    python -m benchmarks.train_loop [--rounds 5]

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
INTERVAL = 50  # the tiny CPU example's stats and validation interval
TPS_STEPS = 20
CHUNK = 5


def job(data: list[str], steps: int, log_dir: str, extra=()) -> list[str]:
    """The tiny CPU example's settings (examples/tiny_cpu/stage1.yaml) on synthetic packed data."""
    return [
        "--preset", "tiny", "--seq-length", str(SEQ), "--micro-batch-size", str(MICRO),
        "--global-batch-size", str(GLOBAL), "--train-iters", str(steps), "--lr", "3e-3",
        "--data-path", "0.4", data[0], "0.4", data[1], "0.2", data[2], "--split", "90,10,0",
        "--num-workers", "0", "--log-interval", "10", "--mamoe-stats-interval", str(INTERVAL),
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


def round_times(run: Run, micro: list[list[dict]]) -> tuple[float, float]:
    """(loop, bare) seconds per step over one interval, the paths alternating every CHUNK steps."""
    loop = bare = 0.0
    for i in range(0, INTERVAL, CHUNK):
        loop += loop_steps(run, CHUNK)
        bare += bare_steps(run, micro[i : i + CHUNK])
    run.monitor.publish(wait=True)  # the round's heatmap (its process finished long ago)
    return loop / INTERVAL, bare / INTERVAL


def compare(data: list[str], rounds: int, log_dir: str) -> tuple[list[tuple[float, float]], float]:
    """((loop, bare) seconds per step of each round, seconds per validation), in this process."""
    cfg = parse(job(data, 10 * (rounds + 1) * INTERVAL, log_dir))
    run = Run(cfg, preflight(cfg), log=lambda *a, **k: None)
    n = GLOBAL // MICRO
    prefetched = batches.loader(run.train_data, cfg, dp_rank=0, dp_size=1, workers=0)
    micro = [[next(prefetched) for _ in range(n)] for _ in range(INTERVAL)]
    loop_steps(run, INTERVAL // 2)  # warm-up of both paths; the rounds' events fall mid-round
    bare_steps(run, micro[:2])
    times = [round_times(run, micro) for _ in range(rounds)]
    validation = []
    for _ in range(3):
        start = time.perf_counter()
        run.evaluate()
        validation.append(time.perf_counter() - start)
    run.close()
    return times, statistics.median(validation)


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
    parser.add_argument("--rounds", type=int, default=5, help="measurement rounds (one interval of each path)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        blend = write_tiny_blend(Path(tmp) / "data", sizes=(600, 600, 900))
        data = [blend[name][0] for name in ("asr", "tts", "text")]
        for world in (1, 2):
            tps = run_ranks(_tokens_per_second, world, args=(data, TPS_STEPS, f"{tmp}/tps{world}"), timeout_s=1800)
            print(f"full loop at {world} rank(s), EP{world}: {tps[0]:.0f} tokens/s")
        times, validation = compare(data, args.rounds, f"{tmp}/ratio")
    print(
        f"validation (--eval-iters 2): {validation * 1e3:.0f} ms, at the example's --eval-interval {INTERVAL} "
        f"{validation / INTERVAL * 1e3:.1f} ms/step (left out of the ratio)"
    )
    print(f"tiny preset, seq {SEQ}, global batch {GLOBAL} ({GLOBAL // MICRO} micro-batches of {MICRO}), 1 CPU thread")
    for i, (loop, bare) in enumerate(times):
        print(
            f"round {i}: full loop {loop * 1e3:.1f} ms/step, bare step {bare * 1e3:.1f} ms/step, ratio {loop / bare:.3f}"
        )
    print(f"train loop/bare step time ratio: {statistics.median(loop / bare for loop, bare in times):.3f}")


if __name__ == "__main__":
    main()
