"""The HF remote-code MoST model (megatron_most/convert/hf_most) computes what MoSTModel computes.

A tiny MoSTModel with MAMoE routing, 32 unit tokens and 16-d continuous audio features (every
tensor random) runs in a spawned process (platform.initialize enables a process-wide compat
layer); its weights go to `MoSTForCausalLM` through the HF<->Megatron name table
(convert/mapping.py, inverted here; the audio projection as model.audio_projection.*). On a batch
with text, unit tokens and <boa> <feat>... <eoa> spans with audio features, the logits must agree
to fp32 precision for both masking rules, and the HF loss (unshifted labels, <feat> targets
dropped) must equal Megatron's lm_loss. Negative controls: the other masking rule and
all-text modality ids change the logits. The model also round-trips through save_pretrained +
the two code files + auto_map and `AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`,
and cached greedy generation matches an uncached greedy loop.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.multiproc import run_distributed

BATCH, SEQ, SEED = 2, 32, 0
TOLERANCE = 1e-4
SENSITIVITY = 1e-3
MASKINGS = ("zero_after_softmax", "renormalize_in_group")


def _most(masking: str):
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
        v_head_dim=24,
        rope_factor=40.0,
        original_max_position_embeddings=256,
        max_position_embeddings=256 * 40,
        seq_length=SEQ,
        first_k_dense=1,
        dense_ffn_size=128,
        moe_ffn_size=32,
        num_units=32,
        audio_feature_dim=16,
        mamoe=MAMoEConfig(num_experts=8, topk=2, shared_expert_size=2 * 32, masking=masking),
    )


def _inputs(tokens):
    """Two samples: text, <boa> <feat>x5 <eoa>, units / units, <boa> <feat>x4 <eoa>; features [9, 16]."""
    gen = torch.Generator().manual_seed(SEED + 1)
    text = lambda n: torch.randint(0, tokens.text_vocab_size, (n,), generator=gen)  # noqa: E731
    units = lambda n: tokens.unit(torch.randint(0, tokens.num_units, (n,), generator=gen))  # noqa: E731
    feat = lambda n: torch.full((n,), tokens.feature)  # noqa: E731
    boa, eoa = torch.tensor([tokens.boa]), torch.tensor([tokens.eoa])
    rows = [
        torch.cat([text(6), boa, feat(5), eoa, text(4), units(8), text(7)]),
        torch.cat([text(3), units(10), text(3), boa, feat(4), eoa, text(10)]),
    ]
    ids = torch.stack(rows)
    assert ids.shape == (BATCH, SEQ)
    features = torch.randn(9, 16, generator=gen)
    return ids, features


def _megatron_side():
    """Random MoSTModel weights and its logits under both masking rules (same weights)."""
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), num_experts=8)
    most = _most(MASKINGS[0])
    ids, features = _inputs(most.tokens)
    torch.manual_seed(SEED)
    model = build_model(most, most.transformer_config()).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    from megatron_most.model.loss import lm_loss

    labels = torch.roll(ids, -1, dims=1)  # Megatron labels are pre-shifted; the last position has no target
    loss_mask = torch.ones(ids.shape)
    loss_mask[:, -1] = 0
    logits, losses = {}, {}
    for masking in MASKINGS:
        cfg = _most(masking)
        torch.manual_seed(SEED)
        m = build_model(cfg, cfg.transformer_config()).eval()
        m.load_state_dict(state, strict=False)
        with torch.no_grad():
            logits[masking] = m(input_ids=ids, position_ids=None, attention_mask=None, audio_features=features).clone()
            per_token = m(input_ids=ids, position_ids=None, attention_mask=None, labels=labels, audio_features=features)
            losses[masking] = lm_loss(per_token, labels, loss_mask, cfg.tokens)[0].item()
    return {"state": state, "ids": ids, "features": features, "logits": logits, "loss": losses}


def hf_state_dict(megatron_state: dict, most) -> dict:
    """MoSTModel (TP=PP=EP=1) tensors under the HF remote-code model's names, by the mapping table."""
    from megatron_most.convert import mapping
    from megatron_most.convert.hf_most import AUDIO_PROJECTION

    out = {}
    for item in mapping.items(most):
        tensor = megatron_state[item.key]
        rule = item.rule
        if rule.kind == "new":  # audio projection: not in the HF DeepSeek table
            out[AUDIO_PROJECTION[0] if item.key.endswith("weight") else AUDIO_PROJECTION[1]] = tensor
            continue
        names = item.hf_names(rule.sources()[0])  # per-expert names, as on the hub
        if rule.kind == "swiglu":
            gate, up = tensor.chunk(2, dim=0)
            out[names[0]], out[names[1]] = gate, up
        else:  # copy, vocab (the whole padded table: markers, units and padding rows included)
            out[names[0]] = tensor
    missing = sorted(set(megatron_state) - {i.key for i in mapping.items(most)})
    assert not missing, f"Megatron tensors without a mapping rule: {missing}"
    return out


