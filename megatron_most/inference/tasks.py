"""The four things users run MoST for, as prompts in and decoded outputs out:

    asr       audio -> text           prompt: the release's template with the ASR instruction
    tts       text -> units           prompt: the template with the TTS instruction
    continue  audio -> more units     prompt: <boa> and the audio's units, continued as speech
    chat      text or audio -> text or speech   prompt: the template with the chat instruction

Prompts come from `data.templates.render_prompt`, so they are exactly what training rendered
before each response; audio enters as units or as <feat> frames (`mode`). Outputs are decoded
into text (the tokenizer's) and unit indices (for the vocoder), whatever the task: a chat reply
may be speech.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_most.data.templates import AudioSegment, TemplateOptions, render_prompt
from megatron_most.data.tokenizer import TextTokenizer
from megatron_most.inference.generate import Prompt
from megatron_most.options import ConfigError, require

TASKS = ("asr", "tts", "continue", "chat")
_TEMPLATE_TASK = {"asr": "asr", "tts": "tts", "chat": "instruct"}


@dataclasses.dataclass
class Output:
    ids: list[int]
    """The generated token ids, as the model wrote them."""
    text: str
    """Its text tokens, decoded (markers, units, bos/eos and ids the tokenizer lacks left out)."""
    units: list[int]
    """Its unit tokens as unit indices 0..K-1, in order (what the vocoder takes)."""


def build_prompt(
    task: str,
    value: str | dict,
    audio: dict[str, AudioSegment],
    tokenizer: TextTokenizer,
    layout,
    options: TemplateOptions,
    *,
    mode: str,
) -> Prompt:
    """The prompt of one request: `value` is text, or {"audio": path} with the path's units or
    features in `audio`."""
    require(task in TASKS, f"task={task!r}: must be one of {TASKS}")
    if task == "continue":
        require(isinstance(value, dict), "task 'continue' takes audio ({'audio': path}), not text")
        segment = audio.get(value["audio"])
        if segment is None or segment.units is None or len(segment.units) == 0:
            raise ConfigError(f"audio {value['audio']}: speech continuation needs its units (give a codebook)")
        return Prompt([layout.boa, *(int(layout.unit(int(u))) for u in segment.units)])
    if task == "asr":
        require(isinstance(value, dict), "task 'asr' takes audio ({'audio': path}), not text")
    if task == "tts":
        require(isinstance(value, str), "task 'tts' takes text, not audio")
    rendered = render_prompt(_TEMPLATE_TASK[task], value, audio, tokenizer, layout, options, mode=mode)
    features = None if rendered.features is None else torch.from_numpy(rendered.features.astype("float32"))
    return Prompt(rendered.tokens.tolist(), features)


def decode(ids: list[int], tokenizer: TextTokenizer, layout) -> Output:
    """Text and units of generated ids."""
    special = {tokenizer.bos, tokenizer.eos}
    # text rows past the tokenizer's vocabulary (the model's text table may be larger) carry no text
    text = [i for i in ids if i < min(layout.text_vocab_size, tokenizer.vocab_size) and i not in special]
    units = [i - layout.first_unit for i in ids if layout.audio and layout.first_unit <= i < layout.size]
    return Output(ids=list(ids), text=tokenizer.decode(text).strip(), units=units)
