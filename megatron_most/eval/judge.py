"""ASR judge for TTS intelligibility: transcribe 16 kHz waveforms with a local transformers checkpoint.

The model class comes from the checkpoint's own `config.json` through transformers' mapping tables:
a model type in `MODEL_FOR_CTC_MAPPING_NAMES` (HuBERT-CTC, the paper's judge; wav2vec2) loads with
`AutoModelForCTC` and is decoded greedily with CTC collapse, one in
`MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES` (Whisper) loads with `AutoModelForSpeechSeq2Seq` and is
decoded with `generate()` (English transcription, no timestamps). The release loaded
facebook/hubert-large-ls960-ft (HubertForCTC) as a seq2seq model; tests/test_eval_judge.py pins the
CTC path.

Batches are padded by the checkpoint's feature extractor, which adds an attention mask exactly when
its config says so (HuBERT-large-ft does, wav2vec2-base does not); CTC frames past each waveform's
own length are dropped before decoding. Nothing is resampled: inputs must be 16 kHz. A waveform that
cannot be transcribed (empty, NaN, too short for one CTC frame, longer than Whisper's window) raises
ValueError naming its index, before any model work, so the caller can record it as a failed item.
"""

from __future__ import annotations

import inspect
from itertools import groupby

import numpy as np
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoTokenizer
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CTC_MAPPING_NAMES,
    MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
)

from megatron_most.options import ConfigError

SAMPLE_RATE = 16000


def ctc_decode(tokenizer, ids: list[int], blank: int) -> str:
    """Greedy CTC text of per-frame ids: merge repeats, drop blanks, then decode (special tokens
    skipped, the word delimiter becomes a space). Collapsing here keeps "l <blank> l" as "ll":
    Wav2Vec2CTCTokenizer.decode(skip_special_tokens=True) drops the blank before it merges repeats."""
    collapsed = [token for token, _ in groupby(ids) if token != blank]
    # CTC tokenizers (Wav2Vec2CTCTokenizer) merge repeats again unless told not to: "l l" would be "l".
    groups = "group_tokens" in inspect.signature(tokenizer.convert_tokens_to_string).parameters
    kwargs = {"group_tokens": False} if groups else {}
    return " ".join(tokenizer.decode(collapsed, skip_special_tokens=True, **kwargs).split())


def _as_wave(wave, index: int) -> np.ndarray:
    """One input as a 1-D float32 array; ValueError naming `index` if it cannot be transcribed."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().float().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"waveform {index}: shape {wave.shape}; need a 1-D mono waveform at {SAMPLE_RATE} Hz")
    if wave.size == 0:
        raise ValueError(f"waveform {index}: empty")
    bad = int((~np.isfinite(wave)).sum())
    if bad:
        what = "all NaN" if np.isnan(wave).all() else f"{bad} of {wave.size} samples are NaN or infinite"
        raise ValueError(f"waveform {index}: {what}")
    return wave


class _Judge:
    """Shared driver: validate every waveform, batch them by length, restore the input order."""

    def __init__(self, model, extractor, tokenizer):
        self.model, self.extractor, self.tokenizer = model, extractor, tokenizer
        self.device = model.device

    def _check_length(self, num_samples: int, index: int) -> None:
        """Model-specific length limits (none by default)."""

    def _max_batch(self, batch_size: int) -> int:
        return batch_size

    @torch.inference_mode()
    def transcribe(self, waveforms, batch_size: int = 8) -> list[str]:
        """One transcript per 16 kHz mono waveform (numpy array or torch tensor), in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        waves = [_as_wave(wave, i) for i, wave in enumerate(waveforms)]
        for i, wave in enumerate(waves):
            self._check_length(len(wave), i)
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))  # similar lengths: less padding
        step = self._max_batch(batch_size)
        out: list[str] = [""] * len(waves)
        for start in range(0, len(order), step):
            batch = order[start : start + step]
            for i, text in zip(batch, self._transcribe_batch([waves[i] for i in batch])):
                out[i] = text
        return out

    def _features(self, waves: list[np.ndarray], **kwargs):
        return self.extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", **kwargs).to(self.device)


