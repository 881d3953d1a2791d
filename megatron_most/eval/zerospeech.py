"""sWUGGY (lexical) and sBLIMP (syntactic) scoring in the ZeroSpeech 2021 format.

Inputs, as the official scorer (zerospeech/zerospeech2021) takes them:
- `gold.csv`: a header, then one row per audio file; the columns used are `id` (the pair or item
  group), `filename` (the wav stem), `correct` (1 = the real word / grammatical sentence, 0 = the
  foil), and when present `voice`, `frequency` (sWUGGY; LibriSpeech count of the word), `length`,
  `type` and `subtype` (sBLIMP). Other columns are ignored.
- scores: a mapping {filename: score} or a submission file (`lexical/dev.txt`,
  `syntactic/dev.txt`): one "<filename> <score>" line per file, higher = more likely.

Scoring follows the official definitions: within an id, each correct file is paired with each
foil of the same voice; a pair counts 1 when the correct file scores higher, 0.5 on a tie, 0
otherwise; pair scores are averaged per id (over voices), and the task score is the mean over
ids. The official scorer stops on any missing file; here a pair with a missing, duplicated or
unreadable score is reported as failed with its reason and the id is scored on its other pairs.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from megatron_most.options import ConfigError

TASKS = ("swuggy", "sblimp")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
# The official frequency bands: [0,1) [1,5) [5,20) [20,100) [100,inf) with its labels as printed
# (so "1-5" holds counts 1..4); kept identical so numbers compare with published breakdowns.
FREQUENCY_BANDS = ((1, "oov"), (5, "1-5"), (20, "6-20"), (100, "21-100"), (math.inf, ">100"))


def file_key(name: str) -> str:
    """A filename as the submission names it: no directory, no audio extension."""
    base = os.path.basename(name.strip())
    for suffix in AUDIO_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def read_gold(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ZeroSpeech gold.csv; the columns id, filename and correct are required."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"id", "filename", "correct"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"gold={str(path)!r}: columns {sorted(missing)} missing (has {reader.fieldnames})")
        return list(reader)


def read_scores(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, str]]:
    """A submission file of "<filename> <score>" lines -> ({filename: score}, {filename or line: reason}).

    A line that is not two fields or whose score is not a number, a NaN score, and a filename
    listed twice (which score would count is ambiguous) become failures instead of stopping."""
    scores, bad = {}, {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            bad[f"line {line_no}"] = f'must be "<filename> <score>" but is {line.strip()!r}'
            continue
        name = file_key(fields[0])
        try:
            value = float(fields[1])
        except ValueError:
            bad[name] = f"line {line_no}: score {fields[1]!r} is not a number"
            continue
        if math.isnan(value):
            bad[name] = f"line {line_no}: score is NaN"
        elif name in scores or name in bad:
            bad[name] = f"line {line_no}: {name} scored twice"
            scores.pop(name, None)
        else:
            scores[name] = value
    return scores, bad


def _mapping_scores(given: Mapping[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """{filename: score} given in memory, checked as `read_scores` checks a file's lines."""
    scores, bad = {}, {}
    for name, value in given.items():
        key = file_key(name)
        try:
            value = float(value)
        except (TypeError, ValueError):
            bad[key] = f"score {value!r} is not a number"
            continue
        if math.isnan(value):
            bad[key] = "score is NaN"
        elif key in scores or key in bad:
            # Two names that differ only in directory or extension: which one counts is unknown.
            bad[key] = f"{key} scored twice"
            scores.pop(key, None)
        else:
            scores[key] = value
    return scores, bad


def pair_score(correct: float, foil: float) -> float:
    """1 if the correct item scores higher, 0.5 on a tie, 0 otherwise."""
    return 1.0 if correct > foil else 0.5 if correct == foil else 0.0


def frequency_band(value: str | None) -> str | None:
    if value is None or not str(value).strip():
        return None
    try:
        count = float(value)
    except ValueError:
        return None  # an unreadable count leaves the id out of the breakdown, not out of the score
    return next(label for upper, label in FREQUENCY_BANDS if count < upper)


