"""The MoST model's audio paths against a reference assembly written here, modality ids from
token ids, the loss split, the presets, and bad input."""

import pytest
import torch

from megatron_most.model.config import deepseek_v2_lite, deepseek_v2_lite_most, preset, tiny
from megatron_most.model.loss import lm_loss
from megatron_most.model.vocab import TokenLayout
from tests.multiproc import run_distributed

TEXT = 256  # tiny text vocabulary: <boa>=256, <eoa>=257, <feat>=258, units 259..290


def batch():
    ids = torch.randint(0, TEXT, (2, 24), generator=torch.Generator().manual_seed(3))
    ids[0, 2], ids[0, 3:8], ids[0, 8] = 256, 258, 257  # 5 feature frames
    ids[0, 12], ids[0, 13:15], ids[0, 15] = 256, 258, 257  # 2 more
    ids[1, 5], ids[1, 6:12], ids[1, 12] = 256, 259 + torch.arange(6), 257  # 6 unit tokens
    features = torch.randn(7, 16, generator=torch.Generator().manual_seed(4))
    return ids, features


def _paths():
    from megatron.core.models.gpt import GPTModel

    from megatron_most.model.most import build_model
    from megatron_most.moe import pack_routing_info
    from megatron_most.platform import ParallelLayout, initialize

    most = tiny()
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config()).eval()
    ids, features = batch()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        embedded = model.embed(ids, positions, features)
        logits = model(ids, positions, None, audio_features=features)
        # reference: the plain forward of GPTModel given the reference embeddings and ids
        table = model.embedding.word_embeddings.weight
        proj = model.audio_projection
        reference = table[ids].clone()  # [batch, seq, hidden]
        frame = 0
        for b in range(ids.shape[0]):
            for s in range(ids.shape[1]):
                if ids[b, s] == 258:
                    reference[b, s] = features[frame] @ proj.weight.t() + proj.bias
                    frame += 1
        modality = ((ids >= 258) & (ids < 291)).long()
        reference_logits = GPTModel.forward(
            model,
            ids,
            positions,
            None,
            decoder_input=reference.transpose(0, 1).contiguous(),
            padding_mask=pack_routing_info(modality),
        )
    return embedded.transpose(0, 1), reference, logits, reference_logits, model.tokens.modality(ids), modality


def test_continuous_and_discrete_paths_match_reference_assembly():
    embedded, reference, logits, reference_logits, modality, expected_modality = run_distributed(_paths, 1)[0]
    torch.testing.assert_close(embedded, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-6)
    assert logits.shape[:2] == (2, 24)  # the sequence does not grow: labels stay aligned
    assert torch.equal(modality, expected_modality)
    assert modality[0, 2] == 0 and modality[0, 3] == 1 and modality[1, 6] == 1 and modality[1, 12] == 0


def _bad_inputs():
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize

    most = tiny()
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config())
    ids, features = batch()
    errors = {}
    for name, call in {
        "frames": lambda: model(ids, None, None, audio_features=features[:6]),
        "dim": lambda: model(ids, None, None, audio_features=torch.randn(7, 15)),
        "missing": lambda: model(ids, None, None),
        "span": lambda: model(ids, None, None, audio_features=features, audio_lengths=torch.tensor([4, 3])),
        "unit": lambda: model(torch.full((1, 4), 291), None, None),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    return errors


def test_bad_model_inputs_name_the_field():
    errors = run_distributed(_bad_inputs, 1)[0]
    assert "6 frames but the input has 7 <feat> positions" in errors["frames"]
    assert "expected [frames, 16] (MoSTConfig.audio_feature_dim)" in errors["dim"]
    assert "7 <feat> positions but no audio_features" in errors["missing"]
    assert "sample 0 audio span 0 (positions 2..8): 5 <feat> placeholders but audio_lengths gives 4" in errors["span"]
    assert "sample 0 position 0: token id 291 is outside the vocabulary" in errors["unit"]


def test_batch_validation_names_sample_and_field():
    layout = TokenLayout(TEXT, 32)
    ids, _ = batch()
    layout.validate(ids, max_length=24, feature_spans=torch.tensor([5, 2]))
    with pytest.raises(
        ValueError, match=r"sample 0 audio span 1 \(positions 12..15\): 2 <feat> placeholders but audio_lengths gives 3"
    ):
        layout.validate(ids, 24, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match=r"exceeds the configured seq_length 16"):
        layout.validate(ids, 16, torch.tensor([5, 2]))
    unclosed = ids.clone()
    unclosed[1, 12] = 7
    with pytest.raises(ValueError, match=r"sample 1: <boa> at position 5 has no closing <eoa>"):
        layout.validate(unclosed, 24, torch.tensor([5, 2]))
    beyond = ids.clone()
    beyond[1, 7] = layout.unit(32)  # unit id K = 32 does not exist
    with pytest.raises(ValueError, match=r"sample 1 position 7: token id 291 is outside the vocabulary"):
        layout.validate(beyond, 24, torch.tensor([5, 2]))


def test_loss_masks_placeholders_and_splits_text_and_units():
    layout = TokenLayout(TEXT, 32)
    labels = torch.tensor([[5, 258, 259, 260, 7]])
    per_token = torch.tensor([[1.0, 100.0, 2.0, 4.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, report = lm_loss(per_token, labels, mask, layout)
    assert loss.item() == pytest.approx((1 + 2 + 4) / 3)  # <feat> target and masked position excluded
    assert report["text loss sum"].item() == 1.0 and report["text tokens"].item() == 1
    assert report["unit loss sum"].item() == 6.0 and report["unit tokens"].item() == 2


def test_presets_are_small_variations_of_one_base():
    most, base, small = deepseek_v2_lite_most(), deepseek_v2_lite(), tiny()
    assert (most.num_layers, most.hidden_size, most.kv_lora_rank, most.mamoe.num_experts) == (27, 2048, 512, 64)
    assert most.mamoe.groups() == (tuple(range(32)), tuple(range(32, 64)))
    assert (most.num_units, most.audio_feature_dim, most.mamoe.shared_expert_size) == (500, 768, 2816)
    assert base.mamoe.variant == "vanilla" and base.num_units == 0 and base.audio_feature_dim == 0
    assert small.first_k_dense == 1 and small.mamoe.num_experts == 8
    assert most.tokens.padded_size == 102912  # 102400 text + 3 markers + 500 units = 102903, padded to 804 x 128
    with pytest.raises(ValueError, match="unknown preset 'v3'"):
        preset("v3")
