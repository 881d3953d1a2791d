"""Corpus WER and CER with jiwer on normalised text, with a record per utterance.

Both sides are normalised (Whisper's English normaliser for "en"), then aligned word by word
(WER) and character by character, spaces included (CER). Corpus rates are total errors over total
reference words/characters, not a mean of per-utterance rates. Words are never glued together: the
release's `RemoveWhitespace()` turned each sentence into one "word", so its WER was the fraction
of sentences with any error (tests/test_eval_scoring.py pins the difference).

An utterance whose reference is empty after normalisation is scored explicitly (every hypothesis
word is an insertion; it has no WER of its own) because jiwer refuses or divides by zero on it.
A missing or failed hypothesis, or a hypothesis without a reference, is a failed item with its
reason; it is left out of the rates, and the rest is still scored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import jiwer

from megatron_most.data.manifest import read_manifest
from megatron_most.eval.normalize import normalizer_name, text_normalizer
from megatron_most.options import ConfigError
from megatron_most.rejects import Rejected


def _edits(reference: str, hypothesis: str, unit: str) -> dict[str, int]:
    """Substitutions, deletions, insertions and reference length of one normalised pair, in words
    (unit="words") or characters (unit="chars")."""
    ref_units = reference.split() if unit == "words" else list(reference)
    hyp_units = hypothesis.split() if unit == "words" else list(hypothesis)
    if not ref_units:
        # jiwer cannot align against an empty reference; every hypothesis unit is an insertion.
        return {"n": 0, "substitutions": 0, "deletions": 0, "insertions": len(hyp_units)}
    if not hyp_units:
        return {"n": len(ref_units), "substitutions": 0, "deletions": len(ref_units), "insertions": 0}
    out = (
        jiwer.process_words(reference, hypothesis)
        if unit == "words"
        else jiwer.process_characters(reference, hypothesis)
    )
    return {
        "n": len(ref_units),
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
    }


def _errors(counts: Mapping[str, int]) -> int:
    return counts["substitutions"] + counts["deletions"] + counts["insertions"]


def score_asr(
    references: Mapping[str, str],
    hypotheses: Mapping[str, str | Rejected],
    *,
    language: str | None = "en",
    failures: Iterable[Mapping[str, str]] = (),
) -> dict:
    """WER and CER of `hypotheses` against `references` (both keyed by utterance id).

    A hypothesis may be a `Rejected(reason)` for an utterance the model failed on; `failures` are
    items that failed before scoring (bad manifest lines: {"id", "reason"}). Returns the summary
    ("wer", "cer" as fractions, None when no reference word was scored; error counts; "failed")
    and "items": one record per utterance with the raw and normalised texts and its edits."""
    normalize = text_normalizer(language)
    items = [{"id": f.get("id"), "failed": f["reason"]} for f in failures]
    totals = {unit: {"n": 0, "substitutions": 0, "deletions": 0, "insertions": 0} for unit in ("words", "chars")}
    empty_references = 0
    for utt_id, reference in references.items():
        hypothesis = hypotheses.get(utt_id)
        record = {"id": utt_id, "reference": reference}
        if hypothesis is None or isinstance(hypothesis, Rejected):
            record["failed"] = "no hypothesis for this id" if hypothesis is None else hypothesis.reason
            items.append(record)
            continue
        if not isinstance(hypothesis, str):
            record["failed"] = f"hypothesis is a {type(hypothesis).__name__}, not text"
            items.append(record)
            continue
        ref_norm, hyp_norm = normalize(reference), normalize(hypothesis)
        record.update(hypothesis=hypothesis, reference_normalized=ref_norm, hypothesis_normalized=hyp_norm)
        for unit in ("words", "chars"):
            counts = _edits(ref_norm, hyp_norm, unit)
            record[unit] = counts
            for key, value in counts.items():
                totals[unit][key] += value
        record["wer"] = _errors(record["words"]) / record["words"]["n"] if record["words"]["n"] else None
        empty_references += record["words"]["n"] == 0
        items.append(record)
    for utt_id in sorted(hypotheses.keys() - references.keys(), key=str):
        items.append({"id": utt_id, "hypothesis": hypotheses[utt_id], "failed": "no reference for this id"})
    failed = [{"id": r["id"], "reason": r["failed"]} for r in items if "failed" in r]
    return {
        "metric": "wer",
        "wer": _errors(totals["words"]) / totals["words"]["n"] if totals["words"]["n"] else None,
        "cer": _errors(totals["chars"]) / totals["chars"]["n"] if totals["chars"]["n"] else None,
        "normalizer": normalizer_name(language),
        "n_scored": len(items) - len(failed),
        "n_failed": len(failed),
        "empty_references": empty_references,
        "words": totals["words"],
        "chars": totals["chars"],
        "failed": failed,
        "items": items,
    }


def read_librispeech_transcripts(path: str | os.PathLike) -> tuple[dict[str, str], list[dict]]:
    """References from LibriSpeech `*.trans.txt` files ("<utt-id> <TEXT>" per line) under a
    directory, or from one such file. Returns ({id: text}, failures); a duplicated id is a failure."""
    path = Path(path)
    files = sorted(path.rglob("*.trans.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"references={str(path)!r}: no LibriSpeech *.trans.txt file found")
    references, failures = {}, []
    for file in files:
        for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if utt_id in references:
                failures.append({"id": utt_id, "reason": f"{file.name}:{line_no}: id listed twice"})
                continue
            references[utt_id] = text
    return references, failures


def read_manifest_references(path: str | os.PathLike) -> tuple[dict[str, str], list[dict]]:
    """References from a speech manifest (JSONL {"id", "audio", "text", ...}, data/manifest.py);
    a rejected line becomes a failure naming the line and its reason."""
    references, failures = {}, []
    for line_no, sample in read_manifest(path, "speech"):
        if isinstance(sample, Rejected):
            failures.append({"id": None, "reason": f"{Path(path).name}:{line_no}: {sample.reason}"})
        elif sample.id in references:
            failures.append({"id": sample.id, "reason": f"{Path(path).name}:{line_no}: id listed twice"})
        else:
            references[sample.id] = sample.text
    return references, failures


def read_references(path: str | os.PathLike) -> tuple[dict[str, str], list[dict]]:
    """A speech manifest (.jsonl) or LibriSpeech transcripts (a directory or a .trans.txt file)."""
    return read_manifest_references(path) if str(path).endswith(".jsonl") else read_librispeech_transcripts(path)


def read_hypotheses(path: str | os.PathLike) -> tuple[dict[str, str | Rejected], list[dict]]:
    """Hypotheses from JSONL lines {"id", "hypothesis"} (or {"id", "error"} for a failed utterance),
    the format `write_items` saves. A line that cannot be read is a failure, the rest is kept."""
    hypotheses, failures = {}, []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                utt_id = record["id"]
                if "hypothesis" in record and isinstance(record["hypothesis"], str):
                    hypotheses[utt_id] = record["hypothesis"]
                else:
                    hypotheses[utt_id] = Rejected(str(record.get("error") or record.get("failed") or "no hypothesis"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                failures.append({"id": None, "reason": f"{Path(path).name}:{line_no}: unreadable ({e!r})"})
    return hypotheses, failures
