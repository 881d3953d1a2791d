"""A CPU scaling study: sizes of the MoST scaling family (model/scaling.py, on a preset's tokens),
MAMoE vs VanillaMoE, each trained for one fixed compute budget (training FLOPs, or wall seconds)
on a packed corpus at one CPU rank, then the collector's table, loss-vs-compute plot and fitted
power law per variant (over the runs' loss-vs-compute frontier: every run has the same budget).

    python -m benchmarks.scaling_study --data-path 0.3 runs/quickstart/packed/asr \\
        0.1 runs/quickstart/packed/asr_units 0.4 runs/quickstart/packed/tts 0.2 runs/quickstart/packed/text \\
        --preset small --budget-flops 2e13                        # 4 sizes x 2 variants: about an hour
    python -m benchmarks.scaling_study --smoke                    # 2 sizes, a few steps, synthetic data

The sweep goes through tools/sweep.py's code (training/sweep.py plans and writes the points) and
every run through tools/pretrain_most.py with its point's config.yaml, one after another. The last
lines are `exponent b (VARIANT): X` per variant, then `report: OUT/scaling.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from megatron_most.eval.scaling import collect, write_report
from megatron_most.platform.spawn import single_process_env
from megatron_most.training.sweep import load_grid, plan_points
from megatron_most.training.sweep_files import ROOT, write_sweep
from tests.packed_data import write_tiny_blend

SIZES = ("128x2", "128x4", "256x4", "256x6")
"""width x depth of the family members (widths are multiples of 128)."""


def grid(args) -> dict:
    sizes = {}
    for size in args.sizes:
        width, depth = (int(v) for v in size.split("x"))
        sizes[f"w{width}d{depth}"] = {"family": {"width": width, "depth": depth, "topk": 2}}
    base = dict(
        preset=args.preset, seq_length=args.seq_length, micro_batch_size=args.micro_batch,
        global_batch_size=args.global_batch, lr=3e-3, min_lr=1e-4, weight_decay=0.01, adam_beta2=0.98,
        clip_grad=1.0, split="98,2,0", num_workers=0, eval_interval=100000, eval_iters=1,
        log_interval=args.log_interval, seed=1234,
    )  # fmt: skip
    budget = {"warmup_fraction": 0.05}
    if args.budget_seconds:  # steps up to the wall budget: no schedule to finish, so a constant LR
        base.update(train_iters=1_000_000, lr_decay_style="constant", lr_warmup_iters=10)
        budget = {"minutes": args.budget_seconds / 60}
    else:
        base.update(lr_decay_style="cosine")
        budget["flops"] = args.budget_flops
    return dict(
        name="scaling_study", out=str(Path(args.out).resolve()), base=base, sizes=sizes, experts=[args.experts],
        mixes={"data": " ".join(args.data_path)}, variants=args.variants, budget=budget,
    )  # fmt: skip


def run_point(config: Path, log: Path) -> float:
    """tools/pretrain_most.py on one rank (a fresh rendezvous: planning counted parameters in a
    process group of its own, whose variables are in this environment); its wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "pretrain_most.py"), "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=single_process_env(CUDA_VISIBLE_DEVICES=""),
        ).returncode  # fmt: skip
    if status != 0:
        raise SystemExit(f"{config}: pretrain_most.py exited {status}; see {log}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", nargs="+", help="packed blend for the preset's tokens (--data-path syntax)")
    parser.add_argument("--preset", default="small", help="whose tokens the data has (the sizes set the rest)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="WIDTHxDEPTH family members")
    parser.add_argument("--variants", nargs="+", default=["mamoe", "vanilla"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--budget-flops", type=float, default=2e13, help="training FLOPs per run")
    parser.add_argument("--budget-seconds", type=float, help="wall seconds per run instead of FLOPs")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--out", default="runs/scaling/benchmark")
    parser.add_argument("--smoke", action="store_true", help="2 sizes, a few steps, synthetic tiny-preset data")
    args = parser.parse_args(argv)
    if args.smoke:  # the tiny preset's synthetic corpus (tests/packed_data.py) and a few steps
        data = write_tiny_blend(Path(args.out) / "data", sizes=(200, 200, 300))
        args.data_path = [f"{w} {data[name][0]}" for w, name in ((0.4, "asr"), (0.4, "tts"), (0.2, "text"))]
        args.preset, args.sizes, args.seq_length, args.global_batch, args.micro_batch = (
            "tiny",
            ["128x2", "256x2"],
            64,
            4,
            2,
        )
        args.log_interval, args.budget_flops, args.budget_seconds = 1, 4e9, None
    if not args.data_path:
        parser.error("--data-path is required (or --smoke)")
    values = load_grid(grid(args))
    points = plan_points(values)
    out = write_sweep(values, points)
    for point in points:
        folder = Path(point.train["log_dir"])
        seconds = run_point(folder / "config.yaml", folder / "train.log")
        print(f"{point.name}: {point.train['train_iters']} steps max, {seconds:.0f} s", flush=True)
    rows = collect(out)
    paths = write_report(rows, out, on="frontier")
    print(paths["markdown"].read_text())
    fits = json.loads(paths["json"].read_text())["fits"]
    for name, fit in fits.items():
        print(f"exponent b ({name}): {fit.get('b', fit.get('error'))}")
    print(f"report: {paths['markdown']} (plot {paths['plot']})")


if __name__ == "__main__":
    main()