def _breakdown(per_id: list[dict], key: str) -> dict[str, dict]:
    groups = defaultdict(list)
    for item in per_id:
        if item.get(key) is not None:
            groups[item[key]].append(item["score"])
    order = sorted(groups, key=lambda name: (float(name), name) if _is_number(name) else (math.inf, name))
    return {name: {"n": len(groups[name]), "accuracy": statistics.fmean(groups[name])} for name in order}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def score_zerospeech(
    task: str,
    gold: str | os.PathLike | list[Mapping[str, str]],
    scores: str | os.PathLike | Mapping[str, float],
) -> dict:
    """Score sWUGGY (task="swuggy") or sBLIMP (task="sblimp") from gold rows and per-file scores.

    Returns "accuracy" (mean over ids of the per-id mean pair score, a fraction), "n_scored" (ids),
    "n_pairs", "failed" (pairs or ids that could not be scored, with reasons), breakdowns
    ("by_frequency" and "accuracy_in_vocab" for sWUGGY, "by_type"/"by_subtype" for sBLIMP) and
    "items": one record per id with its pairs."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r}: must be one of {TASKS}")
    rows = read_gold(gold) if isinstance(gold, (str, os.PathLike)) else list(gold)
    if isinstance(scores, (str, os.PathLike)):
        scores, bad_scores = read_scores(scores)
    else:
        scores, bad_scores = _mapping_scores(scores)
    failed = [{"item": key, "reason": reason} for key, reason in bad_scores.items() if key.startswith("line ")]

    groups = defaultdict(lambda: ([], []))  # (id, voice) -> (correct rows, foil rows)
    for row in rows:
        flag = str(row.get("correct") or "").strip()
        if not row.get("filename") or not row.get("id"):
            failed.append({"item": f"gold row {row}", "reason": "no filename or no id"})
            continue
        if flag not in ("0", "1"):
            failed.append({"item": f"file {row.get('filename')}", "reason": f"correct={flag!r} is not 0 or 1"})
            continue
        groups[(str(row["id"]), str(row.get("voice") or ""))][flag == "0"].append(row)

    per_id = defaultdict(lambda: {"pairs": []})
    for (item_id, voice), (corrects, foils) in groups.items():
        record = per_id[item_id]
        if not corrects or not foils:
            side = "correct" if not corrects else "incorrect"
            failed.append({"item": f"id {item_id} voice {voice}", "reason": f"no {side} file in gold.csv"})
            continue
        first = corrects[0]
        record.setdefault("word" if task == "swuggy" else "sentence", first.get("word") or first.get("transcription"))
        for column in ("frequency", "length", "type", "subtype"):
            if first.get(column) not in (None, ""):
                record.setdefault(column, first[column])
        for good in corrects:
            for foil in foils:
                names = (file_key(good["filename"]), file_key(foil["filename"]))
                reasons = [bad_scores.get(n) or f"no score for file {n}" for n in names if n not in scores]
                pair = {"voice": voice, "correct_file": names[0], "incorrect_file": names[1]}
                if reasons:
                    pair["failed"] = "; ".join(reasons)
                    failed.append(
                        {"item": f"id {item_id} voice {voice} {names[0]}/{names[1]}", "reason": pair["failed"]}
                    )
                else:
                    pair["scores"] = [scores[names[0]], scores[names[1]]]
                    pair["score"] = pair_score(scores[names[0]], scores[names[1]])
                record["pairs"].append(pair)

    items = []
    for item_id, record in per_id.items():
        scored = [p["score"] for p in record["pairs"] if "score" in p]
        record = {"id": item_id, **record}
        if scored:
            record["score"] = statistics.fmean(scored)
        else:
            record["failed"] = "no pair of this id could be scored"
        items.append(record)
    scored_ids = [r for r in items if "score" in r]
    gold_files = {file_key(r["filename"]) for r in rows if r.get("filename")}
    result = {
        "metric": "accuracy",
        "task": task,
        "accuracy": statistics.fmean(r["score"] for r in scored_ids) if scored_ids else None,
        "n_scored": len(scored_ids),
        "n_pairs": sum("score" in p for r in items for p in r["pairs"]),
        "n_failed": len(failed),
        "unused_scores": len(scores.keys() - gold_files),
        "failed": failed,
    }
    if task == "swuggy":
        for r in scored_ids:
            r["frequency_band"] = frequency_band(r.get("frequency"))
        bands = _breakdown(scored_ids, "frequency_band")
        result["by_frequency"] = {label: bands[label] for _, label in FREQUENCY_BANDS if label in bands}
        in_vocab = [r["score"] for r in scored_ids if r["frequency_band"] not in (None, "oov")]
        # The leaderboard's "in-vocabulary" score: the band means weighted by band size, i.e. the
        # mean over ids whose word occurs in LibriSpeech.
        result["accuracy_in_vocab"] = statistics.fmean(in_vocab) if in_vocab else None
        result["by_length"] = _breakdown(scored_ids, "length")
    else:
        result["by_type"] = _breakdown(scored_ids, "type")
        result["by_subtype"] = _breakdown(scored_ids, "subtype")
    result["items"] = items
    return result
