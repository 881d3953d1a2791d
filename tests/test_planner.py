"""The layout planner against what can be measured: FLOPs of a real training step
(torch.utils.flop_counter), activation bytes autograd saves in it and model-state bytes after an
optimizer step (CPU), parameter counts of built models and published sizes, and Megatron's
published MoE throughputs; plus the planner's enumeration, its CLI and the new presets."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from megatron_most.model.config import PRESETS, preset
from megatron_most.model.estimate import count_parameters, estimate
from megatron_most.options import ConfigError
from tests.multiproc import run_distributed

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH = 256, 2


def _measure(name: str, seq: int, batch: int, q_lora_rank=None):
    """One training step of a real model on this CPU: FLOPs by op, bytes of the non-parameter
    tensors autograd saves, parameter/grad/Adam-state bytes, and the parameter count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize

    most = preset(name).replace(q_lora_rank=q_lora_rank)
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config())
    torch.manual_seed(0)
    ids = torch.randint(0, most.text_vocab_size, (batch, seq))
    positions = torch.arange(seq).expand_as(ids)
    labels = torch.randint(0, most.text_vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, positions, None, labels=labels).sum().backward()
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, positions, None, labels=labels).sum()
    loss.backward()
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    return dict(
        flops=flops,
        activations=sum(saved.values()),
        states=sum(t.numel() * t.element_size() for t in tensors),
        params=sum(p.numel() for p in model.parameters()),
    )


def _measure_both():
    from megatron_most.platform import shutdown

    small = _measure("small", SEQ, BATCH)
    shutdown()
    return {"small": small, "tiny_qlora": _measure("tiny", SEQ, BATCH, q_lora_rank=24)}


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_both, 1, timeout_s=300)[0]


@pytest.mark.parametrize("name, q_lora", [("small", None), ("tiny", 24)])
def test_flops_match_flop_counter(measured, name, q_lora):
    got = measured["small" if name == "small" else "tiny_qlora"]
    most = preset(name).replace(q_lora_rank=q_lora)
    est = estimate(most, seq_len=SEQ, micro_batch=BATCH)
    counted = sum(got["flops"].values())
    assert abs(est.flops_per_micro_batch / counted - 1) < 0.02, (est.flops_per_micro_batch, got["flops"])
    # attention scores are the batched matmuls (torch's CPU attention): exactly the analytic term
    assert got["flops"]["aten.bmm"] == est.attention_flops_per_token * SEQ * BATCH


@pytest.mark.parametrize("name, q_lora", [("small", None), ("tiny", 24)])
def test_memory_matches_a_cpu_training_step(measured, name, q_lora):
    """Activations: the "local" kernel model in fp32 against the bytes autograd saves; model
    states: fp32 weights + grads + two Adam moments (no master copy on the CPU) against the
    tensors after an optimizer step. Not seen here: the GPU's bf16/fp32 mix, TE and flash
    kernels (the "te" terms), CUDA/NCCL workspaces, transient buffers, fragmentation."""
    from megatron_most.model.memory import stage_activations

    got = measured["small" if name == "small" else "tiny_qlora"]
    most = preset(name).replace(q_lora_rank=q_lora)
    per_token, _ = stage_activations(most, range(most.num_layers), SEQ, 1, 1, 4, "local", "none", True, True)
    assert abs(per_token * SEQ * BATCH / got["activations"] - 1) < 0.10, (per_token * SEQ * BATCH, got)
    states = estimate(most).total * (4 + 4 + 8)
    assert abs(states / got["states"] - 1) < 0.10 and got["params"] == estimate(most).total


def test_parameter_counts_match_published_sizes():
    from megatron_most.model.published import mixtral_8x7b

    def sizes(most):
        est = estimate(most, counts=count_parameters(most))
        return est.total / 1e9, est.active / 1e9

    total, active = sizes(preset("deepseek_v2_most"))
    assert abs(total - 236) < 1 and abs(active - 21) < 0.5, (total, active)  # "236B total, 21B activated"
    total, active = sizes(preset("deepseek_v3_text"))
    assert abs(total - 671) < 2 and abs(active - 37) < 1, (total, active)  # "671B, 37B activated"
    total, active = sizes(mixtral_8x7b())
    assert abs(total - 46.7) < 0.3 and abs(active - 12.9) < 0.2, (total, active)  # "46.7B, 12.9B active"


