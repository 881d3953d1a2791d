"""`tools/evaluate.py`'s job: score a trained MoST the way the paper does.

    asr         speech manifest (.jsonl) or LibriSpeech folder -> transcripts -> WER/CER
    tts         texts of a speech manifest -> units -> transcribed back (the model's own ASR on the
                units, or an ASR judge on the vocoded waveform) -> WER/CER
    swuggy      ZeroSpeech 2021 gold.csv + its audio folder -> a log-likelihood per file -> accuracy
    sblimp      the same for sBLIMP
    storycloze  JSONL {"id", "positive": audio, "negative": audio} -> accuracy (spoken or topic)
    qa          JSONL {"id", "question" or "audio", "answers"} -> containment accuracy
    text        JSONL {"id", "text"} -> perplexity of the text tokens (the lm template's <bos>..<eos>)

Spoken-LM scores are the log-likelihood of the audio's units between <boa> and <eoa> (summed,
or per unit with `reduction="mean"`; the results say which). Results go to OUT/results.json,
OUT/results.md (beside the paper's numbers) and OUT/<task>.items.jsonl; an item that cannot be
evaluated is listed with its reason and every other item is still scored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from megatron_most.audio.vocoder import load_vocoder
from megatron_most.data.manifest import TextSample, read_manifest
from megatron_most.data.templates import AudioSegment, TemplateOptions, render
from megatron_most.data.tokenizer import load_tokenizer
from megatron_most.eval.judge import load_judge
from megatron_most.eval.perplexity import score_perplexity, score_units
from megatron_most.eval.qa import score_qa
from megatron_most.eval.report import write_results
from megatron_most.eval.storycloze import score_storycloze
from megatron_most.eval.wer import read_librispeech_transcripts, score_asr
from megatron_most.eval.zerospeech import file_key, read_gold, score_zerospeech
from megatron_most.inference.hf import HFExport, hf_log_likelihood, is_hf_export
from megatron_most.inference.load import load_model
from megatron_most.inference.run import GenerateOptions, Request, encode_audio, run
from megatron_most.inference.score import log_likelihood
from megatron_most.options import ConfigError, options, require
from megatron_most.rejects import Rejected

TASKS = ("asr", "tts", "swuggy", "sblimp", "storycloze", "qa", "text")


@options
class EvalOptions:
    task: str = "asr"
    """One of TASKS."""
    data: str = ""
    """The task's data: manifest, LibriSpeech folder, gold.csv or JSONL (see the module docstring)."""
    out: str = "eval"
    """Output folder."""
    name: str | None = None
    """Result name (e.g. asr_librispeech_clean, topic_storycloze: picks the paper's number); default: task."""
    audio_dir: str | None = None
    """ZeroSpeech: the folder of the gold.csv's audio files (default: beside gold.csv)."""
    reduction: str = "sum"
    """Spoken-LM score: "sum" of the units' log-likelihood or its "mean" per unit."""
    judge: str | None = None
    """TTS: a transformers ASR directory (Whisper or a CTC model) judging the vocoded speech; without
    it the model's own ASR transcribes its units."""
    language: str | None = "en"
    """Text normaliser of WER/CER: Whisper's English one for "en"."""
    generate: GenerateOptions = dataclasses.field(default_factory=GenerateOptions)
    """Checkpoint, tokenizer, audio encoders, vocoder, batch size and decoding."""

    def __post_init__(self):
        require(self.task in TASKS, f"--task {self.task!r}: must be one of {TASKS}")
        require(self.data, "--data: required (the task's manifest, folder or gold.csv)")
        require(self.reduction in ("sum", "mean"), f"--reduction {self.reduction!r}: 'sum' or 'mean'")


def evaluate(opts: EvalOptions, log=print) -> dict:
    """Run the task; write and return {name: result}. Collective under torchrun."""
    path = opts.generate.checkpoint
    model = HFExport(path) if is_hf_export(path) else load_model(path)
    task = {"asr": _asr, "tts": _tts, "swuggy": _zerospeech, "sblimp": _zerospeech, "storycloze": _storycloze}
    result = {**task, "qa": _qa, "text": _text}[opts.task](opts, model, log)
    results = {opts.name or opts.task: result}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        paths = write_results(results, opts.out)
        log(f"wrote {paths['json']} and {paths['markdown']}")
    return results


# ------------------------------------------------------------------------------ tasks


