"""A scaling sweep: the points of a grid (sizes x expert counts x data mixes x MAMoE variants),
each a complete pretraining job for tools/pretrain_most.py, checked before anything is written.

    grid = load_grid("examples/scaling/grid_cpu.yaml")
    points = plan_points(grid)              # ConfigError naming the grid field, value and fix
    write_sweep(grid, points)               # training/sweep_files.py: configs + launch scripts

A grid (YAML or JSON; examples/scaling/ shows every key):
    name, out       the sweep's name and folder (a point writes to OUT/points/NAME/)
    base            TrainConfig values shared by every point (pretrain_most.py's --config names);
                    `preset` (or `most_config`) is the model the sizes change
    sizes           {name: MoSTConfig changes}, e.g. {hidden_size: 256, num_layers: 8,
                    mamoe: {topk: 2}}; or {family: {width: 256, depth: 4, experts: 8}}: the
                    scaling family's member (model/scaling.py family_fields), on base's tokens
    experts         routed-expert counts (split in half: text / audio group); absent = the size's
    mixes           {name: blend} in --data-path syntax ("0.4 data/asr 0.4 data/tts 0.2 data/text")
    variants        MAMoE variants: mamoe | vanilla | no_shared
    budget          optional: {flops: F} sets each point's train_iters to spend F training FLOPs
                    (estimate.py's FLOPs per token x tokens per step); {minutes: M} stops each
                    point after M minutes (--exit-duration-in-mins); warmup_fraction: lr warmup
                    as a fraction of each point's steps
    cluster         optional: {gpus, gpu, gpus_per_node} -> the layout planner (model/planner.py)
                    picks each point's layout; absent = base's layout on launch's ranks
    launch          {nproc_per_node, nnodes, slurm: {sbatch option: value}}
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import tempfile
from pathlib import Path
from typing import Any

import yaml

from megatron_most.data.indexed import header_path
from megatron_most.model.config import MoSTConfig, preset, read_config
from megatron_most.model.estimate import estimate
from megatron_most.model.layout import check_layout
from megatron_most.options import ConfigError, require
from megatron_most.platform.layout import ParallelLayout
from megatron_most.training import batches
from megatron_most.training.config import TrainConfig, parse, parse_blend

VARIANTS = ("mamoe", "vanilla", "no_shared")
GRID_KEYS = ("name", "out", "base", "sizes", "experts", "mixes", "variants", "budget", "cluster", "launch")
# Fields every point sets itself: a base value for them would be silently overwritten.
POINT_FIELDS = ("most_config", "data_path", "train_data_path", "valid_data_path", "mamoe_variant", "save", "log_dir")


@dataclasses.dataclass(frozen=True)
class Point:
    """One job of the sweep: its grid coordinates, model, TrainConfig values and estimate."""

    name: str
    size: str
    experts: int
    mix: str
    variant: str
    most: MoSTConfig
    train: dict
    """TrainConfig values (the config.yaml), paths relative to the repository root or absolute."""
    estimate: dict
    """params, active, flops_per_token, world, nnodes, nproc_per_node, plan (the planner's, or None)."""


# ---------------------------------------------------------------------------------- grid


def load_grid(source: str | Path | dict) -> dict[str, Any]:
    """The grid as a dict from a YAML/JSON file (or a dict), its keys and axes checked."""
    if isinstance(source, dict):
        grid = dict(source)
    else:
        path = Path(source)
        require(path.is_file(), f"grid {path}: no such file")
        grid = yaml.safe_load(path.read_text()) or {}  # YAML reads JSON too
        require(isinstance(grid, dict), f"grid {path}: expected a mapping of grid keys, got {type(grid).__name__}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    require(not unknown, f"grid: unknown keys {unknown}; the keys are {list(GRID_KEYS)}")
    for key in ("name", "sizes", "mixes", "variants"):
        require(grid.get(key), f"grid.{key} is missing or empty: see examples/scaling/grid_cpu.yaml")
    require(isinstance(grid["sizes"], dict), "grid.sizes: a mapping {size name: MoSTConfig changes}")
    require(isinstance(grid["mixes"], dict), "grid.mixes: a mapping {mix name: '0.4 data/asr 0.6 data/tts'}")
    bad = [v for v in grid["variants"] if v not in VARIANTS]
    require(not bad, f"grid.variants: unknown {bad}; choose among {list(VARIANTS)}")
    experts = grid.get("experts") or [None]
    bad = [e for e in experts if e is not None and (not isinstance(e, int) or e < 2)]
    require(not bad, f"grid.experts: {bad} are not expert counts (integers >= 2)")
    base = dict(grid.get("base") or {})
    clash = sorted(set(base) & set(POINT_FIELDS))
    require(not clash, f"grid.base sets {clash}: every point sets these itself (use grid.mixes for the data)")
    return {**grid, "base": base, "experts": experts, "out": grid.get("out") or f"runs/scaling/{grid['name']}"}


def _base_model(base: dict) -> MoSTConfig:
    if base.get("most_config"):
        path = Path(base["most_config"])
        return read_config(path if path.is_dir() else path.parent)
    try:
        return preset(base.get("preset", "tiny"))
    except ValueError as e:
        raise ConfigError(f"grid.base.preset: {e}") from e


def size_model(grid: dict, size: str, experts: int | None = None) -> MoSTConfig:
    """The MoSTConfig of grid.sizes[size] with `experts` routed experts (None: the size's own):
    the scaling family's member (model/scaling.py) or base's model with changes, on base's tokens
    (the data's tokenizer, units and features)."""
    changes = dict(grid["sizes"][size] or {})
    base = _base_model(grid["base"])
    where = f"grid.sizes.{size}" + (f" with {experts} experts" if experts else "")
    if "family" in changes:
        require(len(changes) == 1, f"{where}: give either family arguments or MoSTConfig fields, not both")
        args = dict(changes["family"] or {}, **({"experts": experts} if experts else {}))
        return _family_model(base, args, where)
    mamoe = dict(changes.pop("mamoe", None) or {})
    if experts is not None:  # halves: text group first, as the release's 0..31 of 64
        mamoe.update(num_experts=experts, text_experts=None, audio_experts=None)
    try:
        return base.replace(**changes, mamoe=dataclasses.replace(base.mamoe, **mamoe))
    except TypeError as e:  # an unknown field name
        raise ConfigError(f"{where}: {e}; give MoSTConfig fields (model/config.py), mamoe: MAMoEConfig's") from e
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _family_model(base: MoSTConfig, args: dict, where: str) -> MoSTConfig:
    """The scaling family's member for `args` (width, depth, experts, text_share, topk) on base."""
    try:
        scaling = importlib.import_module("megatron_most.model.scaling")
    except ImportError as e:
        raise ConfigError(f"{where}.family: model/scaling.py is not available ({e}); give MoSTConfig fields") from e
    try:
        return base.replace(**scaling.family_fields(**args))
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{where}.family {args}: {e}") from e


# ---------------------------------------------------------------------------------- points


def plan_points(grid: dict) -> list[Point]:
    """Every point of the grid, each checked (model, layout, data, budget); nothing is written."""
    for mix, blend in grid["mixes"].items():
        paths = blend.split() if isinstance(blend, str) else [str(p) for p in blend]
        prefixes, _ = parse_blend(paths, f"grid.mixes.{mix}")
        for prefix in prefixes:
            require(
                header_path(prefix).is_file(),
                f"grid.mixes.{mix}: {prefix} is not a packed dataset (no {header_path(prefix)}): prepare the data "
                "first (tools/preprocess_audio_text.py) or fix the path",
            )
    out = []
    axes = itertools.product(grid["sizes"], grid["experts"], grid["mixes"], grid["variants"])
    for size, experts, mix, variant in axes:
        most = _checked(f"grid.sizes.{size}", size_model, grid, size, experts)
        name = f"{size}-e{most.mamoe.num_experts}-{mix}-{variant}"
        most = _checked(f"grid point {name}", _variant, most, variant)
        out.append(_checked(f"grid point {name}", _point, grid, name, size, most, mix, variant))
    names = [p.name for p in out]
    require(len(set(names)) == len(names), f"grid: point names repeat ({names}): give the sizes distinct names")
    return out


def _variant(most: MoSTConfig, variant: str) -> MoSTConfig:
    return most.replace(mamoe=dataclasses.replace(most.mamoe, variant=variant))


def _checked(where: str, make, *args):
    """make(*args), its errors prefixed with where they come from (a size, a point)."""
    try:
        return make(*args)
    except ConfigError as e:
        raise ConfigError(e.args[0] if str(e).startswith("grid") else f"{where}: {e}") from e
    except ValueError as e:  # a dataset header, a MoSTConfig check outside ConfigError
        raise ConfigError(f"{where}: {e}") from e


def _point(grid: dict, name: str, size: str, most: MoSTConfig, mix: str, variant: str) -> Point:
    base, launch = grid["base"], grid.get("launch") or {}
    folder = Path(grid["out"]) / "points" / name
    train = {k: v for k, v in base.items() if k not in ("preset", "most_config")}
    blend = grid["mixes"][mix]
    train.update(
        most_config=str(folder / "most_config.json"),
        mamoe_variant=variant,
        data_path=blend if isinstance(blend, str) else " ".join(map(str, blend)),
        save=str(folder / "ckpt"),
        load=str(folder / "ckpt"),  # a rerun (or a resubmitted SLURM job) resumes
        log_dir=str(folder),
    )
    if base.get("tensorboard_dir"):
        train["tensorboard_dir"] = str(folder / "tensorboard")
    if base.get("wandb_project"):
        train["wandb_exp_name"] = f"{grid['name']}/{name}"
    seq = train.get("seq_length") or most.seq_length
    most = most.replace(seq_length=seq)
    plan = _layout_from_planner(grid, most, train) if grid.get("cluster") else None
    world = plan["world"] if plan else int(launch.get("nproc_per_node", 1)) * int(launch.get("nnodes", 1))
    layout = _layout(train, most)
    dp = layout.dp(world)
    est = estimate(most, layout, world_size=world, seq_len=seq)
    mbs = train.get("micro_batch_size", 1)
    gbs = train.setdefault("global_batch_size", mbs * dp)
    require(gbs % (mbs * dp) == 0, f"global_batch_size={gbs} is not a multiple of micro_batch_size {mbs} x DP {dp}")
    _apply_budget(grid.get("budget") or {}, train, est.flops_per_token * gbs * seq)
    batches.check_data(_parsed(train), most)  # the data's tokens match this model's (tokenizer, units, features)
    nproc = plan["nproc_per_node"] if plan else int(launch.get("nproc_per_node", 1))
    info = dict(
        params=est.total, active=est.active, flops_per_token=est.flops_per_token, seq_length=seq,
        global_batch_size=gbs, world=world, dp=dp, nnodes=world // nproc, nproc_per_node=nproc,
        layout=layout.describe(), plan=plan and plan["plan"],
    )  # fmt: skip
    return Point(name=name, size=size, experts=most.mamoe.num_experts, mix=mix, variant=variant, most=most,
                 train=train, estimate=info)  # fmt: skip


def _parsed(train: dict) -> TrainConfig:
    """`train` read as pretrain_most.py reads its --config (the most_config file is not read here)."""
    with tempfile.TemporaryDirectory(prefix="most_sweep_") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(train, sort_keys=False))
        return parse(["--config", str(path)])


def _layout(train: dict, most: MoSTConfig) -> ParallelLayout:
    tp, pp = train.get("tensor_model_parallel_size", 1), train.get("pipeline_model_parallel_size", 1)
    chunk = train.get("num_layers_per_virtual_pipeline_stage")
    layout = ParallelLayout(
        tp=tp, pp=pp, ep=train.get("expert_model_parallel_size", 1), etp=train.get("expert_tensor_parallel_size"),
        sp=tp > 1 if train.get("sequence_parallel") is None else train["sequence_parallel"],
        vpp=most.num_layers // pp // chunk if chunk else None,
    )  # fmt: skip
    check_layout(most, layout)
    return layout


def _apply_budget(budget: dict, train: dict, flops_per_step: float) -> None:
    unknown = sorted(set(budget) - {"flops", "minutes", "warmup_fraction"})
    require(not unknown, f"grid.budget: unknown keys {unknown}; give flops, minutes, warmup_fraction")
    if budget.get("flops"):
        train["train_iters"] = max(1, round(float(budget["flops"]) / flops_per_step))
    if budget.get("minutes"):
        train["exit_duration_in_mins"] = float(budget["minutes"])
    if budget.get("warmup_fraction") is not None:
        train["lr_warmup_iters"] = int(float(budget["warmup_fraction"]) * train.get("train_iters", 100))
    iters, warmup = train.get("train_iters", 100), train.get("lr_warmup_iters", 0)
    require(
        warmup < iters,
        f"lr_warmup_iters={warmup} is not below train_iters={iters} (the budget's steps): lower base.lr_warmup_iters "
        "or give grid.budget.warmup_fraction",
    )


# ---------------------------------------------------------------------------------- planner


def _layout_from_planner(grid: dict, most: MoSTConfig, train: dict) -> dict:
    """The planner's best layout that fits the cluster, written into `train` (Plan.train_args)."""
    cluster = dict(grid["cluster"])
    for key in ("gpus", "gpu"):
        require(key in cluster, f"grid.cluster.{key} is missing: the planner needs the GPU count and GPU kind")
    try:
        planner = importlib.import_module("megatron_most.model.planner")
    except ImportError as e:
        raise ConfigError(f"grid.cluster: the layout planner (model/planner.py) is not available ({e})") from e
    gbs = train.get("global_batch_size")
    require(gbs, "grid.base.global_batch_size is missing: the planner splits a given global batch")
    per_node = int(cluster.pop("gpus_per_node", 8))
    gpus, gpu = cluster.pop("gpus"), cluster.pop("gpu")
    try:  # the cluster's other keys are plan()'s options (precision, overlap, max_tp, ...)
        plans = planner.plan(
            most, gpus, gpu, most.seq_length, gbs, train.get("micro_batch_size"), name=grid["name"], **cluster
        )
    except TypeError as e:
        raise ConfigError(f"grid.cluster: {e}; its keys are gpus, gpu, gpus_per_node and plan()'s options") from e
    fitting = [p for p in plans if p.fits]
    if not fitting:
        closest = (
            f"; the closest: {plans[0].describe()} needs {plans[0].memory['total'] / 2**30:.1f} GiB" if plans else ""
        )
        raise ConfigError(
            f"no layout of {gpus} x {gpu} fits this size{closest}: give grid.cluster more GPUs, "
            "a larger GPU, or drop the size"
        )
    best = fitting[0]
    train.update({k: v for k, v in best.train_args().items() if v is not None})
    per_node = min(per_node, gpus)
    require(gpus % per_node == 0, f"grid.cluster.gpus_per_node={per_node} does not divide grid.cluster.gpus={gpus}")
    return dict(world=gpus, nproc_per_node=per_node, plan=best.to_dict())


__all__ = ["Point", "VARIANTS", "load_grid", "plan_points", "size_model"]