def test_scaling_family_grows_and_every_preset_builds():
    totals = [estimate(preset(f"most_{n}")).total for n in ("xs", "s", "m", "l", "xl", "xxl")]
    assert totals == sorted(totals) and totals[0] < 0.2e9 and totals[-1] > 500e9, totals
    for name in PRESETS:
        most = preset(name)
        assert most.shape_differences(most) == []
    xl = preset("most_xl")
    assert (xl.q_lora_rank, xl.dense_ffn_size, xl.moe_ffn_size, xl.mamoe.groups()[0]) == (
        1536,
        12288,
        1536,
        tuple(range(80)),
    )


def test_published_throughput_within_stated_factor():
    from megatron_most.model.published import PUBLISHED, project

    for entry in PUBLISHED:
        ratio = project(entry).tflops_per_gpu / entry.tflops_per_gpu
        assert 1 / 1.5 < ratio < 1.5, (entry.name, ratio)


def test_plan_enumerates_valid_layouts_ranked():
    from megatron_most.model.planner import plan
    from megatron_most.training.config import TrainConfig

    plans = plan(preset("deepseek_v2_lite_most"), 48, "a100-80g", name="deepseek_v2_lite_most")
    assert plans[0].fits and all(p.tp * p.pp * p.dp == 48 for p in plans)
    fitting = [p.step_time for p in plans if p.fits]
    assert fitting == sorted(fitting) and len(fitting) < len(plans)  # some do not fit (PP1 TP1 EP1)
    for p in plans:
        assert p.global_batch == p.dp * p.micro_batch * p.micro_batches
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(plans[0].train_args()) <= names
    # more recompute: less memory, more time
    same = [p for p in plans if (p.tp, p.pp, p.vpp, p.ep, p.etp, p.micro_batch) == (1, 1, None, 8, 1, 1)]
    by = {p.recompute or "none": p for p in same}
    assert by["none"].memory["activations"] > by["selective"].memory["activations"] > by["full"].memory["activations"]
    assert by["none"].step_time < by["selective"].step_time < by["full"].step_time


def test_contiguous_placement_is_imbalanced_by_modality():
    from megatron_most.model.comm import placement_imbalance

    mamoe = preset("deepseek_v2_lite_most").mamoe  # text 0..31, audio 32..63
    assert placement_imbalance(mamoe, 8, 0.8, "balanced") == pytest.approx(1.0)
    assert placement_imbalance(mamoe, 8, 0.8, "contiguous") == pytest.approx(1.6)  # audio ranks get 0.8 / 0.5
    assert placement_imbalance(preset("deepseek_v2_lite").mamoe, 8, 0.8) == 1.0  # vanilla routing


def test_cli_table_json_and_bad_input(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan_layout.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "plans.json"
    assert cli.main(["--preset", "small", "--gpus", "8", "--gpu", "h100-80g", "--top", "3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 1 | TP" in table and "TFLOP/s/GPU" in table
    import json

    rows = json.loads(out.read_text())
    assert rows[0]["train_args"]["tensor_model_parallel_size"] == rows[0]["tp"]
    assert cli.main(["--preset", "small", "--gpus", "12", "--gpu", "h100-80g"]) == 2
    assert "gpus=12: use whole nodes of 8 GPUs" in capsys.readouterr().err
    assert cli.main(["--preset", "small", "--gpus", "8", "--gpu", "v100"]) == 2
    assert "gpu='v100': unknown GPU; choose one of" in capsys.readouterr().err
    assert cli.main(["--preset", "small", "--gpus", "8", "--gpu", "a100-80g", "--precision", "fp8"]) == 2
    assert "no FP8 tensor cores" in capsys.readouterr().err


def test_conversion_refuses_query_lora():
    from megatron_most.convert import mapping
    from megatron_most.convert.hf_config import hf_config_fields

    most = preset("deepseek_v2_most")
    assert most.transformer_config().q_lora_rank == 1536
    with pytest.raises(ConfigError, match="MoSTConfig.q_lora_rank=1536: checkpoint conversion supports"):
        list(mapping.items(most))
    with pytest.raises(ConfigError, match="q_lora_rank=1536"):
        hf_config_fields(most)
    with pytest.raises(ConfigError, match="q_lora_rank=0"):
        preset("tiny").replace(q_lora_rank=0)
