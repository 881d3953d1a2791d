"""ASR judge (megatron_most/eval/judge.py) on tiny random checkpoints built and saved here (no downloads).

References are independent of the code under test: CTC text is the model's own per-frame argmax on
each waveform alone, collapsed by hand in this file; Whisper text is a greedy loop over the model's
forward pass on each waveform alone, from the English-transcribe-no-timestamps prompt. The release
loaded the HuBERT-CTC judge as a seq2seq model; `test_hubert_ctc_loads_as_ctc` pins the fix.
"""

from __future__ import annotations

import json
from itertools import groupby

import numpy as np
import pytest
import torch

from megatron_most.eval.judge import CTCJudge, Seq2SeqJudge, ctc_decode, load_judge
from megatron_most.options import ConfigError

LETTERS = "abcdefghijklmnopqrstuvwxyz'"
CTC_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate(LETTERS)}}
WHISPER_SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>"]
WHISPER_SPECIAL += ["<|notimestamps|>"]


def _waves(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def _save_ctc(directory, *, attention_mask=True, sampling_rate=16000):
    """A tiny HubertForCTC shaped like hubert-large-ls960-ft (layer-norm front end, stable layer norm)."""
    from transformers import HubertConfig, HubertForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = HubertConfig(
        vocab_size=len(CTC_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        pad_token_id=0,
    )
    model = HubertForCTC(config).eval()
    with torch.no_grad():  # sharper logits: more blanks and repeated frames for the collapse to handle
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps(CTC_VOCAB))
    Wav2Vec2CTCTokenizer(str(directory / "vocab.json")).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=sampling_rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    ).save_pretrained(directory)
    return directory


def _save_whisper(directory):
    """A tiny multilingual-style WhisperForConditionalGeneration with a 1 s window and a byte-level
    tokenizer (256 bytes + Whisper's special tokens), built offline."""
    from tokenizers import pre_tokenizers
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()) + WHISPER_SPECIAL)}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIAL[1:]})
    ids = {t: vocab[t] for t in WHISPER_SPECIAL}
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=50,  # 1 s window: 100 mel frames, conv stride 2
        max_target_positions=32,
        init_std=0.3,  # large enough for the audio to steer the random decoder
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
        tie_word_embeddings=False,  # tied random embeddings just repeat the prompt's last token
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # readable text: only lower-case letters, space ("Ġ") and <|endoftext|> can win
        keep = [vocab[c] for c in "abcdefghijklmnopqrstuvwxyzĠ"] + [ids["<|endoftext|>"]]
        weight = model.proj_out.weight
        weight[[i for i in range(len(vocab)) if i not in keep]] = 0.0
        weight.mul_(10.0)
    generation = model.generation_config
    generation.lang_to_id = {"<|en|>": ids["<|en|>"]}
    generation.task_to_id = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.is_multilingual = True
    generation.max_new_tokens = 6
    generation.begin_suppress_tokens = generation.suppress_tokens = None
    generation._from_model_config = False  # else from_pretrained rebuilds it from config.json, dropping the above
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):
    return _save_ctc(tmp_path_factory.mktemp("hubert_ctc"))


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return _save_whisper(tmp_path_factory.mktemp("whisper"))


def _reference_ctc(model, wave) -> str:
    """Argmax per frame on the waveform alone, merge repeats, drop blanks (<pad>) and the other
    special tokens, ids -> characters, "|" -> space."""
    values = torch.from_numpy(wave)
    values = ((values - values.mean()) / torch.sqrt(values.var(unbiased=False) + 1e-7))[None]  # do_normalize
    with torch.no_grad():
        ids = model(values).logits.argmax(-1)[0].tolist()
    chars = {i: c for c, i in CTC_VOCAB.items()}
    kept = [chars[i] for i, _ in groupby(ids) if i != CTC_VOCAB["<pad>"]]
    text = "".join(" " if c == "|" else c for c in kept if c not in ("<s>", "</s>", "<unk>"))
    return " ".join(text.split())


def test_hubert_ctc_loads_as_ctc(ctc_dir, whisper_dir):
    """The release's defect: facebook/hubert-large-ls960-ft (HubertForCTC) loaded as seq2seq."""
    from transformers import HubertForCTC, WhisperForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    judge = load_judge(ctc_dir)
    assert isinstance(judge, CTCJudge) and type(judge.model) is HubertForCTC
    assert type(judge.model).__name__ not in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values()
    whisper = load_judge(whisper_dir)
    assert isinstance(whisper, Seq2SeqJudge) and type(whisper.model) is WhisperForConditionalGeneration


