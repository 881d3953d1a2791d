"""Scaling sweeps (README: "Scaling studies: sweeps").

    python tools/sweep.py plan examples/scaling/grid_cpu.yaml      # configs + launch scripts per point
    bash runs/scaling/cpu_toy/run_all.sh                           # or submit_all.sh under SLURM
    python tools/sweep.py collect runs/scaling/cpu_toy             # table, loss-vs-compute plot, fits

Paths in a grid (data, out) are relative to the repository root, as in every example; this tool
works from there whatever the current directory. Exit status 2 on a bad grid (the message names
the grid field, the value and the fix), before anything is written.
"""

import argparse
import os
import sys

from megatron_most.data.indexed import DatasetFormatError
from megatron_most.eval.scaling import collect, write_report
from megatron_most.options import ConfigError
from megatron_most.training.sweep import load_grid, plan_points
from megatron_most.training.sweep_files import ROOT, write_sweep


def plan(args) -> None:
    grid = load_grid(args.grid)
    if args.out:
        grid["out"] = args.out
    points = plan_points(grid)
    print(f"sweep {grid['name']}: {len(points)} points")
    for p in points:
        e = p.estimate
        print(
            f"  {p.name:<40} {e['params']:>14,} params {e['active']:>13,} active  {e['layout']} DP{e['dp']} on "
            f"{e['world']}  {p.train.get('train_iters', 100)} steps"
        )
    if args.dry_run:
        return
    out = write_sweep(grid, points)
    print(f"wrote {out}: bash {out / 'run_all.sh'} (or sbatch: {out / 'submit_all.sh'}); then collect {grid['out']}")


def collect_runs(args) -> None:
    rows = collect(args.runs)
    paths = write_report(rows, args.out or args.runs, irreducible=args.irreducible, on=args.fit_on)
    print(paths["markdown"].read_text() if rows else "no run has logged a step yet")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Scaling sweeps: plan a grid's runs, collect their results.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write one config.yaml + run.sh + run.slurm per grid point")
    p.add_argument("grid", help="grid YAML/JSON (examples/scaling/grid_cpu.yaml shows every key)")
    p.add_argument("--out", help="sweep folder (default: the grid's `out`)")
    p.add_argument("--dry-run", action="store_true", help="check every point and list them; write nothing")
    p.set_defaults(run=plan)
    c = sub.add_parser("collect", help="runs' metrics.jsonl -> scaling.md, scaling.json, scaling.png")
    c.add_argument("runs", help="a sweep folder (every point.json below it is a run)")
    c.add_argument("--out", help="where the report goes (default: the runs folder)")
    c.add_argument("--irreducible", action="store_true", help="fit loss = e + a C^-b (needs 4+ runs per group)")
    c.add_argument(
        "--fit-on", choices=("final", "frontier"), default="final",
        help="fit the runs' final points (runs of several budgets) or their curves' frontier (one budget for all)",
    )  # fmt: skip
    c.set_defaults(run=collect_runs)
    args = parser.parse_args(argv)
    for name in ("grid", "runs", "out"):  # the command line's paths are the caller's; the grid's are the root's
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    os.chdir(ROOT)
    try:
        args.run(args)
    except (ConfigError, DatasetFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
