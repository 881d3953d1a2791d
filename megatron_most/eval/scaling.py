"""A scaling study's results: every run of a sweep folder (point.json + metrics.jsonl, written by
training/sweep_files.py and the training loop) in one table, the loss-vs-compute plot and a
power law fitted per MAMoE variant (per variant and data mix when the runs have several mixes).

    rows = collect("runs/scaling/cpu_toy")
    report = write_report(rows, "runs/scaling/cpu_toy")   # scaling.md, scaling.json, scaling.png

Compute of a run at a logged step: training FLOPs per token (model/estimate.py: 6 x active
matmul parameters + attention over the sequence) x tokens consumed (consumed samples x sequence
length). The fit is loss = a * C^-b, least squares in log-log space over the finished runs' final
(compute, loss) points, or over the frontier of their curves (`on="frontier"`, for runs that all
had one budget); with `irreducible` (and at least 4 runs) loss = e + a * C^-b, e chosen on a
grid below the smallest loss for the least squared error in log loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from megatron_most.training.sweep_files import POINT_FILE

LOSS = "lm loss"
"""The training loss the loop logs (averaged over each --log-interval)."""
TABLE = ("name", "variant", "mix", "size", "experts", "params", "active", "steps", "tokens", "compute", "seconds")


# ---------------------------------------------------------------------------------- runs


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's step records (a resumed run re-logs some steps: the later record wins)."""
    steps: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "event" not in record and "image" not in record:
                steps.setdefault(record["iteration"], {}).update(record)
    return [steps[i] for i in sorted(steps)]


def read_run(folder: Path) -> dict | None:
    """One run's row: its point, curve (compute, loss per logged step), final losses and status;
    None when the run has not logged a training step yet."""
    point = json.loads((folder / POINT_FILE).read_text())
    metrics = folder / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    train = [r for r in records if r.get(LOSS) is not None]
    if not train:
        return None
    est = point["estimate"]
    per_sample = est["flops_per_token"] * est["seq_length"]
    curve = [(float(r["consumed samples"] * per_sample), r[LOSS]) for r in train]
    seconds, previous = 0.0, 0
    for r in train:  # each record's ms/iter covers the steps since the one before
        seconds += r.get("elapsed time per iteration (ms)", 0.0) * (r["iteration"] - previous) / 1e3
        previous = r["iteration"]
    last = train[-1]
    losses = {k: v for k, v in last.items() if k.startswith("loss/") and v is not None}
    for r in records:  # the latest validation
        losses.update({k: v for k, v in r.items() if k.startswith("valid ") and v is not None})
    row = {k: point[k] for k in ("name", "variant", "mix", "size", "experts")}
    row.update(
        params=est["params"], active=est["active"], flops_per_token=est["flops_per_token"], steps=last["iteration"],
        tokens=last["consumed samples"] * est["seq_length"], compute=curve[-1][0], seconds=seconds,
        loss=last[LOSS], losses=losses, curve=curve, done=_finished(folder, last["iteration"]), folder=str(folder),
    )  # fmt: skip
    return row


def _finished(folder: Path, iteration: int) -> bool:
    """Reached train_iters, or stopped by the budget's --exit-duration-in-mins with its checkpoint saved."""
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    if iteration >= config.get("train_iters", 100):
        return True
    tracker = folder / "ckpt" / "latest_checkpointed_iteration.txt"
    # the budget's exit saves at its own step, usually past the last logged one
    saved = tracker.is_file() and int(tracker.read_text().strip()) >= iteration
    return bool(config.get("exit_duration_in_mins")) and saved


def collect(runs: str | Path) -> list[dict]:
    """Rows of every run under `runs` (any depth; a sweep folder or several), sorted by variant and compute."""
    folders = sorted(p.parent for p in Path(runs).rglob(POINT_FILE))
    if not folders:
        raise FileNotFoundError(f"{runs}: no {POINT_FILE} below it: give a sweep folder written by tools/sweep.py plan")
    rows = [row for row in map(read_run, folders) if row is not None]
    return sorted(rows, key=lambda r: (r["variant"], r["mix"], r["compute"]))


# ---------------------------------------------------------------------------------- fit


def fit_power_law(compute, loss, irreducible: bool = False) -> dict:
    """loss = a * C^-b (+ e): {a, b, e, rmse_log, n}; least squares in log space."""
    c, y = np.log(np.asarray(compute, float)), np.asarray(loss, float)
    if len(c) < 2 or np.ptp(c) == 0:
        raise ValueError(f"a power law needs runs at two or more compute values, got {len(c)} ({compute})")

    def solve(e: float) -> tuple[float, float, float]:
        slope, intercept = np.polyfit(c, np.log(y - e), 1)
        predicted = np.log(e + np.exp(intercept + slope * c))
        return float(np.sqrt(np.mean((np.log(y) - predicted) ** 2))), float(np.exp(intercept)), float(-slope)

    e = 0.0
    if irreducible and len(c) >= 4:  # e, a, b from 3 points or fewer would fit any curve exactly
        top = float(y.min()) * (1 - 1e-9)
        grid = np.linspace(0.0, top, 401)
        e = float(min(grid, key=lambda v: solve(v)[0]))
        step = grid[1]
        fine = np.linspace(max(0.0, e - step), min(top, e + step), 401)  # then finer around the best
        e = float(min(fine, key=lambda v: solve(v)[0]))
    rmse, a, b = solve(e)
    return dict(a=a, b=b, e=e, rmse_log=rmse, n=len(c), compute=[float(np.exp(c.min())), float(np.exp(c.max()))])


