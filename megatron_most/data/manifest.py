"""JSONL manifests of speech, text and chat-instruction samples.

    speech    {"id", "audio", "text", "speaker"?, "duration"?}
    text      {"text", "id"?}                       id defaults to "<file name>:<line>"
    instruct  {"id", "messages": [{"role": "system"|"user"|"assistant", "content": "text"},
                                  {"role": ..., "audio": "path"} | {"role": ..., "content": {"audio": "path"}}]}

Relative audio paths resolve against the manifest's directory. `read_manifest` never stops on a
bad line: it yields `Rejected(reason)` for it (reason names the field) and goes on, so one broken
line of a million-line corpus costs one sample. Blank lines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Union

from megatron_most.options import ConfigError
from megatron_most.rejects import Rejected

KINDS = ("speech", "text", "instruct")
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class SpeechSample:
    id: str
    audio: str
    """Absolute (or manifest-relative resolved) path of the audio file."""
    text: str
    speaker: str | None = None
    duration: float | None = None
    """Seconds, as the manifest states it (informational; the audio loader measures the real length)."""


@dataclasses.dataclass(frozen=True)
class TextSample:
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str
    """"system", "user" or "assistant"."""
    text: str | None = None
    audio: str | None = None
    """Exactly one of text / audio is set (system turns are text)."""


@dataclasses.dataclass(frozen=True)
class InstructSample:
    id: str
    turns: tuple[Turn, ...]
    """An optional system turn, then user/assistant pairs (validated by read_manifest)."""


Sample = Union[SpeechSample, TextSample, InstructSample]


class _Bad(Exception):
    """A line-level problem; becomes Rejected(str(self))."""


def read_manifest(path: str | os.PathLike, kind: str) -> Iterator[tuple[int, Sample | Rejected]]:
    """Yield (1-based line number, sample or Rejected) for each non-blank line of a JSONL manifest."""
    if kind not in KINDS:
        raise ConfigError(f"manifest kind={kind!r}: must be one of {KINDS}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest={str(path)!r}: no such file; pass a JSONL manifest")
    parse = {"speech": _speech, "text": _text, "instruct": _instruct}[kind]
    base = path.resolve().parent
    # Binary read + per-line decode: one line with bad bytes is rejected, the rest is still read.
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                if not line.strip():
                    continue
                record = _json_object(line)
                yield line_no, parse(record, base, f"{path.name}:{line_no}")
            except UnicodeDecodeError as err:
                yield line_no, Rejected(f"line is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})")
            except _Bad as err:
                yield line_no, Rejected(str(err))


def _json_object(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _Bad(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise _Bad(f"not a JSON object (got a {_type(record)})")
    return record


def _speech(record: dict, base: Path, default_id: str) -> SpeechSample:
    return SpeechSample(
        id=_id(record, None),
        audio=_audio_path(_string(record, "audio"), base),
        text=_string(record, "text"),
        speaker=_optional_string(record, "speaker"),
        duration=_duration(record),
    )


def _text(record: dict, base: Path, default_id: str) -> TextSample:
    return TextSample(id=_id(record, default_id), text=_string(record, "text"))


def _instruct(record: dict, base: Path, default_id: str) -> InstructSample:
    sample_id = _id(record, None)
    messages = record.get("messages")
    if messages is None:
        raise _Bad("missing field 'messages'")
    if not isinstance(messages, list):
        raise _Bad(f"field 'messages' must be a list of chat turns, got {_type(messages)}")
    turns = tuple(_turn(message, f"messages[{i}]", base) for i, message in enumerate(messages))
    _check_order(turns)
    return InstructSample(id=sample_id, turns=turns)


def _turn(message: Any, where: str, base: Path) -> Turn:
    if not isinstance(message, dict):
        raise _Bad(f"{where} must be an object, got {_type(message)}")
    role = _string(message, "role", where)
    if role not in ROLES:
        raise _Bad(f"{where}.role={role!r}: must be one of {ROLES}")
    content = message.get("content")
    if isinstance(content, dict):  # {"content": {"audio": path}}
        if set(content) != {"audio"}:
            raise _Bad(f'{where}.content: an object content must be {{"audio": path}}, got keys {sorted(content)}')
        if "audio" in message:
            raise _Bad(f"{where}: both 'audio' and 'content.audio'; give one")
        message, where = content, f"{where}.content"
    if "audio" in message:
        if message.get("content") is not None:
            raise _Bad(f"{where}: both 'content' text and 'audio'; a turn is either text or audio")
        if role == "system":
            raise _Bad(f"{where}: a system turn must be text, not audio")
        return Turn(role=role, audio=_audio_path(_string(message, "audio", where), base))
    return Turn(role=role, text=_string(message, "content", where))


def _check_order(turns: tuple[Turn, ...]) -> None:
    """Optional system turn, then user/assistant alternating, ending with an assistant turn."""
    if not any(turn.role == "assistant" for turn in turns):
        raise _Bad("field 'messages' has no assistant turn (nothing to train on)")
    start = 1 if turns[0].role == "system" else 0
    for i, turn in enumerate(turns[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turn.role != expected:
            raise _Bad(
                f"messages[{i}].role={turn.role!r}: expected {expected!r} (an optional system turn first, "
                "then user/assistant turns alternating)"
            )
    if turns[-1].role != "assistant":
        raise _Bad(f"messages[{len(turns) - 1}] is a user turn with no assistant reply after it")


def _id(record: dict, default: str | None) -> str:
    value = record.get("id")
    if value is None:
        if default is None:
            raise _Bad("missing field 'id'")
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # numeric ids are common in exported corpora
    return _string(record, "id")


def _string(record: dict, field: str, where: str | None = None) -> str:
    name = f"{where}.{field}" if where else field
    if field not in record or record[field] is None:
        raise _Bad(f"missing field '{name}'")
    value = record[field]
    if not isinstance(value, str):
        raise _Bad(f"field '{name}' must be a string, got {_type(value)}")
    if not value.strip():
        raise _Bad(f"empty field '{name}'")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON "\ud800" escapes decode to lone surrogates
        raise _Bad(f"field '{name}' is not valid Unicode (unpaired surrogate at character {err.start})") from None
    return value


def _optional_string(record: dict, field: str) -> str | None:
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _string(record, field)


def _duration(record: dict) -> float | None:
    value = record.get("duration")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"field 'duration' must be a number of seconds, got {_type(value)}")
    if not math.isfinite(value) or value <= 0:
        raise _Bad(f"field 'duration'={value}: must be a positive number of seconds")
    return float(value)


def _audio_path(value: str, base: Path) -> str:
    return value if os.path.isabs(value) else str(base / value)


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
