"""Megatron-Core training on gloo at every layout agrees with the single-rank run.

Each case runs megatron_most.training.selfcheck (the same code as tools/selfcheck.py) across
spawned gloo ranks: initial weights are resharded from a TP1/PP1/EP1 checkpoint, then the
losses, every gradient shard, grad norms and weights after 3 Adam steps (grad clipping, the
distributed optimizer) are compared with the single-rank reference, and a torch_dist checkpoint
saved at the layout must reload exactly.
"""

from pathlib import Path

import pytest
import torch

from megatron_most.model.checkpoint import load_values
from megatron_most.platform.layout import ParallelLayout
from megatron_most.training import selfcheck
from tests.multiproc import run_distributed


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """Holds the single-rank references (moe/, mamoe/, most/), made once by the first check."""
    return tmp_path_factory.mktemp("selfcheck")


def _check(layout: dict, workdir: str, dist_opt: bool, kind: str = "moe"):
    return selfcheck.check(
        ParallelLayout(**layout), steps=3, dist_opt=dist_opt, kind=kind, workdir=workdir, timeout_s=300
    )


def _assert_agrees(figures: dict, kind: str = "moe"):
    assert figures["loss_diff"] <= selfcheck.LOSS_TOL, figures
    assert figures["grad_diff"] <= selfcheck.GRAD_TOL, figures
    assert figures["weight_diff"] <= selfcheck.WEIGHT_TOL, figures
    assert figures["roundtrip_diff"] == 0.0, figures
    if kind != "moe":  # tokens were routed, and none reached an expert of the other modality group
        assert figures["routed_tokens"] > 0 and figures["cross_group_tokens"] == 0, figures
    if kind == "most":
        # Each global batch (8 x 32) holds 4 x 6 feature frames + 4 x 8 unit tokens = 56 audio
        # tokens and 12 padding positions: every MoE layer on every stage must see 56 audio and
        # 188 text tokens per step, top-2, over 3 steps.
        assert figures["routed_by_layer"] == {2: [1128, 336], 3: [1128, 336], 4: [1128, 336]}, figures
        losses = figures["losses"][1:]
        assert losses[0] > losses[1] > losses[2], losses  # the tiny MoST fits its batch
    assert figures["passed"]


LAYOUTS = [  # (ranks, layout); the 4-rank runs take a minute each
    pytest.param(2, dict(tp=2, sp=True), id="TP2+SP"),
    pytest.param(2, dict(pp=2), id="PP2"),
    pytest.param(2, dict(ep=2), id="EP2"),
    pytest.param(2, dict(tp=2, ep=2, etp=1, sp=True), id="TP2xEP2"),
    pytest.param(4, dict(pp=2, ep=2), id="PP2xEP2", marks=pytest.mark.slow),
    pytest.param(4, dict(tp=2, pp=2, ep=2, etp=1, sp=True), id="TP2xPP2xEP2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind", ["moe", "mamoe", "most"])
@pytest.mark.parametrize("ranks, layout", LAYOUTS)
def test_layout_matches_single_rank(ranks, layout, kind, reference_dir):
    for figures in run_distributed(_check, ranks, args=(layout, str(reference_dir), True, kind), timeout_s=900):
        _assert_agrees(figures, kind)


def test_plain_ddp_optimizer_matches_single_rank(reference_dir):
    # DP2 with the non-distributed optimizer: DDP all-reduce instead of reduce-scatter/all-gather
    for figures in run_distributed(_check, 2, args=({}, str(reference_dir), False), timeout_s=600):
        _assert_agrees(figures)


def _save_init_at(layout: dict, reference: str, out: str, kind: str):
    from megatron.core import dist_checkpointing

    layout = ParallelLayout(**layout)
    selfcheck.initialize(layout, num_experts=selfcheck.NUM_EXPERTS)
    model = selfcheck.build_model(layout, kind)
    model.load_state_dict(load_values(model, Path(reference) / "init"), strict=False)
    if torch.distributed.get_rank() == 0:
        Path(out).mkdir()
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), out)


def _reload_at_single_rank(reference: str, saved: str, kind: str):
    layout = ParallelLayout()
    selfcheck.initialize(layout, num_experts=selfcheck.NUM_EXPERTS)
    model = selfcheck.build_model(layout, kind)
    model.load_state_dict(load_values(model, Path(saved)), strict=False)
    expected = load_values(model, Path(reference) / "init")
    max_diff = max((p - expected[n]).abs().max().item() for n, p in model.named_parameters())
    _, loss = selfcheck._backward_once(model, kind)
    return max_diff, loss, len(expected)


@pytest.mark.parametrize("kind", ["moe", "mamoe"], ids=["moe", "mamoe-balanced-placement"])
def test_checkpoint_saved_at_tp2_ep2_reloads_at_tp1_ep1(kind, reference_dir, tmp_path):
    reference = reference_dir / kind
    if not (reference / "reference.json").exists():
        reference.mkdir(exist_ok=True)
        assert selfcheck._run_reference(reference, 3, kind, 600) is None
    saved = str(tmp_path / "tp2ep2")
    run_distributed(_save_init_at, 2, args=(dict(tp=2, ep=2, etp=1, sp=True), str(reference), saved, kind))
    max_diff, loss, num_params = run_distributed(_reload_at_single_rank, 1, args=(str(reference), saved, kind))[0]
    import json

    reference_loss = json.loads((reference / "reference.json").read_text())[0]["loss"]
    assert num_params > 20
    assert max_diff == 0.0  # every tensor, experts included, back in its logical place
    assert abs(loss - reference_loss) <= selfcheck.LOSS_TOL
