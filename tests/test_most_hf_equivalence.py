"""MoSTModel (text-only, vanilla MoE) computes what transformers' DeepseekV2ForCausalLM computes.

A tiny MoSTConfig with DeepSeek-V2-Lite's structure (MLA without q LoRA, YaRN factor 40, one
dense layer then MoE layers with shared experts, softmax-then-top-k routing without
renormalisation) and the DeepseekV2Config with the same numbers (tests/hf_deepseek.py) get the
same weights; their logits over the text vocabulary must agree to fp32 precision. Two negative
controls show the comparison can fail: a wrong YaRN factor in the MoSTConfig, and two routed
experts swapped in the weight mapping.
"""

import torch

from tests.multiproc import run_distributed

BATCH, SEQ, SEED = 2, 48, 0
TOLERANCE = 1e-4
SENSITIVITY = 1e-2


def tiny_text_config():
    from megatron_most.model.config import MoSTConfig
    from megatron_most.moe import MAMoEConfig

    return MoSTConfig(
        num_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        text_vocab_size=256,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=24,  # != hidden / heads: the value width must come from v_head_dim, not kv_channels
        rope_factor=40.0,
        original_max_position_embeddings=256,  # rope dim 16 / base 1e4 -> YaRN ramp over dims 0..4 of 8
        max_position_embeddings=256 * 40,
        seq_length=SEQ,
        first_k_dense=1,
        dense_ffn_size=128,
        moe_ffn_size=32,
        num_units=0,
        audio_feature_dim=0,
        mamoe=MAMoEConfig(num_experts=8, topk=2, shared_expert_size=2 * 32, variant="vanilla"),
    )


def _logits(most, state, ids):
    from megatron_most.model.most import build_model

    torch.manual_seed(SEED)
    model = build_model(most, most.transformer_config()).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=None, attention_mask=None)  # [batch, seq, padded vocab]


def _compare():
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize
    from tests import hf_deepseek

    most = tiny_text_config()
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    vocab = most.text_vocab_size

    hf = hf_deepseek.hf_model(most, seed=SEED)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits  # [batch, seq, text vocab]

    torch.manual_seed(SEED)
    state = hf_deepseek.most_state_dict(hf, build_model(most, most.transformer_config()))
    got = _logits(most, state, ids)
    assert got.shape == (BATCH, SEQ, most.tokens.padded_size), got.shape

    # negative control 1: YaRN factor 20 instead of 40 (changes the frequencies and the softmax scale)
    wrong_yarn = _logits(most.replace(rope_factor=20.0), state, ids)

    # negative control 2: routed experts 0 and 1 of the last layer swapped (the mapping is exercised)
    swapped = dict(state)
    prefix = f"decoder.layers.{most.num_layers - 1}.mlp.experts.local_experts."
    for w in ("linear_fc1.weight", "linear_fc2.weight"):
        swapped[prefix + "0." + w], swapped[prefix + "1." + w] = state[prefix + "1." + w], state[prefix + "0." + w]
    wrong_experts = _logits(most, swapped, ids)

    def diff(logits):
        return (logits[..., :vocab] - expected).abs().max().item()

    return {
        "diff": diff(got),
        "max_logit": expected.abs().max().item(),
        "wrong_yarn": diff(wrong_yarn),
        "wrong_experts": diff(wrong_experts),
        "finite": bool(torch.isfinite(got).all()),
    }


def test_most_matches_hf_deepseek_v2():
    result = run_distributed(_compare, 1, timeout_s=300)[0]
    print(result)
    assert result["finite"]
    assert result["max_logit"] > 0.5, result  # the logits are not trivially small
    assert result["diff"] < TOLERANCE, result
    assert result["wrong_yarn"] > SENSITIVITY, result
    assert result["wrong_experts"] > SENSITIVITY, result