class CTCJudge(_Judge):
    """AutoModelForCTC: argmax per frame, frames past each waveform's length dropped, CTC collapse."""

    def __init__(self, model, extractor, tokenizer):
        super().__init__(model, extractor, tokenizer)
        blank = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
        if blank is None:
            raise ConfigError(f"{model.name_or_path}: no pad_token_id in the config or tokenizer to use as CTC blank")
        self.blank = int(blank)
        # Frames of each waveform from its sample count (wav2vec2-style raw-audio models); without that
        # formula padded frames cannot be told apart, so each waveform runs alone.
        raw = model.main_input_name == "input_values"
        self._frames = getattr(model, "_get_feat_extract_output_lengths", None) if raw else None

    def _max_batch(self, batch_size: int) -> int:
        return batch_size if self._frames is not None else 1

    def _check_length(self, num_samples: int, index: int) -> None:
        if self._frames is not None and int(self._frames(torch.tensor(num_samples))) < 1:
            raise ValueError(f"waveform {index}: {num_samples} samples is too short for one CTC output frame")

    def _transcribe_batch(self, waves: list[np.ndarray]) -> list[str]:
        ids = self.model(**self._features(waves, padding=True)).logits.argmax(-1).cpu()
        if self._frames is None:
            frames = [ids.shape[1]] * len(waves)
        else:
            frames = self._frames(torch.tensor([len(w) for w in waves])).tolist()
        return [ctc_decode(self.tokenizer, row[:n].tolist(), self.blank) for row, n in zip(ids, frames)]


class Seq2SeqJudge(_Judge):
    """AutoModelForSpeechSeq2Seq with `generate()`; Whisper: English transcription, no timestamps,
    one window (30 s for the released models) padded to its full length as Whisper expects."""

    def __init__(self, model, extractor, tokenizer):
        super().__init__(model, extractor, tokenizer)
        self.whisper = model.config.model_type == "whisper"
        self.generate_kwargs, self.extract_kwargs = {}, {"padding": True}
        if self.whisper:
            self.extract_kwargs = {}  # the extractor's own default: pad to the full window
            self.generate_kwargs = {"return_timestamps": False}
            if getattr(model.generation_config, "is_multilingual", False):  # *.en models take no language
                self.generate_kwargs.update(language="en", task="transcribe")

    def _check_length(self, num_samples: int, index: int) -> None:
        window = getattr(self.extractor, "n_samples", None)
        if self.whisper and window is not None and num_samples > window:
            raise ValueError(
                f"waveform {index}: {num_samples / SAMPLE_RATE:.1f} s is longer than Whisper's "
                f"{window / SAMPLE_RATE:.0f} s window (it is not truncated silently)"
            )

    def _transcribe_batch(self, waves: list[np.ndarray]) -> list[str]:
        tokens = self.model.generate(**self._features(waves, **self.extract_kwargs), **self.generate_kwargs)
        return [" ".join(text.split()) for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def judge_family(model_type: str) -> str:
    """ "ctc" or "seq2seq" from transformers' mapping tables; ConfigError for any other type."""
    if model_type in MODEL_FOR_CTC_MAPPING_NAMES:
        return "ctc"
    if model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
        return "seq2seq"
    raise ConfigError(
        f"ASR judge: model type {model_type!r} is in neither of the two supported families: CTC "
        f"(AutoModelForCTC, e.g. hubert, wav2vec2) or speech seq2seq (AutoModelForSpeechSeq2Seq, e.g. whisper)"
    )


def load_judge(path, device="cpu") -> CTCJudge | Seq2SeqJudge:
    """The ASR judge in local transformers directory `path`, its class picked from its own config."""
    path = str(path)
    family = judge_family(AutoConfig.from_pretrained(path).model_type)
    extractor = AutoFeatureExtractor.from_pretrained(path)
    rate = getattr(extractor, "sampling_rate", None)
    if rate != SAMPLE_RATE:
        raise ConfigError(
            f"ASR judge {path}: feature extractor sampling_rate={rate}; the judge takes {SAMPLE_RATE} Hz "
            f"waveforms and does not resample"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    auto, judge = (AutoModelForCTC, CTCJudge) if family == "ctc" else (AutoModelForSpeechSeq2Seq, Seq2SeqJudge)
    model = auto.from_pretrained(path).to(device).eval().requires_grad_(False)
    return judge(model, extractor, tokenizer)
