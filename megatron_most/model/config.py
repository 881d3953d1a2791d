"""MoST architecture options and presets (DeepSeek-V2-Lite numbers from MOST_SPEC.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.nn.functional as F
from megatron.core.transformer import MLATransformerConfig

from megatron_most.model.fields import megatron_fields
from megatron_most.model.scaling import FAMILY, family_fields
from megatron_most.model.vocab import TokenLayout, check_vocab
from megatron_most.moe.config import MAMoEConfig
from megatron_most.options import options, require
from megatron_most.platform import fusion_settings, precision_settings
from megatron_most.platform.layout import ParallelLayout


@options
class MoSTConfig:
    num_layers: int = 27
    """Decoder layers."""
    hidden_size: int = 2048
    """Model width."""
    num_attention_heads: int = 16
    """Attention heads."""
    text_vocab_size: int = 102400
    """Base tokenizer's vocabulary (audio markers and units are appended after it)."""
    q_lora_rank: int | None = None
    """MLA: width of the compressed query latent (query LoRA: q_down -> norm -> q_up, as
    DeepSeek-V2/V3's 1536); None = one full query projection (DeepSeek-V2-Lite). Checkpoint
    conversion supports None only (convert.mapping refuses a query LoRA)."""
    kv_lora_rank: int = 512
    """MLA: width of the compressed key/value latent."""
    qk_nope_head_dim: int = 128
    """MLA: per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 64
    """MLA: per-head query/key width with (YaRN) rotary embedding."""
    v_head_dim: int = 128
    """MLA: per-head value width."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 40.0
    """YaRN scaling factor."""
    original_max_position_embeddings: int = 4096
    """YaRN: context length of the pre-scaling model."""
    beta_fast: float = 32.0
    """YaRN correction range (fast)."""
    beta_slow: float = 1.0
    """YaRN correction range (slow)."""
    mscale: float = 0.707
    """YaRN attention-temperature scale."""
    mscale_all_dim: float = 0.707
    """YaRN mscale over all dims (enters the softmax scale squared)."""
    max_position_embeddings: int = 163840
    """Longest context the position encoding is defined for."""
    first_k_dense: int = 1
    """Leading dense layers before the MoE layers (DeepSeek first_k_dense_replace)."""
    dense_ffn_size: int = 10944
    """SwiGLU width of the dense layers."""
    moe_ffn_size: int = 1408
    """SwiGLU width of each routed expert."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    mamoe: MAMoEConfig = dataclasses.field(default_factory=lambda: MAMoEConfig(shared_expert_size=2 * 1408))
    """Routed/shared experts and modality-aware routing (see moe.config)."""
    num_units: int = 500
    """Discrete audio units [Hu0]..[Hu{K-1}] added to the vocabulary; 0 = no discrete path."""
    audio_feature_dim: int = 768
    """Width of continuous HuBERT features projected into the model; 0 = no continuous path."""
    seq_length: int = 4096
    """Training sequence length (longer batches are refused)."""
    init_std: float = 0.006
    """Std of the normal weight init (DeepSeek-V2 initializer_range)."""
    validate_inputs: bool = True
    """Check every batch on the first pipeline stage (token ids in range, <boa>/<eoa> pairs,
    feature frames per span, sequence length) and name the sample on error; costs a host sync."""

    def __post_init__(self):
        check_vocab(self.text_vocab_size, self.num_units)
        require(
            0 <= self.first_k_dense <= self.num_layers,
            f"MoSTConfig.first_k_dense={self.first_k_dense}: must be within 0..num_layers={self.num_layers}",
        )
        require(
            self.q_lora_rank is None or self.q_lora_rank >= 1,
            f"MoSTConfig.q_lora_rank={self.q_lora_rank}: must be None (no query LoRA) or >= 1",
        )
        require(self.audio_feature_dim >= 0, f"MoSTConfig.audio_feature_dim={self.audio_feature_dim}: must be >= 0")
        require(
            self.seq_length <= self.max_position_embeddings,
            f"MoSTConfig.seq_length={self.seq_length} exceeds max_position_embeddings={self.max_position_embeddings}",
        )

    @property
    def tokens(self) -> TokenLayout:
        return TokenLayout(self.text_vocab_size, self.num_units, audio=bool(self.num_units or self.audio_feature_dim))

    def replace(self, **changes) -> "MoSTConfig":
        return dataclasses.replace(self, **changes)

    SHAPE_FIELDS = (
        "num_layers", "hidden_size", "num_attention_heads", "text_vocab_size", "q_lora_rank", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense", "dense_ffn_size", "moe_ffn_size",
        "num_units", "audio_feature_dim",
    )  # fmt: skip
    """Fields that set a tensor's shape (the rest change behaviour: a checkpoint still loads)."""

    def shape_differences(self, other: "MoSTConfig") -> list[str]:
        """'field: self -> other' for every difference in tensor shapes between two models."""
        pairs = [(f, getattr(self, f), getattr(other, f)) for f in self.SHAPE_FIELDS]
        a, b = self.mamoe, other.mamoe
        pairs += [
            ("mamoe.num_experts", a.num_experts, b.num_experts),
            (
                "shared experts",
                a.shared_expert_size * a.has_shared_experts,
                b.shared_expert_size * b.has_shared_experts,
            ),
        ]
        return [f"{name}: {x} -> {y}" for name, x, y in pairs if x != y]

    def transformer_config(
        self, layout: ParallelLayout | None = None, *, precision: str = "auto", ddp: bool = False, **overrides
    ):
        """Megatron's MLATransformerConfig for this architecture at `layout`.

        precision: "auto" (bf16 on GPUs, fp32 on CPUs), "bf16" or "fp32" (platform.precision_settings).
        ddp: the model will be trained DDP-wrapped (allows gradient-accumulation fusion).
        """

        layout = layout or ParallelLayout()
        fields = dict(
            **megatron_fields(self),  # the correspondences of model.fields.FIELDS
            qk_layernorm=True,  # the local MLA spec drops kv_a_layernorm without it
            rope_type="yarn",
            rotary_interleaved=False,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tp,
            sequence_parallel=layout.sp,
            **self.mamoe.megatron_fields(),
            **precision_settings(precision),
            **fusion_settings(ddp=ddp),
        )
        if not {"num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"} & set(overrides):
            fields.update(self._pipeline_split(layout.pp))
        fields.update(overrides)
        return MLATransformerConfig(**fields)

    def _pipeline_split(self, pp: int) -> dict:
        """Layers that do not divide by PP (27 over 2 or 4): the remainder goes to the first and
        last stages (first gets the extra one), the middle stages take num_layers // pp each."""
        require(pp <= self.num_layers, f"pipeline-parallel size {pp} exceeds num_layers={self.num_layers}: lower pp")
        if pp == 1 or self.num_layers % pp == 0:
            return {}
        base, rest = divmod(self.num_layers, pp)
        return dict(
            num_layers_in_first_pipeline_stage=base + (rest + 1) // 2,
            num_layers_in_last_pipeline_stage=base + rest // 2,
        )


