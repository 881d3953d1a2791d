"""The quickstart's parts: the log-mel front end (vs transformers' Whisper feature extractor), its
use by the packing and unit tools, SpecAugment masking, the espeak-ng corpus's splits, and the
perplexity / unit scores (known answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from megatron_most.audio.augment import SpecAugment, spec_augment
from megatron_most.audio.encoder import load_encoder
from megatron_most.audio.logmel import LogMelEncoder
from megatron_most.data.espeak_corpus import HELDOUT_VARIANTS, TRAIN_VARIANTS, CorpusOptions, make_corpus, vocabulary
from megatron_most.eval.perplexity import score_perplexity, score_units
from megatron_most.options import ConfigError


def _wave(seconds=1.3, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_log_mel_equals_whisper_feature_extractor():
    wave = _wave()
    whisper = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400)
    reference = whisper(wave, sampling_rate=16000, padding="longest", return_tensors="np")["input_features"][0]
    ours = ((LogMelEncoder().log_mel(torch.from_numpy(wave)) + 4) / 4).numpy().T  # Whisper's scaling, [80, frames]
    assert np.abs(ours[:, : reference.shape[1]] - reference).max() < 1e-5


def test_features_are_normalised_per_utterance_and_stacked_to_25hz():
    wave = _wave(2.0, seed=1)
    encoder = LogMelEncoder()
    (features,) = encoder([wave])
    log_mel = encoder.log_mel(torch.from_numpy(wave)).numpy()  # [100 Hz frames, 80]
    normed = (log_mel - log_mel.mean(0)) / (log_mel.std(0) + encoder.eps)  # numpy reference
    frames = len(normed) // 4
    expected = normed[: 4 * frames].reshape(frames, 320)
    assert features.dtype == torch.float16 and tuple(features.shape) == (frames, 320) == (
        encoder.num_frames(len(wave)),
        320,
    )
    assert encoder.frame_rate == 25.0
    np.testing.assert_allclose(features.float().numpy(), expected, rtol=1e-3, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(features.float().numpy()[:, 80:160], normed[1 : 4 * frames : 4], rtol=1e-3, atol=2e-3)


def test_load_encoder_refuses_a_layer_for_logmel():
    assert isinstance(load_encoder("logmel"), LogMelEncoder)
    with pytest.raises(ConfigError, match="layer=11: the logmel encoder has no layers"):
        load_encoder("logmel", layer=11)


def test_spec_augment_masks_within_bounds_in_every_stacked_frame():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((60, 8)).astype(np.float32) + 5.0  # no natural zeros
    lengths = np.array([40, 20])
    opts = SpecAugment(time_masks=2, time_width=6, freq_masks=1, freq_width=3, groups=2)
    out = spec_augment(features, lengths, opts, np.random.default_rng(3))
    again = spec_augment(features, lengths, opts, np.random.default_rng(3))
    np.testing.assert_array_equal(out, again)  # seeded: a resumed run masks the same
    view = out.reshape(60, 2, 4)
    for start, length in ((0, 40), (40, 20)):
        span = view[start : start + length]
        np.testing.assert_array_equal(span[:, 0] == 0, span[:, 1] == 0)  # the same bins in both stacked frames
        masked_bins = np.flatnonzero((span == 0).all(axis=(0, 1)))
        assert len(masked_bins) <= 3
        masked_frames = np.flatnonzero((span == 0).all(axis=(1, 2)))
        assert len(masked_frames) <= 2 * min(6, length // 5)
    assert (out != features).sum() > 0 and ((out == features) | (out == 0)).all()
    assert not SpecAugment().active
    with pytest.raises(ConfigError, match="spec_augment_groups=3 does not divide"):
        spec_augment(features, lengths, SpecAugment(freq_masks=1, groups=3), rng)


def test_corpus_keeps_heldout_voices_and_test_sentences_apart(tmp_path):
    summary = make_corpus(CorpusOptions(out=str(tmp_path), train=24, test=6, text=200, workers=2), progress=False)
    assert summary["splits"] == {"test_seen": 6, "test_heldout": 6, "train": 24}
    assert not set(TRAIN_VARIANTS) & set(HELDOUT_VARIANTS)

    def rows(name):
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    train, seen, heldout = rows("train"), rows("test_seen"), rows("test_heldout")
    train_voices = {r["speaker"] for r in train + seen}
    assert all(r["speaker"].split("+")[1] in TRAIN_VARIANTS for r in train + seen)
    assert not {r["speaker"] for r in heldout} & train_voices
    test_text = {r["text"] for r in seen + heldout + rows("text_test")}
    assert len(test_text) == 18  # all distinct
    assert not test_text & {r["text"] for r in train + rows("text")}
    for r in train + heldout:
        assert 2 <= len(r["text"].split()) <= 8 and set(r["text"].split()) <= set(vocabulary())
        assert (tmp_path / "audio" / f"{r['id']}.wav").stat().st_size > 1000
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    assert sp.decode(sp.encode("anna has seven cats")) == "anna has seven cats"


def test_perplexity_and_unit_scores_known_answers():
    result = score_perplexity({"a": (-2.0, 2), "b": (-4.0, 2)})  # mean nll 1.5 nats
    assert result["perplexity"] == pytest.approx(np.exp(1.5)) and result["tokens"] == 4
    units = score_units({"x": [1, 2, 3, 4], "y": [5, 6]}, {"x": [1, 2, 9, 4, 7], "y": []})
    # x: 3 hits, 1 substitution, 1 insertion; y: 2 deletions -> 4 errors / 6 reference units, 3 hits
    assert units["unit_error_rate"] == pytest.approx(4 / 6) and units["unit_accuracy"] == pytest.approx(3 / 6)
