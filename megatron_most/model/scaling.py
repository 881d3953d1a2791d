"""The MoST scaling family: a whole architecture from four numbers (width, depth, routed
experts, text/audio group split), for scaling studies on one code path.

    family_fields(width=2048, depth=24, experts=64)  ->  MoSTConfig keyword arguments

Rules (DeepSeek-V2's proportions; every split size divides by 8 so TP/ETP up to 8 fit):

    heads            width / 128, with MLA head widths qk_nope 128, qk_rope 64, v 128
    q_lora_rank      None below width 4096 (as V2-Lite), else 0.3 x width rounded to 128 (V2: 1536)
    kv_lora_rank     512 from width 2048 (both V2 and V2-Lite), width / 4 below
    dense_ffn_size   2.4 x width rounded to 128 (V2: 12288 at 5120)
    moe_ffn_size     0.3 x width rounded to 64, at least 64 (V2: 1536 at 5120)
    shared experts   2 x moe_ffn_size wide (two shared experts)
    first_k_dense    1; topk 6 (at most the smaller group's size)
    text experts     the first round(experts x text_share) indices, audio the rest
    vocabulary       DeepSeek's 102400 text ids + 500 units + 768-d HuBERT features

This module is arithmetic only (no MoSTConfig import): model.config builds the named points
of `FAMILY` into presets `most_<name>`, so config.py stays free of import cycles.
"""

from __future__ import annotations

from megatron_most.moe.config import MAMoEConfig
from megatron_most.options import require

FAMILY = {
    # name: (width, depth, routed experts); text_share 0.5 for all
    "xs": (256, 4, 8),  # ~0.1B: trains on one CPU / one small GPU
    "s": (1024, 12, 32),  # ~2B: one node
    "m": (2048, 24, 64),  # ~13B, V2-Lite-sized: a few nodes
    "l": (4096, 40, 128),  # ~110B: tens of nodes
    "xl": (5120, 60, 160),  # ~250B, V2-sized: hundreds of GPUs
    "xxl": (7168, 60, 256),  # ~680B, V3-sized: a thousand GPUs
}
"""Named points of the family (MoSTConfig presets `most_xs` .. `most_xxl`)."""


def _round(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


def family_fields(width: int, depth: int, experts: int, text_share: float = 0.5, topk: int = 6) -> dict:
    """MoSTConfig keyword arguments of the family member (see the module docstring for the rules)."""
    require(width >= 128 and width % 128 == 0, f"scaling width={width}: must be a multiple of 128")
    require(depth >= 2, f"scaling depth={depth}: must be >= 2 (one dense layer, then MoE layers)")
    require(experts >= 2, f"scaling experts={experts}: must be >= 2")
    require(0 < text_share < 1, f"scaling text_share={text_share}: must be within (0, 1)")
    text = min(experts - 1, max(1, round(experts * text_share)))
    moe_ffn = _round(0.3 * width, 64)
    return dict(
        num_layers=depth,
        hidden_size=width,
        num_attention_heads=width // 128,
        q_lora_rank=None if width < 4096 else _round(0.3 * width, 128),
        kv_lora_rank=512 if width >= 2048 else width // 4,
        dense_ffn_size=_round(2.4 * width, 128),
        moe_ffn_size=moe_ffn,
        first_k_dense=1,
        mamoe=MAMoEConfig(
            num_experts=experts,
            text_experts=tuple(range(text)),
            topk=min(topk, text, experts - text),
            shared_expert_size=2 * moe_ffn,
        ),
    )