CONFIG_NAME = "most_config.json"
"""The MoSTConfig next to every checkpoint (converted or trained): what megatron-to-hf,
`--load` / `--pretrained-checkpoint` checks and the estimator read."""


def write_config(directory, most: MoSTConfig) -> None:
    """most_config.json in `directory`."""
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(most), indent=1, default=list))


def read_config(directory) -> MoSTConfig:
    """The MoSTConfig of most_config.json in `directory` (FileNotFoundError naming it if absent)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the checkpoint's MoSTConfig is written next to it by training and conversion"
        )
    values = json.loads(path.read_text())
    mamoe = dict(values.pop("mamoe"))
    for key in ("text_experts", "audio_experts"):
        if mamoe.get(key) is not None:
            mamoe[key] = tuple(mamoe[key])
    return MoSTConfig.from_dict({**values, "mamoe": MAMoEConfig.from_dict(mamoe)})


def deepseek_v2_lite_most() -> MoSTConfig:
    """DeepSeek-V2-Lite + MAMoE (text experts 0..31, audio 32..63) + 500 units + 768-d features."""
    return MoSTConfig()


def deepseek_v2_lite() -> MoSTConfig:
    """The text-only base model: vanilla MoE routing, no audio paths."""
    return _text_only(MoSTConfig())


def deepseek_v2_most() -> MoSTConfig:
    """DeepSeek-V2 (236B total, 21B active) + MAMoE (text experts 0..79, audio 80..159) + 500 units
    + 768-d features: 60 layers of width 5120, 128 MLA heads with query LoRA 1536, one dense layer
    (12288), 160 routed experts (1536 wide, top-6) and 2 shared. DeepSeek-V2's device-limited
    routing (n_group 8, topk_group 3) and routed_scaling_factor 16 are routing details MAMoE does
    not model; they change neither sizes nor FLOPs (the planner's concern)."""
    return MoSTConfig(
        num_layers=60,
        hidden_size=5120,
        num_attention_heads=128,
        q_lora_rank=1536,
        first_k_dense=1,
        dense_ffn_size=12288,
        moe_ffn_size=1536,
        mamoe=MAMoEConfig(num_experts=160, topk=6, shared_expert_size=2 * 1536, balance_coeff=0.003),
    )


def deepseek_v2() -> MoSTConfig:
    """The text-only DeepSeek-V2 shape: vanilla MoE routing, no audio paths."""
    return _text_only(deepseek_v2_most())


def deepseek_v3_text() -> MoSTConfig:
    """DeepSeek-V3's shape (671B total, 37B active; text only, vanilla softmax routing): 61 layers
    of width 7168, 128 MLA heads, q-LoRA 1536, 3 dense layers (18432), 256 routed experts (2048,
    top-8) and 1 shared. For the planner's check against Megatron's published throughput; V3's
    sigmoid router, multi-token prediction and FP8 recipe are not modelled."""
    base = MoSTConfig(
        num_layers=61,
        hidden_size=7168,
        num_attention_heads=128,
        q_lora_rank=1536,
        text_vocab_size=129280,
        first_k_dense=3,
        dense_ffn_size=18432,
        moe_ffn_size=2048,
        mamoe=MAMoEConfig(num_experts=256, topk=8, shared_expert_size=2048),
    )
    return _text_only(base)


def _text_only(most: MoSTConfig) -> MoSTConfig:
    return most.replace(num_units=0, audio_feature_dim=0, mamoe=dataclasses.replace(most.mamoe, variant="vanilla"))


def scaled(width: int, depth: int, experts: int, text_share: float = 0.5, topk: int = 6) -> MoSTConfig:
    """A member of the MoST scaling family (model/scaling.py: the rules)."""
    return MoSTConfig(**family_fields(width, depth, experts, text_share, topk))


def tiny() -> MoSTConfig:
    """Same structure at a size that trains on a CPU in minutes."""
    return MoSTConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        text_vocab_size=256,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        original_max_position_embeddings=64,
        max_position_embeddings=2560,
        dense_ffn_size=128,
        moe_ffn_size=32,
        num_units=32,
        audio_feature_dim=16,
        seq_length=256,
        init_std=0.02,
        mamoe=MAMoEConfig(num_experts=8, topk=2, shared_expert_size=64, balance_coeff=0.01),
    )


