"""Rejected samples: a reason instead of a sample, and a JSONL log of them.

Data preparation never stops on one bad sample; it yields `Rejected(reason)` in its place and
the caller logs it with `RejectsWriter`, so a run reports what it dropped and why.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A sample that was dropped; `reason` names the problem (field, value) for the log."""

    reason: str


class RejectsWriter:
    """Append one JSONL line {"source", "line", "id", "reason"} per rejected sample.

    Use as a context manager; `summary()` gives the number of rejects per reason. A path of
    None only counts (nothing is written).
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        self.counts: collections.Counter[str] = collections.Counter()
        self._file = None

    def __enter__(self) -> "RejectsWriter":
        if self.path is not None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, source: str, line: int | None, sample_id: str | None, reason: str | Rejected) -> None:
        if isinstance(reason, Rejected):
            reason = reason.reason
        self.counts[reason] += 1
        if self._file is not None:
            record = {"source": str(source), "line": line, "id": sample_id, "reason": reason}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        """Rejects per reason, most frequent first."""
        return dict(self.counts.most_common())