def test_ctc_decode_keeps_letters_split_by_blank(tmp_path):
    """'l <blank> l' is "ll"; Wav2Vec2CTCTokenizer.decode(skip_special_tokens=True) alone drops the
    blank before merging repeats and gives "helo"."""
    from transformers import Wav2Vec2CTCTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps(CTC_VOCAB))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"))
    frames = ["|", "h", "h", "<pad>", "e", "l", "l", "<pad>", "l", "o", "<s>", "|", "<pad>", "|", "w", "<unk>", "w"]
    ids = [CTC_VOCAB[f] for f in frames + ["<pad>", "<pad>", "|"]]
    assert ctc_decode(tokenizer, ids, blank=CTC_VOCAB["<pad>"]) == "hello ww"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "helo w"  # why the judge collapses first


def test_ctc_transcripts_match_reference_and_batching(ctc_dir):
    judge = load_judge(ctc_dir)
    lengths = [16000, 5000, 720, 11000, 400, 8000, 3001]
    waves = _waves(lengths)
    expected = [_reference_ctc(judge.model, w) for w in waves]
    assert sum(len(t) for t in expected) > 20 and len(set(expected)) == len(expected)
    assert any(len(t.split()) > 1 for t in expected) and any(a == b for t in expected for a, b in zip(t, t[1:]))
    inputs = [torch.from_numpy(w) if i % 2 else w for i, w in enumerate(waves)]  # tensors and arrays
    assert judge.transcribe(inputs, batch_size=8) == expected
    assert judge.transcribe(inputs, batch_size=3) == expected
    assert [judge.transcribe([w], batch_size=1)[0] for w in waves] == expected


@pytest.mark.parametrize("attention_mask", [True, False])
def test_ctc_follows_feature_extractor_attention_mask(tmp_path, attention_mask):
    """HuBERT-large-ft's extractor returns an attention mask, wav2vec2-base's does not: the model
    gets one exactly when the checkpoint's extractor config says so."""
    judge = load_judge(_save_ctc(tmp_path / "ctc", attention_mask=attention_mask))
    seen = []
    judge.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    judge.transcribe(_waves([4000, 9000]))
    assert len(seen) == 1 and (seen[0] is not None) == attention_mask
    if attention_mask:
        assert seen[0].sum(-1).tolist() == [4000, 9000]


def _reference_whisper(judge, wave) -> str:
    """Greedy decoding by hand from <|startoftranscript|><|en|><|transcribe|><|notimestamps|>."""
    tok, model = judge.tokenizer, judge.model
    features = judge.extractor(wave, sampling_rate=16000, return_tensors="pt").input_features
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    seq = tok.convert_tokens_to_ids(prompt)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        for _ in range(model.generation_config.max_new_tokens):
            logits = model(input_features=features, decoder_input_ids=torch.tensor([seq])).logits
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == eos:
                break
    return " ".join(tok.decode(seq[len(prompt) :], skip_special_tokens=True).split())


def test_whisper_transcripts_match_reference_and_batching(whisper_dir):
    judge = load_judge(whisper_dir)
    assert judge.generate_kwargs == {"return_timestamps": False, "language": "en", "task": "transcribe"}
    waves = _waves([16000, 3000, 9000, 500], seed=1)
    expected = [_reference_whisper(judge, w) for w in waves]
    assert any(expected) and len(set(expected)) > 1
    assert judge.transcribe(waves, batch_size=8) == expected
    assert [judge.transcribe([w])[0] for w in waves] == expected


def test_whisper_rejects_audio_longer_than_its_window(whisper_dir):
    judge = load_judge(whisper_dir)
    with pytest.raises(ValueError, match=r"waveform 1: 1\.0 s is longer than Whisper's 1 s window"):
        judge.transcribe(_waves([8000, 16001]))


def test_unknown_model_type_is_a_clear_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"'bert'.*CTC.*AutoModelForCTC.*seq2seq.*AutoModelForSpeechSeq2Seq"):
        load_judge(tmp_path)


def test_wrong_sampling_rate_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling_rate=8000.*16000 Hz.*does not resample"):
        load_judge(_save_ctc(tmp_path / "ctc8k", sampling_rate=8000))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(0, dtype=np.float32), r"waveform 2: empty"),
        (torch.empty(0), r"waveform 2: empty"),
        (np.full(4000, np.nan, dtype=np.float32), r"waveform 2: all NaN"),
        (np.where(np.arange(4000) == 7, np.inf, 0.1).astype(np.float32), r"waveform 2: 1 of 4000 samples"),
        (np.zeros((2, 4000), dtype=np.float32), r"waveform 2: shape \(2, 4000\).*1-D mono"),
        (np.zeros(300, dtype=np.float32), r"waveform 2: 300 samples is too short for one CTC output frame"),
    ],
)
def test_bad_waveform_names_its_index(ctc_dir, bad, message):
    judge = load_judge(ctc_dir)
    with pytest.raises(ValueError, match=message):
        judge.transcribe([*_waves([4000, 5000]), bad, *_waves([6000])])
