"""Prompt templates: turn a sample (+ its audio) into MoST token ids and a loss mask.

Release prompt shape (MOST_SPEC.md "Training recipe"):

    prompt    "<bos>{instruction}\\n\\n{input}<eos>\\n\\nOutput: "     never a target
    response  "<bos>{output}<eos>"                                  every token a target

"<bos>"/"<eos>" are the tokenizer's bos/eos ids; other literal text and text values are encoded
with the tokenizer, one call per run of text between special tokens and audio (as the release
encodes the whole formatted string), so "\\n\\n" + text tokenizes as in the release. Audio becomes
<boa> units <eoa> (mode "units") or <boa> <feat>*frames <eoa> (mode "features", prompt only: the
model predicts units, so audio in a response is always units). As in the release, the response's
own <bos> is a target. Text LM samples train on every token after the first.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from typing import Union

import numpy as np

from megatron_most.data.manifest import InstructSample, SpeechSample, TextSample, Turn
from megatron_most.data.tokenizer import TextTokenizer
from megatron_most.model.vocab import TokenLayout
from megatron_most.options import ConfigError, options, require

TASKS = ("asr", "tts", "lm", "instruct")
MODES = ("units", "features")
_FIELDS = {  # template field -> (allowed placeholders, required placeholders)
    "prompt": ({"instruction", "input"}, {"input"}),
    "response": ({"output"}, {"output"}),
    "lm": ({"text"}, {"text"}),
}


class RenderError(ValueError):
    """This sample cannot be rendered (its audio is missing, empty, out of range); skip it."""


@options
class TemplateOptions:
    asr_instruction: str = "Transcribe the following speech into text."
    """{instruction} of ASR samples (speech in, text out)."""
    tts_instruction: str = "Convert the following text into speech."
    """{instruction} of TTS samples (text in, units out)."""
    chat_instruction: str = "Respond to the following input."
    """{instruction} of each user/assistant pair of an instruct sample without a system turn (with
    one, the system text is the instruction of every pair)."""
    prompt: str = "<bos>{instruction}\n\n{input}<eos>\n\nOutput: "
    """Prompt shape (no loss); needs {input}, may use {instruction}; <bos>/<eos> are special tokens."""
    response: str = "<bos>{output}<eos>"
    """Response shape; needs {output}; all of its tokens are targets (its <bos>, audio markers, <eos>)."""
    lm: str = "<bos>{text}<eos>"
    """Text LM sample shape; needs {text}; every token after the first is a target."""

    def __post_init__(self):
        for name, (allowed, required) in _FIELDS.items():
            _parse(getattr(self, name), name, frozenset(allowed), frozenset(required))
        for name in ("asr_instruction", "tts_instruction", "chat_instruction"):
            require(isinstance(getattr(self, name), str), f"TemplateOptions.{name}: must be a string")

    def parts(self, name: str) -> tuple[tuple[str, str], ...]:
        allowed, required = _FIELDS[name]
        return _parse(getattr(self, name), name, frozenset(allowed), frozenset(required))


@dataclasses.dataclass
class AudioSegment:
    units: np.ndarray | None = None
    """int64 [n] unit indices 0..K-1 (consecutive duplicates already removed); None without a codebook."""
    features: np.ndarray | None = None
    """[frames, dim] float16 HuBERT features; None in units mode."""


@dataclasses.dataclass
class Rendered:
    tokens: np.ndarray
    """int32 [n] MoST token ids."""
    loss_mask: np.ndarray
    """uint8 [n]; 1 where tokens[i] is a target (the model predicts it from tokens[:i])."""
    features: np.ndarray | None
    """[frames, dim] float16, all <feat> frames of the sample in order; None without any."""


@dataclasses.dataclass(frozen=True)
class _Audio:
    path: str


Value = Union[str, _Audio]


@functools.lru_cache(maxsize=64)
def _parse(template: str, name: str, allowed: frozenset, required: frozenset) -> tuple[tuple[str, str], ...]:
    """Split a template into ("text", s) / ("special", "bos"|"eos") / ("field", name) parts."""
    field = f"TemplateOptions.{name}={template!r}"
    if not isinstance(template, str):
        raise ConfigError(f"{field}: must be a string")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"{field}: {err}; write literal braces as {{{{ and }}}}") from None
    parts, seen = [], []
    for literal, placeholder, spec, conversion in pieces:
        for chunk in re.split(r"(<bos>|<eos>)", literal):
            if chunk in ("<bos>", "<eos>"):
                parts.append(("special", chunk[1:-1]))
            elif chunk:
                parts.append(("text", chunk))
        if placeholder is None:
            continue
        if placeholder not in allowed or spec or conversion:
            raise ConfigError(
                f"{field}: unknown placeholder {{{placeholder}}}; allowed: {sorted('{' + a + '}' for a in allowed)}"
            )
        if placeholder in seen:
            raise ConfigError(f"{field}: {{{placeholder}}} appears twice; use it once")
        seen.append(placeholder)
        parts.append(("field", placeholder))
    missing = sorted(required - set(seen))
    if missing:
        raise ConfigError(f"{field}: missing placeholder {{{missing[0]}}}; the sample's content goes there")
    return tuple(parts)


def audio_refs(task: str, sample) -> list[tuple[str, bool]]:
    """(audio path, is_response) of every audio the sample renders, in template order."""
    _check_task(task, sample)
    if task == "asr":
        return [(sample.audio, False)]
    if task == "tts":
        return [(sample.audio, True)]
    if task == "lm":
        return []
    return [(turn.audio, turn.role == "assistant") for turn in sample.turns if turn.audio is not None]


def render(
    task: str,
    sample,
    audio: dict[str, AudioSegment],
    tokenizer: TextTokenizer,
    layout: TokenLayout,
    options: TemplateOptions,
    *,
    mode: str,
) -> Rendered:
    """Token ids, loss mask and <feat> frames of one sample; RenderError if its audio is unusable."""
    _check_task(task, sample)
    require(mode in MODES, f"mode={mode!r}: must be one of {MODES}")
    require(
        tokenizer.vocab_size <= layout.text_vocab_size,
        f"tokenizer {tokenizer.name}: {tokenizer.vocab_size} ids do not fit text_vocab_size="
        f"{layout.text_vocab_size}; use the base model's tokenizer or a larger text_vocab_size",
    )
    builder = _Builder(tokenizer, layout, audio, mode)
    if task == "lm":
        builder.add(options.parts("lm"), {"text": sample.text}, target=True)
        rendered = builder.finish()
        rendered.loss_mask[:1] = 0  # the first token has nothing before it to be predicted from
        return rendered
    for prompt_values, response_values in _pairs(task, sample, options):
        builder.add(options.parts("prompt"), prompt_values, target=False)
        builder.add(options.parts("response"), response_values, target=True)
    return builder.finish()


def render_prompt(
    task: str,
    value: str | dict,
    audio: dict[str, AudioSegment],
    tokenizer: TextTokenizer,
    layout: TokenLayout,
    options: TemplateOptions,
    *,
    mode: str,
    instruction: str | None = None,
) -> Rendered:
    """The prompt of one generation request, as training renders it before the response (which
    the model then writes, from its "<bos>"). `value` is the input text, or {"audio": path} for
    audio in `audio`; task "asr", "tts" or "instruct" picks the default instruction."""
    require(mode in MODES, f"mode={mode!r}: must be one of {MODES}")
    defaults = {"asr": options.asr_instruction, "tts": options.tts_instruction, "instruct": options.chat_instruction}
    require(task in defaults, f"task={task!r}: prompts are rendered for {sorted(defaults)}")
    item = _Audio(value["audio"]) if isinstance(value, dict) else value
    builder = _Builder(tokenizer, layout, audio, mode)
    builder.add(options.parts("prompt"), {"instruction": instruction or defaults[task], "input": item}, target=False)
    return builder.finish()


def _pairs(task: str, sample, options: TemplateOptions) -> list[tuple[dict[str, Value], dict[str, Value]]]:
    """(prompt values, response values) per prompt/response pair of the sample."""
    if task == "asr":
        return [({"instruction": options.asr_instruction, "input": _Audio(sample.audio)}, {"output": sample.text})]
    if task == "tts":
        return [({"instruction": options.tts_instruction, "input": sample.text}, {"output": _Audio(sample.audio)})]
    turns = list(sample.turns)
    instruction = options.chat_instruction
    if turns and turns[0].role == "system":
        instruction = turns.pop(0).text
    if not turns or len(turns) % 2 or any(t.role != ("user", "assistant")[i % 2] for i, t in enumerate(turns)):
        raise RenderError(f"sample {sample.id}: turns must be an optional system turn, then user/assistant pairs")
    return [
        ({"instruction": instruction, "input": _value(user)}, {"output": _value(reply)})
        for user, reply in zip(turns[::2], turns[1::2])
    ]


def _value(turn: Turn) -> Value:
    return _Audio(turn.audio) if turn.audio is not None else turn.text


def _check_task(task: str, sample) -> None:
    expected = {"asr": SpeechSample, "tts": SpeechSample, "lm": TextSample, "instruct": InstructSample}
    require(task in expected, f"task={task!r}: must be one of {TASKS}")
    require(
        isinstance(sample, expected[task]),
        f"task={task!r} needs {expected[task].__name__} samples, got {type(sample).__name__}; "
        f"read the manifest with the kind that matches the task",
    )


class _Builder:
    """Accumulates token ids, target flags and feature frames; encodes each run of text in one call."""

    def __init__(self, tokenizer: TextTokenizer, layout: TokenLayout, audio: dict[str, AudioSegment], mode: str):
        self.tokenizer, self.layout, self.audio, self.mode = tokenizer, layout, audio, mode
        self.ids: list[int] = []
        self.flags: list[int] = []
        self.features: list[np.ndarray] = []
        self.text: list[str] = []  # pending text run
        self.text_target = False

    def add(self, parts, values: dict[str, Value], *, target: bool) -> None:
        for kind, item in parts:
            if kind == "special":
                self._emit([self.tokenizer.bos if item == "bos" else self.tokenizer.eos], target)
                continue
            value = item if kind == "text" else values.get(item, "")
            if isinstance(value, _Audio):
                self._emit_audio(value.path, target)
            elif value:
                if self.text and self.text_target != target:
                    self._flush()
                self.text.append(value)
                self.text_target = target

    def _emit(self, ids: list[int], target: bool) -> None:
        self._flush()
        self.ids.extend(ids)
        self.flags.extend([int(target)] * len(ids))

    def _flush(self) -> None:
        if self.text:
            ids = self.tokenizer.encode("".join(self.text))
            self.ids.extend(ids)
            self.flags.extend([int(self.text_target)] * len(ids))
            self.text = []

    def _emit_audio(self, path: str, target: bool) -> None:
        layout = self.layout
        if not layout.audio:
            raise ConfigError(
                "the token layout has no audio tokens (audio=False); use a layout with num_units or "
                "audio features for audio tasks"
            )
        segment = self.audio.get(path)
        if segment is None:
            raise RenderError(f"audio {path}: not loaded (missing from the audio dict)")
        self._flush()
        if self.mode == "features" and not target:
            frames = _features(segment, path)
            self.features.append(frames)
            body = [layout.feature] * frames.shape[0]
            target = False  # <feat> is an input frame, never a target
        else:
            body = [int(layout.unit(k)) for k in _units(segment, path, layout, self.mode, target)]
        self._emit([layout.boa, *body, layout.eoa], target)

    def finish(self) -> Rendered:
        self._flush()
        tokens = np.asarray(self.ids, dtype=np.int32)
        mask = np.asarray(self.flags, dtype=np.uint8)
        features = None
        if self.features:
            dims = {f.shape[1] for f in self.features}
            if len(dims) > 1:
                raise RenderError(f"audio features of one sample differ in dimension: {sorted(dims)}")
            features = np.concatenate(self.features).astype(np.float16, copy=False)  # [frames, dim]
        return Rendered(tokens=tokens, loss_mask=mask, features=features)


def _units(segment: AudioSegment, path: str, layout: TokenLayout, mode: str, target: bool) -> np.ndarray:
    if segment.units is None:
        where = "a response (the model predicts units, also in features mode)" if target else "a prompt in units mode"
        raise ConfigError(
            f"audio {path}: {where} needs unit ids but none were computed; give a codebook "
            "(k-means over HuBERT features, tools/train_units.py)"
        )
    if layout.num_units == 0:
        raise ConfigError(
            f"audio {path}: unit tokens are needed but the token layout has num_units=0; set "
            "num_units to the codebook size"
        )
    units = np.asarray(segment.units)
    if units.ndim != 1 or units.size == 0:
        raise RenderError(f"audio {path}: units must be a non-empty 1-D array, got shape {units.shape}")
    if units.min() < 0 or units.max() >= layout.num_units:
        raise RenderError(
            f"audio {path}: unit ids must lie in [0, {layout.num_units}), got "
            f"[{int(units.min())}, {int(units.max())}]; the codebook and num_units disagree"
        )
    return units


def _features(segment: AudioSegment, path: str) -> np.ndarray:
    if segment.features is None:
        raise ConfigError(f"audio {path}: mode='features' needs HuBERT features for prompt audio; pass --hubert")
    frames = np.asarray(segment.features)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise RenderError(f"audio {path}: features must be [frames > 0, dim], got shape {frames.shape}")
    return frames
