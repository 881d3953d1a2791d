"""Scaling sweeps (tools/sweep.py): `plan` writes per-point configs that tools/pretrain_most.py
trains from, with torchrun and SLURM scripts; a bad grid is refused before anything is written;
`collect` turns real runs' metrics.jsonl into the table, the plot and a power-law fit whose
exponent is checked on synthetic points with a known answer.

Runs train the tiny preset's tokens (tests/packed_data.py) for a few steps at one rank.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_most.eval.scaling import collect, fit_power_law, write_report
from megatron_most.options import ConfigError
from megatron_most.platform.spawn import single_process_env
from megatron_most.training.sweep import load_grid, plan_points
from megatron_most.training.sweep_files import write_sweep
from tests.packed_data import write_tiny_blend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sweep_data")
    data = write_tiny_blend(root, sizes=(200, 200, 300))
    return " ".join(f"{w} {data[name][0]}" for w, name in ((0.4, "asr"), (0.4, "tts"), (0.2, "text")))


def grid(blend: str, out: Path, **changes) -> dict:
    """Two sizes of the tiny preset x two variants, 4 steps of 4 x 64 tokens each."""
    base = dict(
        preset="tiny", seq_length=64, micro_batch_size=2, global_batch_size=4, train_iters=4, lr=3e-3,
        lr_warmup_iters=1, split="90,10,0", num_workers=0, log_interval=1, eval_interval=1000, eval_iters=1,
    )  # fmt: skip
    values = dict(
        name="toy", out=str(out), base=base, sizes={"d2": {"num_layers": 2}, "d4": {}}, experts=[4],
        mixes={"even": blend}, variants=["mamoe", "vanilla"],
    )  # fmt: skip
    values.update(changes)
    return values


@pytest.fixture
def sweep_tool(monkeypatch, capsys):
    """tools/sweep.py's main in this process (it changes directory to the repository root: the
    test's directory is restored afterwards): (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("sweep_tool", ROOT / "tools" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(Path.cwd())

    def run(*args: str) -> tuple[int, str, str]:
        status = module.main(list(args))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def pretrain_tool(*args: str) -> subprocess.CompletedProcess:
    """tools/pretrain_most.py at one rank, without the rendezvous variables that counting
    parameters (plan_points -> model/estimate.py) left in this process's environment."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pretrain_most.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=single_process_env(),
    )  # fmt: skip


# ---------------------------------------------------------------------------------- plan


def test_plan_writes_points_and_scripts(blend, tmp_path, sweep_tool):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid(blend, tmp_path / "sweep", launch={"slurm": {"time": "01:00:00"}})))
    status, _, err = sweep_tool("plan", str(grid_file))
    assert status == 0, err
    points = sorted(p.name for p in (tmp_path / "sweep" / "points").iterdir())
    assert points == ["d2-e4-even-mamoe", "d2-e4-even-vanilla", "d4-e4-even-mamoe", "d4-e4-even-vanilla"]
    folder = tmp_path / "sweep" / "points" / "d2-e4-even-vanilla"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["mamoe_variant"] == "vanilla" and config["data_path"] == blend
    assert config["most_config"] == str(folder / "most_config.json") and config["log_dir"] == str(folder)
    model = json.loads((folder / "most_config.json").read_text())
    assert model["num_layers"] == 2 and model["mamoe"]["num_experts"] == 4 and model["mamoe"]["variant"] == "vanilla"
    point = json.loads((folder / "point.json").read_text())
    assert point["estimate"]["flops_per_token"] > 6 * point["estimate"]["active"] / 2
    run_sh, slurm = (folder / "run.sh").read_text(), (folder / "run.slurm").read_text()
    assert f"torchrun --standalone --nproc_per_node 1 tools/pretrain_most.py --config {folder}/config.yaml" in run_sh
    assert "#SBATCH --time=01:00:00" in slurm and "#SBATCH --nodes=1" in slurm and "srun" in slurm
    run_all = (tmp_path / "sweep" / "run_all.sh").read_text()
    assert run_all.count("bash ") == 4 and (tmp_path / "sweep" / "submit_all.sh").is_file()


def test_multi_node_scripts_and_family_sizes(blend, tmp_path):
    """Two nodes of two ranks at EP2; a size named by the scaling family's arguments."""
    base = dict(grid(blend, tmp_path)["base"], expert_model_parallel_size=2, global_batch_size=8)
    values = grid(
        blend, tmp_path / "sweep", base=base, sizes={"f": {"family": {"width": 128, "depth": 2, "topk": 2}}},
        experts=[4, 8], variants=["mamoe"], launch={"nproc_per_node": 2, "nnodes": 2},
    )  # fmt: skip
    points = plan_points(load_grid(values))
    assert [p.name for p in points] == ["f-e4-even-mamoe", "f-e8-even-mamoe"]
    assert points[1].most.hidden_size == 128 and points[1].most.mamoe.num_experts == 8
    assert points[0].estimate["world"] == 4 and points[0].estimate["dp"] == 4
    write_sweep(load_grid(values), points)
    run_sh = (tmp_path / "sweep" / "points" / "f-e4-even-mamoe" / "run.sh").read_text()
    assert "torchrun --nnodes 2 --nproc_per_node 2 --node_rank" in run_sh


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"variants": ["mamoe", "moe"]}, "grid.variants: unknown ['moe']"),
        ({"mixes": {"bad": "0.5 /nonexistent/asr 0.5 /nonexistent/tts"}}, "grid.mixes.bad: /nonexistent/asr"),
        ({"sizes": {"x": {"hidden_sise": 64}}}, "grid.sizes.x with 4 experts: MoSTConfig.__init__() got an unexpected"),
        ({"experts": [2]}, "grid.sizes.d2 with 2 experts: MAMoEConfig.topk=2"),
        ({"budget": {"flops": 1e3}}, "lr_warmup_iters=1 is not below train_iters=1"),
        ({"base": {"preset": "tiny", "data_path": "x"}}, "grid.base sets ['data_path']"),
    ],
    ids=["variant", "data", "size-field", "experts", "budget", "base-field"],
)
def test_bad_grid_refused_before_writing(blend, tmp_path, changes, message):
    values = grid(blend, tmp_path / "sweep", **changes)
    with pytest.raises(ConfigError) as error:
        write_sweep(values, plan_points(load_grid(values)))
    assert message in str(error.value), str(error.value)
    assert not (tmp_path / "sweep").exists()


