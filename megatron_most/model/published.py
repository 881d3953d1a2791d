"""Published Megatron-Core MoE throughputs the planner's projection is checked against.

    Mixtral 8x7B   64 H100, TP1 PP4 (VPP8) EP8, bf16: 468 TFLOP/s per GPU (Megatron-Core MoE
                   docs, MCore v0.9; seq 4096, global batch 256, micro-batch 1 assumed)
    DeepSeek-V3    1024 H100, TP2 PP8 (VPP4) EP64, FP8: 338 TFLOP/s per GPU (Megatron-Core MoE
                   docs; seq 4096, global batch 8192, micro-batch 1, selective recompute,
                   all-to-all overlapped with compute as in its recipe)

Both run with overlapped gradient reduce / parameter gather (overlap "dp"). Mixtral has
grouped-query attention, which MoSTConfig does not express: `mixtral_8x7b()` is an MLA
stand-in whose attention parameters (within 0.1%) and score FLOPs (exactly: 32 heads x
(128 + 128)) equal Mixtral's, with Mixtral's experts (8 x 14336, top-2), no shared expert, no
dense layer and its 32000-token vocabulary; its MLA latent activations differ from GQA's
key/value cache, which changes memory a little and throughput not at all in this model.
"""

from __future__ import annotations

import dataclasses

from megatron_most.model.config import MoSTConfig, preset
from megatron_most.model.planner import Setting, evaluate
from megatron_most.moe.config import MAMoEConfig


def mixtral_8x7b() -> MoSTConfig:
    """Mixtral 8x7B's sizes as a MoSTConfig (see the module docstring)."""
    return MoSTConfig(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        text_vocab_size=32000,
        kv_lora_rank=794,  # MLA kv down + up = 10240 x 794 + 262144 ~ GQA's 2 x 4096 x 1024
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense=0,
        dense_ffn_size=14336,
        moe_ffn_size=14336,
        num_units=0,
        audio_feature_dim=0,
        mamoe=MAMoEConfig(num_experts=8, topk=2, shared_expert_size=0, variant="vanilla"),
    )


@dataclasses.dataclass(frozen=True)
class Published:
    name: str
    model: str
    gpu: str
    gpus: int
    layout: dict
    """tp, pp, ep, etp, vpp, micro_batch, recompute."""
    precision: str
    seq_length: int
    global_batch: int
    overlap: tuple[str, ...]
    tflops_per_gpu: float
    """The published figure."""


PUBLISHED = (
    Published(
        "Mixtral 8x7B", "mixtral_8x7b", "h100-80g", 64,
        dict(tp=1, pp=4, ep=8, etp=1, vpp=8, micro_batch=1, recompute="none"),
        "bf16", 4096, 256, ("dp",), 468.0,
    ),
    Published(
        "DeepSeek-V3", "deepseek_v3_text", "h100-80g", 1024,
        dict(tp=2, pp=8, ep=64, etp=1, vpp=4, micro_batch=1, recompute="selective"),
        "fp8", 4096, 8192, ("dp", "ep"), 338.0,
    ),
)  # fmt: skip


def project(entry: Published):
    """The planner's Plan for a published run's exact layout."""
    most = mixtral_8x7b() if entry.model == "mixtral_8x7b" else preset(entry.model)
    setting = Setting(
        most, entry.model, entry.gpu, entry.gpus, entry.seq_length, entry.global_batch, entry.precision, 0.5,
        frozenset(entry.overlap), "te",
    )  # fmt: skip
    from megatron_most.model.estimate import count_parameters

    return evaluate(setting, count_parameters(most), placement=most.mamoe.placement, **entry.layout)
