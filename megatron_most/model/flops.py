"""Training FLOPs of a MoST model from its parameter counts: the one formula the estimator, the
planner and the published-figure checks use.

Model FLOPs (what MFU counts; recomputation is extra time, not extra model FLOPs):

    per token = 6 x matmul parameters a token passes through
              + 6 x layers x heads x (qk_head_dim + v_head_dim) x seq_len

6 = 2 FLOPs per multiply-add x (forward + two backward GEMMs). Matmul parameters are the active
ones (routed experts x topk / num_experts) without the input embedding (a lookup), the norms
(elementwise) and the audio projection (only on <feat> frames). The second term is QK^T and
scores x V over the whole sequence (no causal discount: the PaLM/Megatron convention, and what
`torch.utils.flop_counter` counts for torch's attention, checked in tests/test_planner.py).
"""

from __future__ import annotations

NOT_MATMUL = ("embedding", "norms", "audio_projection")
"""Categories (model.estimate.CATEGORIES) whose parameters are no GEMM a token runs through."""


def by_category(part: dict) -> dict[str, int]:
    """{(category, rule): n} (a ParameterCounts piece) -> {category: n}."""
    out: dict[str, int] = {}
    for (category, _rule), n in part.items():
        out[category] = out.get(category, 0) + n
    return out


def active_params(categories: dict[str, int], topk: int, num_experts: int) -> int:
    """Parameters one token uses: all but the input embedding, routed experts x topk / num_experts."""
    routed = categories.get("routed_experts", 0)
    return sum(categories.values()) - categories.get("embedding", 0) - routed + routed * topk // num_experts


def matmul_params(categories: dict[str, int], topk: int, num_experts: int) -> int:
    """Active parameters that are GEMM weights (no norms, no audio projection)."""
    skip = sum(categories.get(c, 0) for c in NOT_MATMUL if c != "embedding")
    return active_params(categories, topk, num_experts) - skip


def attention_flops_per_token(layers: int, heads: int, qk_dim: int, v_dim: int, seq_len: int) -> int:
    """Training FLOPs of the attention scores (QK^T, scores x V) per token, `layers` layers."""
    return 6 * layers * heads * (qk_dim + v_dim) * seq_len


def training_flops_per_token(matmul: int, layers: int, heads: int, qk_dim: int, v_dim: int, seq_len: int) -> int:
    """Model FLOPs per token of training: 6 x matmul parameters + attention scores."""
    return 6 * matmul + attention_flops_per_token(layers, heads, qk_dim, v_dim, seq_len)


def layer_flops(most, part: dict, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of one decoder layer ({(category, rule): n}):
    `total`, and `moe_mlp` (router + routed + shared experts: what selective recompute redoes)."""
    categories = by_category(part)
    mamoe = most.mamoe
    matmul = matmul_params(categories, mamoe.topk, mamoe.num_experts)
    qk = most.qk_nope_head_dim + most.qk_rope_head_dim
    total = training_flops_per_token(matmul, 1, most.num_attention_heads, qk, most.v_head_dim, seq_len)
    moe = {c: categories.get(c, 0) for c in ("routed_experts", "shared_experts", "router")}
    return dict(total=total, moe_mlp=6 * matmul_params(moe, mamoe.topk, mamoe.num_experts))