def _speech(path: str) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """(id, audio, text) of a speech manifest or a LibriSpeech folder, and failed lines."""
    if path.endswith(".jsonl"):
        rows, failures = [], []
        for line, sample in read_manifest(path, "speech"):
            if isinstance(sample, Rejected):
                failures.append({"id": None, "reason": f"{Path(path).name}:{line}: {sample.reason}"})
            else:
                rows.append((sample.id, sample.audio, sample.text))
        return rows, failures
    references, failures = read_librispeech_transcripts(path)
    audio = {p.stem: str(p) for p in Path(path).rglob("*") if p.suffix in (".flac", ".wav")}
    rows = [(i, audio[i], t) for i, t in references.items() if i in audio]
    failures += [{"id": i, "reason": "no audio file"} for i in references if i not in audio]
    return rows, failures


def _sub(opts: EvalOptions, task: str, name: str, **changes) -> GenerateOptions:
    out = str(Path(opts.out) / f"{name}.generations.jsonl")
    return dataclasses.replace(opts.generate, task=task, out=out, **changes)


def _hypotheses(records: list[dict]) -> dict:
    return {r["id"]: Rejected(r["error"]) if "error" in r else r["text"] for r in records}


def _asr(opts: EvalOptions, model, log) -> dict:
    rows, failures = _speech(opts.data)
    records = run(_sub(opts, "asr", "asr"), [Request(i, {"audio": a}) for i, a, _ in rows], log, model=model)
    return score_asr({i: t for i, _, t in rows}, _hypotheses(records), language=opts.language, failures=failures)


def _tts(opts: EvalOptions, model, log) -> dict:
    rows, failures = _speech(opts.data)
    spoken = run(_sub(opts, "tts", "tts"), [Request(i, t) for i, _, t in rows], log, model=model)
    units = {r["id"]: r.get("units") or [] for r in spoken if "error" not in r}
    hypotheses = {r["id"]: Rejected(r["error"]) for r in spoken if "error" in r}
    hypotheses |= {i: Rejected("no unit tokens generated") for i, u in units.items() if not u}
    units = {i: u for i, u in units.items() if u}
    if opts.judge:  # the paper's way: vocode, then an ASR model transcribes
        require(opts.generate.vocoder, "--judge needs --vocoder (the judge listens to waveforms)")
        vocoder, judge = load_vocoder(opts.generate.vocoder), load_judge(opts.judge)
        with torch.no_grad():
            waves = [
                vocoder(torch.tensor([u]), dur_prediction=vocoder.config.duration_hidden_dim > 0)[0]
                for u in units.values()
            ]
        hypotheses |= dict(zip(units, judge.transcribe(waves), strict=True))
    else:  # the model's own ASR on its units (prompt audio in units mode)
        hypotheses |= _units_asr(opts, model, units, "tts_asr", log)
    result = score_asr({i: t for i, _, t in rows}, hypotheses, language=opts.language, failures=failures)
    result["judge"] = opts.judge or "the model's own ASR on its units"
    if opts.generate.units:  # the spoken references' own units: how close, and what the judge makes of them
        reference = encode_audio([a for _, a, _ in rows], dataclasses.replace(opts.generate, mode="units"))
        reference = {
            i: [int(u) for u in reference[a].units] for i, a, _ in rows if not isinstance(reference[a], Rejected)
        }
        result["units"] = score_units(reference, units)
        if not opts.judge:
            back = _units_asr(opts, model, reference, "reference_units_asr", log)
            result["reference_units_asr"] = {
                k: v for k, v in score_asr({i: t for i, _, t in rows}, back, language=opts.language).items()
                if k in ("wer", "cer", "n_scored", "n_failed")
            }  # fmt: skip
    return result


def _units_asr(opts: EvalOptions, model, units: dict[str, list[int]], name: str, log) -> dict:
    """id -> transcript of the model's own ASR with `units` as the prompt audio (units mode)."""
    segments = {i: AudioSegment(units=np.asarray(u)) for i, u in units.items()}
    records = run(_sub(opts, "asr", name, mode="units"), [Request(i, {"audio": i}) for i in units], log,
                  model=model, audio=segments)  # fmt: skip
    return _hypotheses(records)