@pytest.fixture(scope="module")
def megatron():
    return run_distributed(_megatron_side, 1, timeout_s=300)[0]


def _hf_model(masking, state, **overrides):
    from megatron_most.convert.hf_most import hf_config
    from megatron_most.convert.hf_most.modeling_most import MoSTForCausalLM

    most = _most(masking)
    model = MoSTForCausalLM(hf_config(most, **overrides)).float().eval()
    model.load_state_dict(hf_state_dict(state, most), strict=True)
    return model


@pytest.mark.parametrize("masking", MASKINGS)
def test_hf_most_matches_megatron(megatron, masking):
    ids, features, expected = megatron["ids"], megatron["features"], megatron["logits"][masking]
    model = _hf_model(masking, megatron["state"])
    with torch.no_grad():
        got = model(input_ids=ids, audio_features=features).logits
        other = _hf_model(MASKINGS[1 - MASKINGS.index(masking)], megatron["state"])(
            input_ids=ids, audio_features=features
        ).logits
        all_text = model(input_ids=ids, audio_features=features, modality_ids=torch.zeros_like(ids)).logits
        no_audio = model(input_ids=ids.masked_fill(ids == model.config.feature_token_id, 5)).logits
        padded = model(input_ids=ids, audio_features=features, attention_mask=torch.ones_like(ids)).logits
        loss = model(input_ids=ids, audio_features=features, labels=ids).loss.item()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = (got - expected).abs().max().item()
    print(f"{masking}: max |HF - Megatron| = {diff:.3g} (max logit {expected.abs().max().item():.3g})")
    assert torch.isfinite(got).all()
    assert expected.abs().max() > 0.5
    assert diff < TOLERANCE, diff
    assert (padded - expected).abs().max() < TOLERANCE  # an all-ones attention mask changes nothing
    # HF labels (unshifted, <feat> targets dropped) give Megatron's lm_loss
    print(f"{masking}: loss HF {loss:.6f} Megatron {megatron['loss'][masking]:.6f}")
    assert abs(loss - megatron["loss"][masking]) < TOLERANCE
    # the comparison can fail: masking rule, modality ids and the audio features all matter
    assert (other - expected).abs().max() > SENSITIVITY
    assert (all_text - expected).abs().max() > SENSITIVITY
    assert (no_audio - expected).abs().max() > SENSITIVITY


def test_auto_model_from_pretrained_remote_code(megatron, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_most.convert.hf_most import AUTO_MAP, write_remote_code

    masking = MASKINGS[0]
    model = _hf_model(masking, megatron["state"])
    model.save_pretrained(tmp_path)
    write_remote_code(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "most"
    assert config["masking"] == masking and config["text_vocab_size"] == 256 and config["num_units"] == 32

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).float().eval()
    assert type(loaded).__name__ == "MoSTForCausalLM"
    assert "megatron_most" not in type(loaded).__module__  # the copied code, not this package
    assert AutoConfig.from_pretrained(tmp_path, trust_remote_code=True).model_type == "most"
    ids, features = megatron["ids"], megatron["features"]
    with torch.no_grad():
        got = loaded(input_ids=ids, audio_features=features).logits
    diff = (got - megatron["logits"][masking]).abs().max().item()
    print(f"from_pretrained(trust_remote_code=True): max |HF - Megatron| = {diff:.3g}")
    assert diff < TOLERANCE, diff

    # cached greedy generation == uncached greedy loop (prompt with audio frames and units): the
    # features are consumed on the prompt step only, and every cached step's logits equal the
    # uncached model's on the whole sequence so far
    prompt = ids[:1, :16]  # text, <boa> <feat>x5 <eoa>, text
    frames = features[:5]
    new_tokens = 6
    with torch.no_grad():
        out = loaded.generate(
            input_ids=prompt,
            audio_features=frames,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        seq, step_logits = prompt, []
        for _ in range(new_tokens):
            logits = loaded(input_ids=seq, audio_features=frames, use_cache=False).logits[:, -1]
            step_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        other_frames = loaded.generate(
            input_ids=prompt,
            audio_features=frames + 1.0,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (1, 16 + new_tokens)
    assert torch.equal(out.sequences, seq), (out.sequences, seq)
    cached_diff = max((a - b).abs().max().item() for a, b in zip(out.scores, step_logits, strict=True))
    print(f"generate(): cached vs uncached step logits max diff {cached_diff:.3g}")
    assert cached_diff < TOLERANCE, cached_diff
    assert (other_frames.scores[0] - out.scores[0]).abs().max() > SENSITIVITY  # the features were used
