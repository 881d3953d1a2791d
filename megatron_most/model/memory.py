"""Activation memory of a MoST training step: bytes saved for backward per token, per layer.

Counted as the tensors autograd keeps (Korthikanti et al., "Reducing Activation Recomputation",
extended to MLA and routed experts), per token of a micro-batch, for two kernel sets:

    "te"     the GPU path: Transformer Engine norms fused into the linears, flash attention
             (q, k, v, output and fp32 softmax statistics; no score matrix), fused SwiGLU
             (fc1 output + SwiGLU output)
    "local"  the CPU path of this repo (Megatron's local spec, torch SDPA math kernel): every
             norm keeps input, output and 1/rms, some linears a copy of their input, the score
             matrix [heads, seq] per token, SwiGLU five intermediates

"local" is checked against the bytes autograd really saves in a training step on the CPU
(tests/test_planner.py); "te" differs from it only in the terms named above.
Sequence parallelism splits every per-token term over TP (tokens or heads are split); routed
experts see topk copies of each token, gathered over expert-TP (input whole, intermediates
split). Router tensors are fp32/bool/int64 whatever the compute dtype.
Recompute (Megatron's, as training.loop sets it):
    none       everything above
    selective  recompute_modules=["moe"]: a MoE layer keeps none of its MLP block (router,
               dispatch, experts, shared experts), only its input, which the norm keeps anyway
    full       recompute_granularity=full, 1 layer per chunk: each layer keeps its input
               [tokens, hidden]; one layer's full activations exist again during its backward
"""

from __future__ import annotations

RECOMPUTE = ("none", "selective", "full")
KERNELS = ("te", "local")


def _attention_elements(most, seq_len: int, kernels: str) -> float:
    """Elements saved per token by one MLA attention block and its input norm (TP=1)."""
    h, heads = most.hidden_size, most.num_attention_heads
    qk, v, rope, kv = (
        most.qk_nope_head_dim + most.qk_rope_head_dim,
        most.v_head_dim,
        most.qk_rope_head_dim,
        most.kv_lora_rank,
    )
    local = kernels == "local"
    norm = 2 * h + 1  # input, output (the linears' input), 1/rms
    down = (kv + rope) + 1 + kv + (h + kv if local else 0)  # kv_down out, its norm; local: input copies
    if most.q_lora_rank is not None:
        down += 2 * most.q_lora_rank + 1 + (most.q_lora_rank if local else 0)
    rotary = 4 * rope  # rotated key/query pieces
    qkv = heads * (2 * qk + v)
    scores = heads * seq_len if local else heads * (v + 2)  # local: score matrix; flash: output + fp32 lse
    return norm + down + rotary + qkv + scores + heads * v  # + output projection input


def _mlp_elements(h: int, ffn: int, kernels: str) -> float:
    """A SwiGLU MLP per token: input (+ local copy), fc1 output and SwiGLU intermediates."""
    return h + (5 * ffn if kernels == "local" else 3 * ffn)


def layer_bytes(most, moe: bool, seq_len: int, tp: int, etp: int, dtype_bytes: int, kernels: str = "te") -> dict:
    """Bytes per token one layer saves: {"attention", "mlp", "router", "input"} (tp = SP split)."""
    h = most.hidden_size
    attention = _attention_elements(most, seq_len, kernels) + 2 * h + 1  # + pre-MLP norm
    mamoe = most.mamoe
    router = 0.0
    if not moe:
        mlp = _mlp_elements(h, most.dense_ffn_size, kernels)
    else:
        f, k = most.moe_ffn_size, mamoe.topk
        shared = _mlp_elements(h, mamoe.shared_expert_size, kernels) if mamoe.has_shared_experts else 0
        # each token reaches topk experts: its permuted copy (gathered whole over ETP) + intermediates
        routed = k * h * etp + k * ((6 if kernels == "local" else 3) * f + 1)
        mlp = shared + routed
        router = 2 * (5 * mamoe.num_experts + 8 * k)  # probs fp32 + masks bool + indices int64 (bytes)
    return dict(
        attention=attention * dtype_bytes / tp,
        mlp=mlp * dtype_bytes / tp,
        router=router / tp,
        input=h * dtype_bytes / tp,
    )


def stored_bytes(layer: dict, moe: bool, recompute: str) -> float:
    """Bytes per token a layer keeps between its forward and backward under `recompute`."""
    if recompute == "full":
        return layer["input"]
    if recompute == "selective" and moe:
        return layer["attention"]
    return layer["attention"] + layer["mlp"] + layer["router"]


def head_bytes(most, dtype_bytes: int, tp: int, first: bool, last: bool, kernels: str = "te") -> float:
    """Bytes per token outside the layers: token ids on the first stage; on the last, the final
    norm, the output layer's input and the fp32 softmax the vocabulary-parallel loss keeps."""
    out = 8.0 if first else 0.0
    if last:
        h = most.hidden_size
        out += (2 * h + 1 + (h if kernels == "local" else 0)) * dtype_bytes / tp + 4 * most.tokens.padded_size / tp
    return out


def dispatch_bytes(most, tokens: int, tp: int, etp: int, dtype_bytes: int) -> float:
    """All-to-all send + receive buffers of one MoE layer's dispatch (transient): topk copies of
    each local token, gathered over expert-TP."""
    return 2 * tokens * most.mamoe.topk * most.hidden_size * dtype_bytes * etp / tp


def stage_activations(
    most,
    layers: range,
    seq_len: int,
    tp: int,
    etp: int,
    dtype_bytes: int,
    kernels: str,
    recompute: str,
    first: bool,
    last: bool,
) -> tuple[float, float]:
    """(bytes per token a pipeline stage keeps for one micro-batch, bytes per token of its largest
    layer without recompute: the working set full recompute rebuilds during backward)."""
    kept = head_bytes(most, dtype_bytes, tp, first, last, kernels)
    largest = 0.0
    for i in layers:
        moe = i >= most.first_k_dense
        sizes = layer_bytes(most, moe, seq_len, tp, etp, dtype_bytes, kernels)
        kept += stored_bytes(sizes, moe, recompute)
        largest = max(largest, stored_bytes(sizes, moe, "none"))
    return kept, largest


def in_flight(pp: int, vpp: int | None, stage: int, micro_batches: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at once under 1F1B: pp - stage
    (at most the step's micro-batches); interleaved with vpp chunks, the first stage holds
    pp x (1 + (pp - 1) / (pp x vpp)) chunk-stages' worth (Korthikanti et al., section 4.2.3)."""
    if pp == 1:
        return 1.0
    if vpp and vpp > 1:
        return (pp - stage) * (1 + (pp - 1) / (pp * vpp))
    return float(min(pp - stage, micro_batches))