def group_of(row: dict, rows: list[dict]) -> str:
    """Fit groups: the variant, and the mix when the runs have more than one."""
    mixes = {r["mix"] for r in rows}
    return row["variant"] if len(mixes) == 1 else f"{row['variant']} / {row['mix']}"


def frontier(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The compute-efficient frontier of runs' (compute, loss) curves: the logged points no point
    of less or equal compute beats (Kaplan et al.'s loss-vs-compute envelope)."""
    out, best = [], math.inf
    for c, y in sorted(p for curve in curves for p in curve):
        if y < best:
            out.append((c, y))
            best = y
    return out


def fit_groups(rows: list[dict], irreducible: bool = False, on: str = "final") -> dict[str, dict]:
    """A fit per group over its finished runs: their final points (`on="final"`: runs of several
    budgets or sizes) or the frontier of their curves (`on="frontier"`: e.g. every run given the
    same budget). A group without two compute values gets {"error": why} instead."""
    if on not in ("final", "frontier"):
        raise ValueError(f"fit on={on!r}: choose final or frontier")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["done"]:
            groups.setdefault(group_of(row, rows), []).append(row)
    fits = {}
    for name, members in groups.items():
        points = [(r["compute"], r["loss"]) for r in members]
        if on == "frontier":
            points = frontier([r["curve"] for r in members])
        try:
            fits[name] = dict(fit_power_law(*zip(*points), irreducible), on=on, runs=len(members))
        except ValueError as e:
            fits[name] = {"error": str(e), "n": len(points), "on": on, "runs": len(members)}
    return fits


# ---------------------------------------------------------------------------------- report


def plot(rows: list[dict], fits: dict[str, dict], path: Path) -> None:
    """Loss vs compute, log-log: each run's curve, its final point, and each group's fit."""
    figure = Figure(figsize=(8, 5.5), dpi=120)
    ax = figure.add_subplot()
    names = sorted({group_of(r, rows) for r in rows})
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    labelled = set()
    for row in rows:
        group = group_of(row, rows)
        label = None if group in labelled else f"{group} runs"
        labelled.add(group)
        c, y = zip(*row["curve"])
        ax.plot(c, y, color=colors[group], alpha=0.35, linewidth=1, linestyle="-" if row["done"] else ":", label=label)
        ax.scatter([row["compute"]], [row["loss"]], color=colors[group], s=22, zorder=3)
    for name, fit in fits.items():
        if "error" in fit:
            continue
        xs = np.geomspace(fit["compute"][0], fit["compute"][1], 50)
        label = f"{name}: L = {fit['e']:.3g} + {fit['a']:.3g} C^-{fit['b']:.3f}" if fit["e"] else (
            f"{name}: L = {fit['a']:.3g} C^-{fit['b']:.3f}"
        )  # fmt: skip
        ax.plot(xs, fit["e"] + fit["a"] * xs ** -fit["b"], color=colors.get(name, "k"), linestyle="--", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")  # losses span a narrow range: no 10^x labels
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"training loss ({LOSS})")
    ax.set_title(f"Loss vs compute: {len(rows)} runs (dotted: unfinished)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def markdown(rows: list[dict], fits: dict[str, dict]) -> str:
    on = next((f["on"] for f in fits.values()), "final")
    what = "final points" if on == "final" else "loss-vs-compute frontier"
    lines = ["# Scaling study", "", f"## Fits (loss = e + a * C^-b over the finished runs' {what})", ""]
    lines += ["| group | runs | points | a | b (exponent) | e | RMSE (log loss) | compute range |", "|" + "---|" * 8]
    for name, fit in fits.items():
        if "error" in fit:
            lines.append(f"| {name} | {fit['runs']} | {fit['n']} | | | | | {fit['error']} |")
        else:
            low, high = fit["compute"]
            lines.append(
                f"| {name} | {fit['runs']} | {fit['n']} | {fit['a']:.4g} | {fit['b']:.4f} | {fit['e']:.4g} "
                f"| {fit['rmse_log']:.3g} | {low:.3g} .. {high:.3g} |"
            )
    tasks = sorted({k for r in rows for k in r["losses"]})
    lines += ["", "## Runs", "", "| " + " | ".join([*TABLE, "loss", *tasks, "status"]) + " |"]
    lines.append("|" + "---|" * (len(TABLE) + len(tasks) + 2))
    for r in rows:
        cells = [_cell(r[k]) for k in TABLE] + [_cell(r["loss"])] + [_cell(r["losses"].get(t, "")) for t in tasks]
        lines.append("| " + " | ".join(cells + ["done" if r["done"] else "unfinished"]) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_report(rows: list[dict], out: str | Path, irreducible: bool = False, on: str = "final") -> dict[str, Path]:
    """scaling.md, scaling.json (rows without curves, and the fits) and scaling.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fits = fit_groups(rows, irreducible, on)
    paths = {"markdown": out / "scaling.md", "json": out / "scaling.json", "plot": out / "scaling.png"}
    paths["markdown"].write_text(markdown(rows, fits))
    table = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    paths["json"].write_text(json.dumps({"runs": table, "fits": fits}, indent=1) + "\n")
    plot(rows, fits, paths["plot"])
    return paths


__all__ = ["collect", "fit_power_law", "fit_groups", "frontier", "read_run", "write_report", "markdown", "plot"]
