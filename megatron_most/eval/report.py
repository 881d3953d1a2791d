"""Results -> `results.json`, `results.md` (our numbers beside the paper's) and per-item JSONL files.

`results` maps a task name to the dict a scorer returned (`score_asr`, `score_zerospeech`,
`score_storycloze`, `score_qa`). Task names of PAPER get the paper's number beside ours; any other
name is still reported, with no published number. The per-item records of each scorer ("items":
per-utterance hypotheses, per-id pairs, per-story scores) go to `<task>.items.jsonl`, the rest to
results.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

PAPER = {
    # task: (label, MoST's published number, other systems the paper lists); MOST_SPEC.md.
    "asr_librispeech_clean": ("ASR LibriSpeech test-clean", 2.0, "Qwen2-Audio 1.8, MinMo 1.8, SpiritLM 6.0"),
    "asr_librispeech_other": ("ASR LibriSpeech test-other", 3.7, "Qwen2-Audio 3.6, MinMo 3.9, SpiritLM 11.0"),
    "tts_librispeech_clean": ("TTS LibriSpeech clean (ASR judge)", 6.0, ""),
    "tts_librispeech_other": ("TTS LibriSpeech other (ASR judge)", 7.2, ""),
    "swuggy": ("sWUGGY", 75.28, ""),
    "sblimp": ("sBLIMP", 63.42, ""),
    "topic_storycloze": ("sTopic-StoryCloze", 83.64, ""),
    "storycloze": ("sStoryCloze", 65.43, ""),
    "qa_llamaq": ("Spoken QA LlamaQ (speech->text)", 74.8, ""),
    "qa_triviaqa": ("Spoken QA TriviaQA (speech->text)", 43.5, ""),
    "qa_webq": ("Spoken QA WebQ (speech->text)", 58.2, ""),
}
DETAIL_KEYS = ("items",)
"""Per-item lists written to their own JSONL file instead of results.json."""


NOT_PERCENT = ("perplexity",)
"""Metrics reported as they are; every other metric is a fraction shown in percent."""


def headline(result: Mapping) -> float | None:
    """The result's main number (WER or accuracy in percent, perplexity as is), None when nothing was scored."""
    metric = result.get("metric", "")
    value = result.get(metric)
    return None if value is None else value if metric in NOT_PERCENT else 100.0 * value


def _notes(result: Mapping) -> str:
    """What the reader needs to compare the number: the variant scored and what failed."""
    notes = []
    if "reduction" in result:
        notes.append(f"{result['reduction']} log-likelihood")
    if "modality" in result:
        notes.append(f"{result['modality']} answers")
    if result.get("metric") == "wer" and result.get("cer") is not None:
        notes.append(f"CER {100.0 * result['cer']:.2f}")
    if result.get("accuracy_in_vocab") is not None:
        notes.append(f"in-vocab {100.0 * result['accuracy_in_vocab']:.2f}")
    return "; ".join(notes)


def _cell(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def markdown_table(results: Mapping[str, Mapping]) -> str:
    """One row per task: ours and MoST's published number (percent; perplexity as is), items scored and failed.

    Paper tasks come first in the paper's order, then any other task in the given order."""
    lines = [
        "| Task | Metric | Ours | MoST paper | Scored | Failed | Notes | Others in the paper |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    order = [t for t in PAPER if t in results] + [t for t in results if t not in PAPER]
    for task in order:
        result = results[task]
        label, paper, others = PAPER.get(task, (task, None, ""))
        metric = {"wer": "WER", "perplexity": "perplexity"}.get(result.get("metric"), "accuracy")
        scored = result.get("n_scored")
        lines.append(
            f"| {label} | {metric} | {_cell(headline(result))} | {_cell(paper)} | {scored if scored is not None else '—'} "
            f"| {result.get('n_failed', 0)} | {_notes(result)} | {others} |"
        )
    return "\n".join(lines) + "\n"


def _file_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def _json_safe(value):
    """NaN/inf are not JSON: written as strings so the file stays loadable by any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_items(path: str | os.PathLike, items) -> None:
    """Per-item records as JSONL (one JSON object a line), e.g. the per-utterance hypotheses."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(_json_safe(item), ensure_ascii=False) + "\n")


def write_results(results: Mapping[str, Mapping], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and <task>.items.jsonl under `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, summary = {}, {}
    for task, result in results.items():
        summary[task] = {k: v for k, v in result.items() if k not in DETAIL_KEYS}
        if task in PAPER:
            summary[task]["paper"] = PAPER[task][1]
        for key in DETAIL_KEYS:
            if key in result:
                paths[f"{task}.{key}"] = out / f"{_file_name(task)}.{key}.jsonl"
                write_items(paths[f"{task}.{key}"], result[key])
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"] = out / "results.md"
    paths["markdown"].write_text(markdown_table(results), encoding="utf-8")
    return paths
