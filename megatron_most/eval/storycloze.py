"""Spoken StoryCloze and topic StoryCloze: does the model prefer the true continuation?

Each item is a story with a positive (true) and a negative continuation, each scored by the model
as the log-likelihood of its audio units given the story. The score of a continuation is the sum
of its unit log-probabilities (reduction="sum", the default) or that sum divided by its number of
units (reduction="mean", the length-normalised variant: `--mean`). The two can disagree when the
continuations differ in length, so the result states which one was used. An item counts 1 when
the positive continuation scores higher, 0.5 on a tie (as ZeroSpeech counts ties), 0 otherwise.

Scores file (JSONL, one story per line):
    {"id", "positive": {"logprob": float, "units": int}, "negative": {"logprob": float, "units": int}}
or {"id", "error": "reason"} for a story the model failed on.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Iterable, Mapping

from megatron_most.options import ConfigError
from megatron_most.rejects import Rejected

REDUCTIONS = ("sum", "mean")
TASKS = ("storycloze", "topic_storycloze")


def continuation_score(logprob: float, units: int, reduction: str) -> float:
    """The score of one continuation: summed log-likelihood, or the mean per unit."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}: must be one of {REDUCTIONS}")
    return logprob if reduction == "sum" else logprob / units


def _check(side: str, value) -> tuple[float, int]:
    """A continuation's (logprob, units), or ValueError naming what is wrong with it."""
    if not isinstance(value, Mapping) or "logprob" not in value or "units" not in value:
        raise ValueError(f"{side}: needs {{'logprob', 'units'}}, got {value!r}")
    logprob, units = value["logprob"], value["units"]
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or math.isnan(logprob) or logprob > 0:
        raise ValueError(f"{side}: logprob {logprob!r} is not a log-likelihood (a number <= 0)")
    if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
        raise ValueError(f"{side}: units {units!r} is not a positive count")
    return float(logprob), units


def score_storycloze(
    items: Mapping[str, Mapping | Rejected],
    *,
    reduction: str = "sum",
    task: str = "storycloze",
    failures: Iterable[Mapping[str, str]] = (),
) -> dict:
    """Accuracy over stories {id: {"positive": {"logprob", "units"}, "negative": {...}} or Rejected}.

    Returns "accuracy" (a fraction), "reduction" (which score decided), "n_scored", "ties",
    "failed" (stories that could not be scored, with reasons) and "items" (per story: both
    scores under the chosen reduction and the outcome)."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}: must be one of {REDUCTIONS}")
    if task not in TASKS:
        raise ConfigError(f"task={task!r}: must be one of {TASKS}")
    records = [{"id": f.get("id"), "failed": f["reason"]} for f in failures]
    for story_id, item in items.items():
        record = {"id": story_id}
        records.append(record)
        if isinstance(item, Rejected):
            record["failed"] = item.reason
            continue
        try:
            positive = continuation_score(*_check("positive", item.get("positive")), reduction)
            negative = continuation_score(*_check("negative", item.get("negative")), reduction)
        except (ValueError, AttributeError) as e:
            record["failed"] = str(e)
            continue
        record["positive"], record["negative"] = positive, negative
        record["score"] = 1.0 if positive > negative else 0.5 if positive == negative else 0.0
    scored = [r["score"] for r in records if "score" in r]
    failed = [{"id": r["id"], "reason": r["failed"]} for r in records if "failed" in r]
    return {
        "metric": "accuracy",
        "task": task,
        "reduction": reduction,
        "accuracy": statistics.fmean(scored) if scored else None,
        "n_scored": len(scored),
        "ties": sum(s == 0.5 for s in scored),
        "n_failed": len(failed),
        "failed": failed,
        "items": records,
    }


def read_storycloze_scores(path: str | os.PathLike) -> tuple[dict[str, Mapping | Rejected], list[dict]]:
    """Stories from a JSONL scores file (module docstring). A line that is not JSON or has no id is
    a failure; {"id", "error"} becomes Rejected(error); a repeated id makes that story a failure."""
    items, failures = {}, []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            story_id = str(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            failures.append({"id": None, "reason": f"{Path(path).name}:{line_no}: unreadable ({e!r})"})
            continue
        if story_id in items:
            # Which of the two lines holds the model's score is unknown: the story is not scored.
            items[story_id] = Rejected(f"{Path(path).name}:{line_no}: id listed twice")
            continue
        items[story_id] = Rejected(str(record["error"])) if "error" in record else record
    return items, failures