def _unit_scores(opts: EvalOptions, model, paths: list[str]) -> dict[str, tuple[float, int] | Rejected]:
    """path -> (summed log-likelihood, units) of <boa> units <eoa>'s units, or why it failed."""
    require(opts.generate.units, "spoken-LM scores need --units (the codebook the model was trained with)")
    audio = encode_audio(paths, dataclasses.replace(opts.generate, mode="units"))
    tokens, limit = model.tokens, model.most.max_position_embeddings
    for path in paths:  # one over-long file fails alone
        if not isinstance(audio[path], Rejected) and len(audio[path].units) + 1 > limit:
            audio[path] = Rejected(f"{len(audio[path].units)} units exceed the model's {limit} positions")
    good = [p for p in paths if not isinstance(audio[p], Rejected)]
    items = [([tokens.boa, *(int(tokens.unit(int(u))) for u in audio[p].units)], 1) for p in good]
    if isinstance(model, HFExport):
        values = hf_log_likelihood(model, items)
    else:
        values = log_likelihood(model, items, batch_size=opts.generate.batch_size)
    scores = dict(zip(good, values, strict=True))
    return {p: scores[p] if p in scores else audio[p] for p in paths}


def _value(score: tuple[float, int], reduction: str) -> float:
    total, count = score
    return total / count if reduction == "mean" else total


def _zerospeech(opts: EvalOptions, model, log) -> dict:
    gold = read_gold(opts.data)
    folder = Path(opts.audio_dir or Path(opts.data).parent)
    files = {}
    for row in gold:
        found = sorted(folder.glob(f"{file_key(row['filename'])}.*"))
        if found:
            files[file_key(row["filename"])] = str(found[0])
    scores = _unit_scores(opts, model, list(files.values()))
    by_file = {k: _value(scores[p], opts.reduction) for k, p in files.items() if not isinstance(scores[p], Rejected)}
    return score_zerospeech(opts.task, gold, by_file) | {"reduction": opts.reduction}


def _storycloze(opts: EvalOptions, model, log) -> dict:
    stories = [json.loads(line) for line in Path(opts.data).read_text().splitlines() if line.strip()]
    paths = sorted({s[side] for s in stories for side in ("positive", "negative")})
    scores = _unit_scores(opts, model, paths)
    items = {}
    for story in stories:
        sides = {side: scores[story[side]] for side in ("positive", "negative")}
        bad = [f"{side}: {s.reason}" for side, s in sides.items() if isinstance(s, Rejected)]
        items[story["id"]] = Rejected("; ".join(bad)) if bad else {
            side: {"logprob": s[0], "units": s[1]} for side, s in sides.items()
        }  # fmt: skip
    name = opts.name if opts.name in ("storycloze", "topic_storycloze") else "storycloze"
    return score_storycloze(items, reduction=opts.reduction, task=name)


def _text(opts: EvalOptions, model, log) -> dict:
    rows = [json.loads(line) for line in Path(opts.data).read_text().splitlines() if line.strip()]
    for n, row in enumerate(rows, 1):
        require("text" in row, f"{opts.data}:{n}: a line needs 'text'")
    tokenizer = load_tokenizer(opts.generate.tokenizer)
    items = []
    for row in rows:  # rendered exactly as training packed text (the lm template), scored from token 1
        rendered = render("lm", TextSample(str(row.get("id", "")), row["text"]), {}, tokenizer, model.tokens,
                          TemplateOptions(), mode="units")  # fmt: skip
        items.append(([int(t) for t in rendered.tokens], 1))
    if isinstance(model, HFExport):
        scores = hf_log_likelihood(model, items)
    else:
        scores = log_likelihood(model, items, batch_size=opts.generate.batch_size)
    return score_perplexity({str(r.get("id", n)): s for n, (r, s) in enumerate(zip(rows, scores, strict=True))})


def _qa(opts: EvalOptions, model, log) -> dict:
    rows = [json.loads(line) for line in Path(opts.data).read_text().splitlines() if line.strip()]
    for n, row in enumerate(rows, 1):
        if "answers" not in row or not ("question" in row or "audio" in row):
            raise ConfigError(f"{opts.data}:{n}: a line needs 'answers' and 'question' (text) or 'audio'")
    requests = [Request(str(r["id"]), {"audio": r["audio"]} if "audio" in r else r["question"]) for r in rows]
    records = run(_sub(opts, "chat", "qa"), requests, log, model=model)
    modality = "speech" if any("audio" in r for r in rows) else "text"
    return score_qa(_hypotheses(records), {str(r["id"]): r["answers"] for r in rows}, modality=modality)