def test_bad_grid_exit_status(tmp_path, sweep_tool):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "x", "sizes": {"a": {}}, "mixes": {"m": "a"}, "variants": ["moe"]}))
    status, _, err = sweep_tool("plan", str(grid_file))
    assert status == 2 and "grid.variants" in err and "mamoe" in err


def test_planner_refuses_a_size_that_does_not_fit(blend, tmp_path):
    pytest.importorskip("megatron_most.model.planner")
    values = grid(blend, tmp_path / "sweep", base=dict(grid(blend, tmp_path)["base"], preset="deepseek_v2_lite_most"))
    values.update(sizes={"lite": {}}, experts=[None], cluster={"gpus": 1, "gpu": "a100-80g"})
    with pytest.raises(ConfigError, match="no layout of 1 x a100-80g fits"):
        plan_points(load_grid(values))


def test_budget_sets_steps_from_flops(blend, tmp_path):
    points = plan_points(load_grid(grid(blend, tmp_path, budget={"flops": 2e9, "warmup_fraction": 0.1})))
    for p in points:
        per_step = p.estimate["flops_per_token"] * 4 * 64
        assert p.train["train_iters"] == round(2e9 / per_step) and p.train["lr_warmup_iters"] < p.train["train_iters"]
    small, large = points[0], points[-1]
    assert small.train["train_iters"] > large.train["train_iters"]  # the same compute: more steps when smaller


# ---------------------------------------------------------------------------------- runs and collect


