"""Spoken QA accuracy (LlamaQ, TriviaQA, WebQ): is a reference answer contained in the model's answer?

Both sides go through `normalize_answer` (Whisper's English normaliser, articles removed); an
answer is correct when one of the item's normalised reference answers appears in the normalised
prediction as whole words ("paris" in "it is paris", but "no" not in "i know"). All reference
answers count, not only the first. For speech answers (modality="speech") the prediction is the
ASR judge's transcript of the spoken answer, scored the same way.

A failed item (no prediction, or no reference answer left after normalisation, which would be
contained in every prediction) is reported with its reason and left out of the accuracy; the
release dropped such items silently.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Mapping, Sequence

from megatron_most.eval.normalize import normalize_answer
from megatron_most.options import ConfigError
from megatron_most.rejects import Rejected

MODALITIES = ("text", "speech")


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether any answer, normalised, occurs as whole words in the normalised prediction."""
    padded = f" {normalize_answer(prediction)} "
    return any(f" {answer} " in padded for answer in map(normalize_answer, answers) if answer)


def score_qa(
    predictions: Mapping[str, str | Rejected],
    answers: Mapping[str, Sequence[str]],
    *,
    modality: str = "text",
    failures: Iterable[Mapping[str, str]] = (),
) -> dict:
    """Containment accuracy of `predictions` {id: text or Rejected} against `answers` {id: [answers]}.

    Returns "accuracy" (a fraction), "modality", "n_scored", "failed" and "items" (per question:
    prediction, answers, the normalised prediction and whether it is correct)."""
    if modality not in MODALITIES:
        raise ConfigError(f"modality={modality!r}: must be one of {MODALITIES}")
    records = [{"id": f.get("id"), "failed": f["reason"]} for f in failures]
    for item_id, references in answers.items():
        prediction = predictions.get(item_id)
        if isinstance(references, str):
            references = [references]  # one answer given as a bare string, not its characters
        record = {"id": item_id, "answers": list(references)}
        records.append(record)
        if prediction is None or isinstance(prediction, Rejected):
            record["failed"] = "no prediction for this id" if prediction is None else prediction.reason
        elif not isinstance(prediction, str):
            record["failed"] = f"prediction is a {type(prediction).__name__}, not text"
        elif not any(normalize_answer(a) for a in references if isinstance(a, str)):
            record["failed"] = "no reference answer is left after normalisation"
        else:
            record["prediction"] = prediction
            record["prediction_normalized"] = normalize_answer(prediction)
            record["correct"] = contains_answer(prediction, [a for a in references if isinstance(a, str)])
    for item_id in sorted(predictions.keys() - answers.keys(), key=str):
        records.append({"id": item_id, "failed": "no reference answers for this id"})
    scored = [r["correct"] for r in records if "correct" in r]
    failed = [{"id": r["id"], "reason": r["failed"]} for r in records if "failed" in r]
    return {
        "metric": "accuracy",
        "modality": modality,
        "normalizer": "whisper-english, articles removed; whole-word containment of any reference answer",
        "accuracy": statistics.fmean(scored) if scored else None,
        "n_scored": len(scored),
        "n_failed": len(failed),
        "failed": failed,
        "items": records,
    }
