"""Scores that need no reference model: text perplexity, and generated units against spoken references.

    score_perplexity({id: (summed log-probability, tokens)})   -> perplexity = exp(-sum / tokens)
    score_units({id: reference units}, {id: generated units})  -> unit error rate and unit accuracy

Unit accuracy is the share of reference units the Levenshtein alignment matches (hits / reference
units); the unit error rate is (substitutions + deletions + insertions) / reference units, like WER
over unit ids. Speaker and speaking rate change units too, so a TTS that speaks in another voice
than the reference scores below 100% even when every word is right: compare runs, not absolutes.
"""

from __future__ import annotations

import math
from typing import Mapping

import jiwer


def score_perplexity(scores: Mapping[str, tuple[float, int]]) -> dict:
    total = sum(s for s, _ in scores.values())
    count = sum(n for _, n in scores.values())
    items = [{"id": i, "logprob": s, "tokens": n} for i, (s, n) in scores.items()]
    return {
        "metric": "perplexity",
        "perplexity": math.exp(-total / count) if count else None,
        "nll_per_token": -total / count if count else None,
        "tokens": count,
        "n_scored": len(items),
        "items": items,
    }


def score_units(references: Mapping[str, list[int]], generated: Mapping[str, list[int]]) -> dict:
    """Alignment of each generated unit sequence with its reference (ids present in both)."""
    totals = {"n": 0, "hits": 0, "errors": 0}
    for key in references.keys() & generated.keys():
        ref, hyp = references[key], generated[key]
        if not ref:
            continue
        if not hyp:
            totals["n"] += len(ref)
            totals["errors"] += len(ref)
            continue
        out = jiwer.process_words(" ".join(map(str, ref)), " ".join(map(str, hyp)))
        totals["n"] += len(ref)
        totals["hits"] += out.hits
        totals["errors"] += out.substitutions + out.deletions + out.insertions
    n = totals["n"]
    return {
        "unit_error_rate": totals["errors"] / n if n else None,
        "unit_accuracy": totals["hits"] / n if n else None,
        "reference_units": n,
        "n_compared": len(references.keys() & generated.keys()),
    }
