"""`tools/generate.py`'s job: requests in, generations out, in batches with progress.

    requests = read_requests("asr", ["a.wav", "b.flac"])            # or a .txt / .jsonl file
    records = run(GenerateOptions(task="asr", checkpoint="runs/stage1", ...), requests)

Audio (any format `audio.AudioLoader` reads, resampled to 16 kHz) becomes HuBERT features
(`--mode features`) or codebook units (`--mode units`, and always for speech continuation); each
request becomes the prompt training rendered (inference/tasks.py); outputs are written as JSONL
(id, text, units, ids), and speech outputs as wav files when a vocoder is given. A request that
cannot be served (unreadable audio, a prompt longer than the context) is a record with its
`error`; every other request is still served.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import soundfile
import torch
from tqdm import tqdm

from megatron_most.audio import AudioLoader, AudioOptions, UnitCodebook
from megatron_most.audio.encoder import load_encoder
from megatron_most.audio.vocoder import load_vocoder
from megatron_most.data.templates import AudioSegment, TemplateOptions
from megatron_most.data.tokenizer import load_tokenizer
from megatron_most.inference.generate import Sampling, generate
from megatron_most.inference.hf import HFExport, is_hf_export
from megatron_most.inference.load import load_model
from megatron_most.inference.tasks import TASKS, build_prompt, decode
from megatron_most.options import ConfigError, options, require
from megatron_most.rejects import Rejected

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}


@options
class GenerateOptions:
    task: str = "asr"
    """asr (audio -> text), tts (text -> speech), continue (audio -> more speech), chat (text or audio in)."""
    checkpoint: str = ""
    """A pretraining save folder (its latest checkpoint), a torch_dist checkpoint folder, or a MoST
    Hugging Face export (served by transformers' generate(), one process)."""
    tokenizer: str = ""
    """The text tokenizer the model was trained with (sentencepiece .model or a HF tokenizer dir)."""
    hubert: str | None = None
    """Audio encoder for audio inputs (the one the training data was packed with): a HubertModel
    directory or "logmel"."""
    layer: int | None = None
    """HuBERT hidden_states index of the features (and of the units' codebook)."""
    units: str | None = None
    """Unit codebook (tools/train_units.py) for --mode units and speech continuation."""
    mode: str = "features"
    """How prompt audio enters: "features" (<feat> frames) or "units" (as packed for training)."""
    vocoder: str | None = None
    """Unit vocoder (tools/convert_vocoder.py output) to write speech outputs as wav files."""
    out: str = "generations.jsonl"
    """Output JSONL; wav files go to a folder beside it named after it."""
    max_new_tokens: int = 256
    """Generated tokens per request at most (generation also stops at the tokenizer's eos)."""
    batch_size: int = 8
    """Requests per batch."""
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    """Greedy by default; temperature / top-k / top-p sampling otherwise."""
    template: TemplateOptions = dataclasses.field(default_factory=TemplateOptions)
    """Prompt templates: the ones the model was trained with."""

    def __post_init__(self):
        require(self.task in TASKS, f"--task {self.task!r}: must be one of {TASKS}")
        require(self.checkpoint, "--checkpoint: required (a save folder or a torch_dist folder)")
        require(self.tokenizer, "--tokenizer: required (the tokenizer the model was trained with)")
        require(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1")
        require(self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens}: must be >= 1")


@dataclasses.dataclass
class Request:
    id: str
    value: str | dict
    """Input text, or {"audio": path}."""


def read_requests(task: str, inputs: list[str]) -> list[Request]:
    """Audio files, a text file (one input per line: texts, or audio paths for audio tasks) or a
    JSONL file ({"id", "text"} or {"id", "audio"} per line) -> requests."""
    audio_task = task in ("asr", "continue")
    out: list[Request] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() in AUDIO_SUFFIXES:
            out.append(Request(path.stem, {"audio": str(path)}))
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    value = {"audio": row["audio"]} if "audio" in row else row.get("text")
                    require(value is not None, f"{path}:{n}: a line needs 'text' or 'audio'")
                    out.append(Request(str(row.get("id", f"{path.stem}-{n}")), value))
        elif path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    out.append(Request(f"{path.stem}-{n}", {"audio": line.strip()} if audio_task else line.strip()))
        else:
            raise ConfigError(f"--input {item}: neither an audio file, a .txt nor a .jsonl file")
    seen = set()
    for request in out:
        require(
            request.id not in seen, f"--input: id {request.id!r} twice (two files with one name?); ids must be unique"
        )
        seen.add(request.id)
    return out


def encode_audio(paths: list[str], opts: GenerateOptions) -> dict[str, AudioSegment | Rejected]:
    """path -> its HuBERT features and/or units, or why it could not be read."""
    if not paths:
        return {}
    require(opts.hubert, f"--hubert: audio inputs ({paths[0]}, ...) need the HuBERT the model was trained with")
    waves = dict(zip(paths, AudioLoader(AudioOptions(device="cpu")).load(paths), strict=True))
    good = [p for p, w in waves.items() if not isinstance(w, Rejected)]
    encoder = load_encoder(opts.hubert, layer=opts.layer)
    features = dict(zip(good, encoder([waves[p] for p in good]), strict=True))
    codebook = UnitCodebook.load(opts.units) if opts.units else None
    out: dict[str, AudioSegment | Rejected] = {p: w for p, w in waves.items() if isinstance(w, Rejected)}
    for path in good:
        units = codebook.assign(features[path]) if codebook is not None else None
        out[path] = AudioSegment(units=None if units is None else np.asarray(units), features=features[path].numpy())
    return out


def run(opts: GenerateOptions, requests: list[Request], log=print, *, model=None, audio=None) -> list[dict]:
    """Serve every request; write and return the records (collective under torchrun: call on all
    ranks). `model` (already loaded) and `audio` (path -> AudioSegment, already encoded) are optional."""
    tokenizer = load_tokenizer(opts.tokenizer)
    if model is None:
        model = HFExport(opts.checkpoint) if is_hf_export(opts.checkpoint) else load_model(opts.checkpoint)
    layout = model.tokens
    if audio is None:
        audio = encode_audio(sorted({r.value["audio"] for r in requests if isinstance(r.value, dict)}), opts)
    records, ready = {}, []
    for request in requests:
        try:
            path = request.value["audio"] if isinstance(request.value, dict) else None
            if path is not None and isinstance(audio[path], Rejected):
                raise ConfigError(f"audio {path}: {audio[path].reason}")
            prompt = build_prompt(opts.task, request.value, audio, tokenizer, layout, opts.template, mode=opts.mode)
            limit = model.most.max_position_embeddings
            require(len(prompt.ids) + opts.max_new_tokens <= limit, f"prompt of {len(prompt.ids)} tokens: too long")
            ready.append((request, prompt))
        except (ConfigError, ValueError) as err:
            records[request.id] = {"id": request.id, "error": str(err)}
    is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    batches = range(0, len(ready), opts.batch_size)
    for start in tqdm(batches, desc=f"{opts.task}", unit="batch", disable=not is_writer):
        chunk = ready[start : start + opts.batch_size]
        prompts, settings = [p for _, p in chunk], dict(max_new_tokens=opts.max_new_tokens, eos_id=tokenizer.eos)
        if isinstance(model, HFExport):
            outputs = model.generate(prompts, **settings, sampling=opts.sampling)
        else:
            outputs = generate(model, prompts, **settings, sampling=opts.sampling)
        for (request, _), ids in zip(chunk, outputs, strict=True):
            out = decode(ids, tokenizer, layout)
            records[request.id] = {"id": request.id, "text": out.text, "units": out.units, "ids": out.ids}
    ordered = [records[r.id] for r in requests]
    if is_writer:
        _write(ordered, opts, log)
    return ordered


def _write(records: list[dict], opts: GenerateOptions, log) -> None:
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocoder = load_vocoder(opts.vocoder) if opts.vocoder else None
    wav_dir = out.with_suffix("")
    for record in records:
        if vocoder is not None and record.get("units"):
            wav_dir.mkdir(exist_ok=True)
            cfg = vocoder.config
            with torch.no_grad():  # MoST's units are deduplicated: the duration predictor restores lengths
                wave = vocoder(
                    torch.tensor([record["units"]]),
                    speaker=0 if cfg.num_speakers else None,  # multi-speaker vocoders: their first voice
                    style=0 if cfg.num_styles else None,
                    dur_prediction=cfg.duration_hidden_dim > 0,
                )[0].numpy()
            path = wav_dir / f"{record['id']}.wav"
            soundfile.write(path, wave, vocoder.config.sampling_rate)
            record["wav"] = str(path)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    failed = sum("error" in r for r in records)
    log(f"wrote {out}: {len(records) - failed} generated, {failed} failed")
