"""Keyword-only option dataclasses that reject unknown fields with a helpful message.

Every option class in megatron_most is declared with `@options` and documents each field
with a docstring right below it. Validation lives in `__post_init__` and raises
`ConfigError` (never `assert`), so bad settings fail at config time, before any process
group or model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is invalid; the message names the field, the value and the fix."""


def options(cls: type[T]) -> type[T]:
    """Make `cls` a frozen keyword-only dataclass with a `from_dict` that names unknown keys."""
    cls = dataclasses.dataclass(kw_only=True, frozen=True)(cls)
    cls.from_dict = classmethod(_from_dict)
    return cls


def _from_dict(cls, values: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid fields: {sorted(known)}"
            raise ConfigError(f"{cls.__name__}: unknown field {key!r}{hint}")
    return cls(**values)


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)
