"""A sweep's files: per point a config.yaml that tools/pretrain_most.py reads, the model it names
(most_config.json), launch scripts for torchrun (run.sh) and SLURM (run.slurm), and point.json
(grid coordinates, parameters, FLOPs per token, layout) that the collector (eval/scaling.py)
reads next to the run's metrics.jsonl; per sweep sweep.json, run_all.sh and submit_all.sh.

    OUT/sweep.json  run_all.sh  submit_all.sh
    OUT/points/NAME/config.yaml  most_config.json  point.json  run.sh  run.slurm
                   (then, when run) metrics.jsonl  ckpt/  tensorboard/

Paths inside are as the grid gives them: relative ones are relative to the repository root,
where every script changes directory first (as examples/*/run.sh do).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import yaml

from megatron_most.model.config import write_config
from megatron_most.training.sweep import Point

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (tools/pretrain_most.py is found from here)."""
POINT_FILE = "point.json"


def write_sweep(grid: dict, points: list[Point], root: Path = ROOT) -> Path:
    """Write every point's files and the sweep's scripts under grid["out"]; returns that folder."""
    out = _at(root, grid["out"])
    for point in points:
        folder = _at(root, Path(point.train["log_dir"]))
        folder.mkdir(parents=True, exist_ok=True)
        write_config(folder, point.most)
        (folder / "config.yaml").write_text(_config_text(grid, point))
        (folder / POINT_FILE).write_text(json.dumps(_point_record(grid, point), indent=1, default=str) + "\n")
        _script(folder / "run.sh", torchrun_script(grid, point, root))
        _script(folder / "run.slurm", slurm_script(grid, point))
    names = [p.name for p in points]
    record = dict(name=grid["name"], grid={k: v for k, v in grid.items()}, points=names)
    (out / "sweep.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    _script(out / "run_all.sh", _all_script(grid, points, root, "bash", "run.sh", "one after another"))
    _script(out / "submit_all.sh", _all_script(grid, points, root, "sbatch", "run.slurm", "as SLURM jobs"))
    return out


def _at(root: Path, path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _point_record(grid: dict, point: Point) -> dict:
    coords = {f.name: getattr(point, f.name) for f in dataclasses.fields(point) if f.name not in ("most", "train")}
    return dict(sweep=grid["name"], **coords, config=str(Path(point.train["log_dir"]) / "config.yaml"))


def _describe(grid: dict, point: Point) -> str:
    e = point.estimate
    return (
        f"Sweep {grid['name']}, point {point.name}: size {point.size} ({_count(e['params'])} parameters, "
        f"{_count(e['active'])} active), {point.experts} routed experts, mix {point.mix}, variant {point.variant};\n"
        f"# {e['layout']} DP{e['dp']} on {e['world']} ranks ({e['nnodes']} node(s) x {e['nproc_per_node']}), "
        f"{point.train.get('train_iters', 100)} steps of {e['global_batch_size']} x {e['seq_length']} tokens, "
        f"{e['flops_per_token'] / 1e6:.3g} MFLOPs per token (model/estimate.py)."
    )


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _config_text(grid: dict, point: Point) -> str:
    plan = point.estimate["plan"]
    why = "the layout planner's best fitting layout (model/planner.py)" if plan else "the grid's base layout"
    header = (
        f"# {_describe(grid, point)}\n# Layout: {why}. Written by tools/sweep.py plan; edit the grid, not this file.\n"
    )
    return header + yaml.safe_dump(point.train, sort_keys=False, width=200)


def _rel_root(folder: Path, root: Path) -> str:
    return os.path.relpath(root, _at(root, folder))


def torchrun_script(grid: dict, point: Point, root: Path = ROOT) -> str:
    """One node: torchrun --standalone (a free port, so points can share a machine); more nodes:
    run the script on every node with NODE_RANK and MASTER_ADDR set, as examples/*_a100/run.sh."""
    e, folder = point.estimate, Path(point.train["log_dir"])
    config = folder / "config.yaml"
    lines = [
        "#!/usr/bin/env bash",
        f"# {_describe(grid, point)}",
        "# Written by tools/sweep.py plan. Extra flags override config.yaml; a rerun resumes from its ckpt/.",
        "set -euo pipefail",
        f'cd "$(dirname "$0")/{_rel_root(folder, root)}"',
    ]
    if e["nnodes"] == 1:
        lines.append(
            f'torchrun --standalone --nproc_per_node {e["nproc_per_node"]} tools/pretrain_most.py --config {config} "$@"'
        )
    else:
        lines += [
            f'torchrun --nnodes {e["nnodes"]} --nproc_per_node {e["nproc_per_node"]} --node_rank "${{NODE_RANK:?set NODE_RANK}}" \\',
            '    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \\',
            f'    tools/pretrain_most.py --config {config} "$@"',
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def slurm_script(grid: dict, point: Point) -> str:
    """One torchrun per node under srun, as examples/most_stage1_a100/run.slurm. SIGTERM 5 minutes
    before the time limit saves a checkpoint; resubmitting resumes (config.yaml's load)."""
    e, folder = point.estimate, Path(point.train["log_dir"])
    slurm = dict((grid.get("launch") or {}).get("slurm") or {})
    options = {"job-name": f"{grid['name']}-{point.name}", "nodes": e["nnodes"], "ntasks-per-node": 1}
    if grid.get("cluster"):
        options["gpus-per-node"] = e["nproc_per_node"]
    options.update({"output": str(folder / "slurm-%j.out"), "signal": "B:TERM@300", **slurm})
    lines = ["#!/usr/bin/env bash", *[f"#SBATCH --{key}={value}" for key, value in options.items()]]
    lines += [
        f"# {_describe(grid, point)}",
        "# Submit from the repository root (submit_all.sh does). Written by tools/sweep.py plan.",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR}"',
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {e["nproc_per_node"]} \\',
        '    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" --rdzv_id "$SLURM_JOB_ID" \\',
        f'    tools/pretrain_most.py --config {folder / "config.yaml"} "$@"',
    ]
    return "\n".join(lines) + "\n"


def _all_script(grid: dict, points: list[Point], root: Path, command: str, script: str, how: str) -> str:
    out = Path(grid["out"])
    lines = [
        "#!/usr/bin/env bash",
        f"# Sweep {grid['name']}: every point's {script} {how} ({len(points)} points). Written by tools/sweep.py plan;",
        f"# then: python tools/sweep.py collect {out}",
        "set -euo pipefail",
        f'cd "$(dirname "$0")/{_rel_root(out, root)}"',
        *[f"{command} {Path(p.train['log_dir']) / script}" for p in points],
    ]
    return "\n".join(lines) + "\n"


__all__ = ["write_sweep", "torchrun_script", "slurm_script", "POINT_FILE", "ROOT"]