@pytest.mark.slow
def test_points_train_and_collect(blend, tmp_path, sweep_tool):
    """One point of each size trains with tools/pretrain_most.py from its config.yaml; the
    collector makes the table, plot and fit from their metrics.jsonl."""
    values = grid(blend, tmp_path / "sweep", variants=["mamoe"])
    points = plan_points(load_grid(values))
    write_sweep(load_grid(values), points)
    for point in points:
        config = Path(point.train["log_dir"]) / "config.yaml"
        run = pretrain_tool("--config", str(config))
        assert run.returncode == 0, run.stderr[-2000:]
    rows = collect(tmp_path / "sweep")
    assert [r["name"] for r in rows] == ["d2-e4-even-mamoe", "d4-e4-even-mamoe"] and all(r["done"] for r in rows)
    for row in rows:
        assert row["steps"] == 4 and row["tokens"] == 4 * 4 * 64
        assert row["compute"] == row["flops_per_token"] * row["tokens"] and np.isfinite(row["loss"])
        assert {"loss/asr", "loss/tts", "loss/text"} <= set(row["losses"])
    paths = write_report(rows, tmp_path / "report")
    report = json.loads(paths["json"].read_text())
    fit = report["fits"]["mamoe"]
    assert fit["n"] == 2 and np.isfinite(fit["b"])  # two points: an exact line through both
    assert (
        paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and "| d2-e4-even-mamoe |" in paths["markdown"].read_text()
    )
    status, out, err = sweep_tool("collect", str(tmp_path / "sweep"))
    assert status == 0 and (tmp_path / "sweep" / "scaling.png").is_file() and "| mamoe | 2 |" in out, err


# ---------------------------------------------------------------------------------- fit


def test_fit_recovers_known_exponents():
    compute = np.geomspace(1e12, 1e18, 7)
    fit = fit_power_law(compute, 3 * compute**-0.1)
    assert fit["b"] == pytest.approx(0.1, rel=1e-9) and fit["a"] == pytest.approx(3, rel=1e-9) and fit["e"] == 0
    fit = fit_power_law(compute, 1.7 + 40 * compute**-0.15, irreducible=True)
    assert fit["b"] == pytest.approx(0.15, rel=1e-3) and fit["e"] == pytest.approx(1.7, rel=1e-3)
    with pytest.raises(ValueError, match="two or more compute values"):
        fit_power_law([1e12], [2.0])


def test_collect_synthetic_runs(tmp_path):
    """Runs logged on loss = 3 C^-0.1 exactly: the collector's fit gives b = 0.1; an unfinished
    run is listed, plotted and left out of the fit."""
    for i, samples in enumerate((10, 100, 1000, 5000)):
        folder = tmp_path / f"p{i}"
        folder.mkdir()
        estimate = dict(params=1000, active=500, flops_per_token=3000, seq_length=64)
        point = dict(name=f"p{i}", variant="mamoe", mix="m", size=f"s{i}", experts=4, estimate=estimate)
        (folder / "point.json").write_text(json.dumps(point))
        (folder / "config.yaml").write_text(f"train_iters: {10 if i < 3 else 20}\n")
        lines = []
        for step in range(1, 11):
            c = 3000 * 64 * samples * step / 10
            lines.append(
                json.dumps({"iteration": step, "lm loss": 3 * c**-0.1, "consumed samples": samples * step / 10})
            )
        (folder / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"iteration": 10, "event": "x"})]) + "\n")
    rows = collect(tmp_path)
    assert [r["done"] for r in rows] == [True, True, True, False]
    paths = write_report(rows, tmp_path)
    fit = json.loads(paths["json"].read_text())["fits"]["mamoe"]
    assert fit["n"] == 3 and fit["b"] == pytest.approx(0.1, rel=1e-9) and fit["a"] == pytest.approx(3, rel=1e-9)
    fit = json.loads(write_report(rows, tmp_path, on="frontier")["json"].read_text())["fits"]["mamoe"]
    assert fit["runs"] == 3 and fit["n"] > 3 and fit["b"] == pytest.approx(0.1, rel=1e-9)


def test_wall_budget_run_counts_as_finished_when_its_exit_checkpoint_is_saved(tmp_path):
    """--exit-duration-in-mins stops at any step (63) and saves there; the last logged step is 60."""
    folder = tmp_path / "p"
    (folder / "ckpt").mkdir(parents=True)
    estimate = dict(params=1000, active=500, flops_per_token=3000, seq_length=64)
    (folder / "point.json").write_text(json.dumps(dict(name="p", variant="mamoe", mix="m", size="s", experts=4,
                                                       estimate=estimate)))  # fmt: skip
    (folder / "config.yaml").write_text("train_iters: 1000000\nexit_duration_in_mins: 2.5\n")
    records = [{"iteration": i, "lm loss": 3.0 - i / 100, "consumed samples": 16 * i} for i in (20, 40, 60)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert collect(tmp_path)[0]["done"] is False  # no exit checkpoint: killed, not finished
    (folder / "ckpt" / "latest_checkpointed_iteration.txt").write_text("63")
    assert collect(tmp_path)[0]["done"] is True