def small() -> MoSTConfig:
    """The quickstart's model (~1.5M parameters, ~0.8M active): trains on 2 CPU cores in minutes and
    learns ASR from 80-bin log-mel features stacked to 25 Hz (320-d) and TTS into 128 units.
    Measured in ASR-only runs on the quickstart corpus: plain RoPE reached a lower ASR loss than
    YaRN x40 at equal steps (1.68 vs 1.75 after 200 steps)."""
    return MoSTConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        text_vocab_size=320,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope_factor=1.0,  # plain RoPE: YaRN x40 over 64 positions would flatten most rotary frequencies
        original_max_position_embeddings=64,
        max_position_embeddings=2560,
        dense_ffn_size=384,
        moe_ffn_size=96,
        num_units=128,
        audio_feature_dim=320,
        seq_length=512,
        init_std=0.02,
        mamoe=MAMoEConfig(num_experts=8, topk=2, shared_expert_size=192, balance_coeff=0.01),
    )


PRESETS = {
    "deepseek_v2_lite_most": deepseek_v2_lite_most,
    "deepseek_v2_lite": deepseek_v2_lite,
    "tiny": tiny,
    "small": small,
    "deepseek_v2_most": deepseek_v2_most,
    "deepseek_v2": deepseek_v2,
    "deepseek_v3_text": deepseek_v3_text,
    **{f"most_{name}": (lambda point=point: scaled(*point)) for name, point in FAMILY.items()},
}
"""Named architectures; `most_xs` .. `most_xxl` are the scaling family's points (model/scaling.py)."""


def preset(name: str) -> MoSTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
