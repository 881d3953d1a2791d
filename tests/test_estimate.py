"""model/estimate and tools/estimate.py: parameter counts of the real model built on the meta
device against hand-written architecture formulas, a real CPU model, per-rank shards of a real
multi-rank build, and the published DeepSeek-V2-Lite size."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_most.model.config import preset
from megatron_most.model.estimate import estimate, stage_layers
from megatron_most.options import ConfigError
from megatron_most.platform.layout import ParallelLayout
from tests.multiproc import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def hand_counts(most) -> dict:
    """Every parameter category from the architecture, written out by hand."""
    h, heads, L, k = most.hidden_size, most.num_attention_heads, most.num_layers, most.first_k_dense
    nope, rope, v, lora = most.qk_nope_head_dim, most.qk_rope_head_dim, most.v_head_dim, most.kv_lora_rank
    E, moe = most.mamoe.num_experts, L - k
    audio = most.num_units > 0 or most.audio_feature_dim > 0
    vocab = most.text_vocab_size + (3 + most.num_units if audio else 0)  # text + <boa> <eoa> <feat> + units
    padded = -(-vocab // 128) * 128
    q_proj = h * heads * (nope + rope)
    kv_down = h * (lora + rope)
    kv_up = lora * heads * (nope + v)
    o_proj = heads * v * h
    return {
        "embedding": padded * h,
        "output_layer": padded * h,
        "attention": L * (q_proj + kv_down + kv_up + o_proj),
        "dense_mlp": k * 3 * h * most.dense_ffn_size,
        "routed_experts": moe * E * 3 * h * most.moe_ffn_size,
        "shared_experts": moe * 3 * h * most.mamoe.shared_expert_size,
        "router": moe * E * h,
        "norms": L * (2 * h + lora) + h,  # input + pre-MLP + kv_a norms per layer, final norm
        "audio_projection": most.audio_feature_dim * h + h if most.audio_feature_dim else 0,
    }


def _count_presets():
    """Meta-device counts of both presets, and the parameters of a real tiny model on the CPU."""
    import torch

    from megatron_most.model.estimate import count_parameters
    from megatron_most.model.most import build_model
    from megatron_most.platform import initialize

    out = {name: count_parameters(preset(name)) for name in ("tiny", "deepseek_v2_lite")}
    most = preset("tiny")
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config())
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    out["tiny_real"] = sum(p.numel() for p in model.parameters())
    return out


@pytest.fixture(scope="module")
def counted():
    return run_distributed(_count_presets, 1, timeout_s=300)[0]


def test_tiny_counts_match_hand_formulas_and_real_model(counted):
    most = preset("tiny")
    est = estimate(most, counts=counted["tiny"])
    expected = hand_counts(most)
    assert est.categories == expected
    assert est.total == sum(expected.values()) == counted["tiny_real"]
    routed = expected["routed_experts"]
    assert est.active == est.total - expected["embedding"] - routed + routed * most.mamoe.topk // most.mamoe.num_experts
    # FLOPs: 6 x matmul weights per token + MLA scores (qk = nope + rope, v) over the sequence
    matmul = est.active - expected["norms"] - expected["audio_projection"]
    attention = (
        6
        * most.num_layers
        * most.num_attention_heads
        * (most.qk_nope_head_dim + most.qk_rope_head_dim + most.v_head_dim)
        * most.seq_length
    )
    assert est.flops_per_token == 6 * matmul + attention
    # one GPU, no sharding: 2 + 4 + 12 bytes per parameter
    (stage,) = est.stages
    assert stage.params == stage.params_per_gpu == est.total and stage.layers == (0, most.num_layers)
    assert stage.total_bytes == 18 * est.total


def test_deepseek_v2_lite_matches_published_size(counted):
    most = preset("deepseek_v2_lite")
    est = estimate(most, counts=counted["deepseek_v2_lite"])
    assert est.categories == hand_counts(most)
    # text only: exactly the HF model's 102400-row embedding and head
    assert est.categories["embedding"] == est.categories["output_layer"] == 102400 * 2048
    assert abs(est.total - 15.7e9) / 15.7e9 < 0.01, est.total
    assert 2.2e9 <= est.active <= 2.6e9, est.active  # DeepSeek: "2.4B activated"


def test_sharded_memory_by_hand(counted):
    most = preset("tiny")
    est = estimate(most, ParallelLayout(tp=2, ep=2, sp=True), world_size=8, counts=counted["tiny"])
    c = hand_counts(most)
    assert (est.dp, est.expert_dp) == (4, 2)  # 8 / (tp*pp), 8 / (etp*ep*pp) with etp = tp
    kv_down = most.num_layers * most.hidden_size * (most.kv_lora_rank + most.qk_rope_head_dim)
    split = c["embedding"] + c["output_layer"] + c["attention"] - kv_down + c["dense_mlp"] + c["shared_experts"]
    dense = split // 2 + kv_down + c["router"] + c["norms"] + c["audio_projection"]  # kv_down whole on each TP rank
    expert = c["routed_experts"] // 4
    (stage,) = est.stages
    assert (stage.dense_params_per_gpu, stage.expert_params_per_gpu) == (dense, expert)
    assert stage.weight_bytes == 2 * (dense + expert) and stage.grad_bytes == 4 * (dense + expert)
    assert stage.optimizer_bytes == 12 * dense // 4 + 12 * expert // 2


def _rank_shards(layout: dict):
    """Parameters one rank of a real multi-rank tiny model holds: (pp rank, dense, expert)."""
    from megatron.core import parallel_state

    from megatron_most.model.estimate import categorize
    from megatron_most.model.most import build_model
    from megatron_most.platform import initialize

    most = preset("tiny")
    initialize(ParallelLayout(**layout), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config(ParallelLayout(**layout), perform_initialization=False))
    dense = expert = 0
    for name, p in model.named_parameters():
        if categorize(name)[0] == "routed_experts":
            expert += p.numel()
        else:
            dense += p.numel()
    return parallel_state.get_pipeline_model_parallel_rank(), dense, expert


def test_per_rank_shards_match_a_real_multi_rank_model(counted):
    # TP2 (vocabulary, attention, dense, shared split; kv_down, router, norms, audio whole) and
    # EP2 x ETP1 (four whole experts per rank) on two ranks; the PP split is Megatron's own
    # (test_uneven_pipeline_split_follows_megatron).
    layout = dict(tp=2, ep=2, etp=1, sp=True)
    (stage,) = estimate(preset("tiny"), ParallelLayout(**layout), world_size=2, counts=counted["tiny"]).stages
    for _pp_rank, dense, expert in run_distributed(_rank_shards, 2, args=(layout,), timeout_s=300):
        assert (stage.dense_params_per_gpu, stage.expert_params_per_gpu) == (dense, expert)


def test_uneven_pipeline_split_follows_megatron():
    most = preset("deepseek_v2_lite_most")  # 27 layers
    assert stage_layers(most, ParallelLayout(pp=3)) == [(0, 9), (9, 18), (18, 27)]
    assert stage_layers(most, ParallelLayout(pp=2)) == [(0, 14), (14, 27)]
    assert stage_layers(most, ParallelLayout(pp=4)) == [(0, 8), (8, 14), (14, 20), (20, 27)]
    assert stage_layers(most, ParallelLayout(pp=2), first=12) == [(0, 12), (12, 27)]
    with pytest.raises(ConfigError, match="do not split"):
        stage_layers(most, ParallelLayout(pp=4), first=5)


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "estimate.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_cli_prints_table_for_most_preset():
    out = _cli("--preset", "deepseek_v2_lite_most", "--tp", "2", "--pp", "2", "--ep", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    for label in (
        "routed_experts",
        "active per token",
        "training FLOPs per token",
        "memory per GPU",
        "TP2 PP2 EP4 ETP2 on 16 GPUs",
        "15.710B",
        "0-13",
        "14-26",
    ):
        assert label in out.stdout, (label, out.stdout)


def test_cli_rejects_bad_layout_with_config_error(capsys):
    # in-process: the layout is refused before any model or process group is built
    spec = importlib.util.spec_from_file_location("estimate_cli", ROOT / "tools" / "estimate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--preset", "deepseek_v2_lite_most", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: ParallelLayout.ep=3 does not divide num_experts=64: choose ep among [1, 2, 4, 8, 16, 32, 64]" in err
    assert cli.main(["--preset", "deepseek_v2_lite_most", "--pp", "4", "--first-stage-layers", "5"]) == 2
    assert "27 layers do not split over pp=4" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ep=3"):
        estimate(preset("tiny"), ParallelLayout(ep=3))
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by tp=3"):
        estimate(preset("tiny"), ParallelLayout(tp=3, sp=True))
    with pytest.raises(ConfigError, match="ep=3 does not divide num_experts=64"):
        estimate(preset("deepseek_v2_lite_most"), ParallelLayout(ep=3))
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by tp=3"):
        estimate(preset("tiny"), ParallelLayout(tp=3, sp=True))
