"""Pack JSONL manifests of speech/text into an audio-text dataset (megatron_most.data.indexed).

    manifests --(line order)--> shards of `shard_size` lines --(N worker processes)-->
        audio (AudioLoader, batched) -> HuBERT (HubertEncoder) -> units (UnitCodebook.assign)
        -> templates.render -> P.shards/NNNNN.{bin,idx,...} + NNNNN.rejects.jsonl + NNNNN.json (done mark)
    --> merged in shard order into P (+ P.rejects.jsonl), P.json written last.

Restartable: every shard is written under temporary names and renamed into place, its header
(NNNNN.json) last, so after an interruption a re-run skips the shards with a valid header and redoes
the rest. The run's settings are stored in P.shards/run.json and a re-run with different settings
(mode, tokenizer, codebook, HuBERT, layers, inputs, shard size, limits, templates, code version) is
refused rather than mixed; each resumed shard's header is also compared with the run's, so a lost
run.json cannot mix shards either.

Audio models load lazily (first sample with audio), so text-only data (lm, text instruct) needs no
HuBERT; an instruct sample whose audio cannot be rendered with the given models is rejected with
its reason, never a crash. The merged dataset is validated (token ids, <feat> counts) before the
run reports success.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_most.data import indexed
from megatron_most.data.templates import MODES, TASKS, TemplateOptions
from megatron_most.options import ConfigError, options, require

MANIFEST_KIND = {"asr": "speech", "tts": "speech", "lm": "text", "instruct": "instruct"}
# Bumped whenever the packing changes what a shard contains, so shards of older code are not resumed.
CODE_VERSION = 2
# Files that define a HF tokenizer (its directory may also hold the model's weights: ~31 GB for
# DeepSeek-V2-Lite, which must not be read just to fingerprint the tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
HUBERT_FILES = ("config.json", "preprocessor_config.json")
HUBERT_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
UNITS_LAYER = 11  # mHuBERT-base layer the release clusters (MOST_SPEC.md "Audio paths")
SAMPLE_RATE = 16000  # HuBERT input rate


@options
class PreprocessOptions:
    inputs: tuple[str, ...]
    """JSONL manifests, packed in this order (line order within each)."""
    task: str
    """asr | tts | lm | instruct (templates.render)."""
    output_prefix: str
    """Output prefix P: P.bin/.idx, P_loss_mask.*, P_features.* (features mode), P.json, P.rejects.jsonl."""
    tokenizer: str
    """sentencepiece .model file or Hugging Face tokenizer directory."""
    mode: str = "units"
    """units: audio becomes unit tokens; features: prompt audio becomes <feat> frames + stored features."""
    hubert: str | None = None
    """transformers HubertModel directory (needed by asr/tts; by instruct for audio turns: without it
    instruct packs text-only samples and rejects those with audio)."""
    layer: int | None = None
    """HuBERT hidden_states layer. Default: the codebook's layer, else 11 (clipped to the depth) for
    units, the last layer for features."""
    units: str | None = None
    """UnitCodebook (safetensors); needed whenever a unit token is produced (tts; asr in units mode;
    instruct in units mode with --hubert). Features-mode instruct without it rejects spoken replies."""
    text_vocab_size: int | None = None
    """Text rows of the model's table (default: the tokenizer's size; DeepSeek-V2-Lite: 102400)."""
    workers: int = 1
    """Worker processes; each gets cores/workers torch threads."""
    shard_size: int = 1000
    """Manifest lines per shard (the unit of parallel work and of restart)."""
    max_seconds: float = 60.0
    """Longer audio is rejected."""
    max_tokens: int | None = None
    """Longest sample in tokens (None: no limit). Use the model's seq_length + 1 so the training
    dataset never has to skip a sample. lm documents longer than this are split into consecutive
    chunks of <= max_tokens tokens (first chunk keeps <bos>, last keeps <eos>); longer samples of the
    other tasks are rejected ("too long")."""
    templates: TemplateOptions = dataclasses.field(default_factory=TemplateOptions)
    """Prompt templates (tools/preprocess_audio_text.py --template-config FILE.json)."""
    device: str = "auto"
    """auto | cpu | gpu: where DALI resamples and HuBERT runs."""
    batch_size: int = 32
    """Samples per audio-loading batch."""
    max_batch_seconds: float = 320.0
    """Padded audio seconds per HuBERT forward (bounds memory with long files)."""
    keep_shards: bool = False
    """Keep P.shards/ after the merge."""
    overwrite: bool = False
    """Replace an existing complete output (and discard unfinished shards of another run)."""
    progress: bool = True
    """tqdm progress bar on stderr."""

    def __post_init__(self):
        require(len(self.inputs) > 0, "inputs: give at least one manifest (--input MANIFEST ...)")
        require(self.task in TASKS, f"task={self.task!r}: must be one of {TASKS}")
        require(self.mode in MODES, f"mode={self.mode!r}: must be one of {MODES}")
        require(self.workers >= 1, f"workers={self.workers}: must be >= 1")
        require(self.shard_size >= 1, f"shard_size={self.shard_size}: must be >= 1 (e.g. 1000)")
        require(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        require(self.device in ("auto", "cpu", "gpu"), f"device={self.device!r}: use auto, cpu or gpu")
        require(self.max_batch_seconds > 0, f"max_batch_seconds={self.max_batch_seconds}: must be > 0")
        require(self.max_seconds > 0, f"max_seconds={self.max_seconds}: must be > 0 (e.g. 60)")
        require(
            self.max_tokens is None or self.max_tokens >= 2,
            f"max_tokens={self.max_tokens}: must be >= 2 (the model's seq_length + 1) or None for no limit",
        )
        require(
            isinstance(self.templates, TemplateOptions),
            f"templates={type(self.templates).__name__}: must be a TemplateOptions "
            "(TemplateOptions.from_dict(json) for a --template-config file)",
        )
        if self.task == "lm":
            require(
                self.mode == "units",
                "mode='features' with task='lm': text samples have no audio; use mode='units' (the default)",
            )
        elif self.task in ("asr", "tts") or self.mode == "features":
            # instruct in features mode needs the feature dimension for the layout of the whole dataset
            require(
                self.hubert is not None,
                f"hubert=None with task={self.task!r}, mode={self.mode!r}: pass "
                "--hubert DIR (a transformers HubertModel directory)"
                + ("; text-only instruct data packs in mode 'units' without it" if self.task == "instruct" else ""),
            )
        needs_units = (
            self.task == "tts"
            or (self.task == "asr" and self.mode == "units")
            or (self.task == "instruct" and self.mode == "units" and self.hubert is not None)
        )
        require(
            not needs_units or self.units is not None,
            f"units=None with task={self.task!r}, mode={self.mode!r}: unit tokens are produced; pass "
            "--units CODEBOOK (tools/train_units.py)"
            + ("; or drop --hubert to pack text-only instruct samples" if self.task == "instruct" else ""),
        )
        for path in self.inputs:
            require(Path(path).is_file(), f"inputs: manifest {path!r} does not exist")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Settings resolved once in the main process and shared by every worker (and checked on resume)."""

    task: str
    mode: str
    text_vocab_size: int
    num_units: int
    feature_dim: int
    features_layer: int | None
    units_layer: int | None
    tokenizer: str
    tokenizer_sha256: str
    hubert: str | None
    hubert_sha256: str | None
    codebook: str | None
    codebook_sha256: str | None
    inputs: tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns)
    shard_size: int
    max_seconds: float
    max_tokens: int | None
    templates: dict[str, str]
    format_version: int = indexed.VERSION
    code_version: int = CODE_VERSION

    def header(self) -> dict[str, Any]:
        """The dataset header fields that describe content (counts are added by the writer)."""
        return {
            "task": self.task,
            "mode": self.mode,
            "text_vocab_size": self.text_vocab_size,
            "num_units": self.num_units,
            "feature_dim": self.feature_dim,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "hubert": self.hubert,
            "hubert_sha256": self.hubert_sha256,
            "hubert_layer": self.features_layer if self.mode == "features" else self.units_layer,
            "units_layer": self.units_layer,
            "codebook": self.codebook,
            "codebook_sha256": self.codebook_sha256,
            "max_seconds": self.max_seconds,
            "max_tokens": self.max_tokens,
            "templates": dict(self.templates),
            "code_version": self.code_version,
        }

    def fingerprint(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------------------------ planning (main)


def make_plan(opts: PreprocessOptions, log=print) -> Plan:
    """Resolve and check every setting here, in the main process: a bad tokenizer, HuBERT, codebook or
    device is a ConfigError now, not a worker that dies at start (BrokenProcessPool)."""
    from megatron_most.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(opts.tokenizer)
    if opts.hubert:
        _check_device(opts.device)
    text_vocab = opts.text_vocab_size or tokenizer.vocab_size
    require(
        text_vocab >= tokenizer.vocab_size,
        f"text_vocab_size={text_vocab}: smaller than the tokenizer's {tokenizer.vocab_size} ids; "
        "leave it unset or use the model's text table size",
    )
    codebook = _load_codebook(opts.units) if opts.units else None
    depth = dim = None
    if opts.hubert:
        depth, dim = _hubert_shape(opts.hubert)
    units_layer = features_layer = None
    if codebook is not None:
        units_layer = _units_layer(opts, codebook, depth, log)
        cdim = int(codebook.centroids.shape[1])
        require(
            dim is None or cdim == dim,
            f"units={opts.units!r}: centroids have dimension {cdim} but the HuBERT at {opts.hubert!r} has "
            f"hidden size {dim}; use the codebook fitted on this HuBERT",
        )
    if opts.mode == "features" and opts.task != "lm":
        features_layer = depth if opts.layer is None else _check_layer(opts.layer, depth, "layer")
    return Plan(
        task=opts.task,
        mode=opts.mode,
        text_vocab_size=text_vocab,
        num_units=int(codebook.centroids.shape[0]) if codebook is not None else 0,
        feature_dim=dim if opts.mode == "features" else 0,
        features_layer=features_layer,
        units_layer=units_layer,
        tokenizer=str(Path(opts.tokenizer).resolve()),
        tokenizer_sha256=_sha256(opts.tokenizer, TOKENIZER_FILES + ("*.model",)),
        hubert=str(Path(opts.hubert).resolve()) if opts.hubert else None,
        hubert_sha256=_sha256(opts.hubert, HUBERT_FILES + HUBERT_WEIGHTS) if opts.hubert else None,
        codebook=str(Path(opts.units).resolve()) if opts.units else None,
        codebook_sha256=_sha256(opts.units) if opts.units else None,
        inputs=tuple((str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in opts.inputs),
        shard_size=opts.shard_size,
        max_seconds=opts.max_seconds,
        max_tokens=opts.max_tokens,
        templates=dataclasses.asdict(opts.templates),
    )


def _check_device(device: str) -> None:
    from megatron_most.platform import choose_device

    choose_device(device)


def _hubert_shape(path: str) -> tuple[int, int]:
    from transformers import HubertConfig

    directory = Path(path)
    require(
        directory.is_dir() and (directory / "config.json").is_file(),
        f"hubert={path!r}: no config.json there; pass a transformers HubertModel directory "
        "(save_pretrained output: config.json + model.safetensors)",
    )
    require(
        any(any(directory.glob(pattern)) for pattern in HUBERT_WEIGHTS),
        f"hubert={path!r}: no weights (model.safetensors / pytorch_model.bin); pass the complete HubertModel directory",
    )
    try:
        config = HubertConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"hubert={path!r}: not a transformers HubertModel directory ({err})") from None
    return config.num_hidden_layers, config.hidden_size


def _load_codebook(path: str):
    from megatron_most.audio.units import UnitCodebook

    if not Path(path).is_file():
        raise ConfigError(f"units={path!r}: no such file; pass a codebook from tools/train_units.py")
    return UnitCodebook.load(path)


def _units_layer(opts: PreprocessOptions, codebook, depth: int | None, log) -> int:
    fitted = getattr(codebook, "layer", None)
    if fitted is not None and opts.layer is not None and opts.mode == "units" and opts.layer != fitted:
        raise ConfigError(
            f"layer={opts.layer}: the codebook {opts.units!r} was fitted on layer {fitted}; units "
            f"of another layer are meaningless; drop --layer or pass --layer {fitted}"
        )
    if fitted is not None:
        return _check_layer(int(fitted), depth, "codebook layer")
    if opts.mode == "units" and opts.layer is not None:
        return _check_layer(opts.layer, depth, "layer")
    if depth is not None and UNITS_LAYER > depth:
        log(f"preprocess: the HuBERT has {depth} layers; units use layer {depth} instead of {UNITS_LAYER}")
        return depth
    return UNITS_LAYER


def _check_layer(layer: int, depth: int | None, name: str) -> int:
    require(
        depth is None or 0 <= layer <= depth,
        f"{name}={layer}: the HuBERT has hidden_states 0..{depth} (0 = after the feature projection)",
    )
    return layer


def _sha256(path: str, patterns: tuple[str, ...] = ()) -> str:
    """Content hash of a file, or of a directory's top-level files matching `patterns` (names included,
    sorted, streamed in 4 MB blocks): only what defines the tokenizer / model, not everything beside it."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
    else:
        files = [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ shards


@dataclasses.dataclass
class Shard:
    index: int
    items: list  # (source path, line number, sample | Rejected)


def iter_shards(plan: Plan, task: str) -> Iterator[Shard]:
    """Consecutive groups of `shard_size` non-blank manifest lines, across manifests in order."""
    from megatron_most.data.manifest import read_manifest

    items, index = [], 0
    for source, _, _ in plan.inputs:
        for line_no, sample in read_manifest(source, MANIFEST_KIND[task]):
            items.append((source, line_no, sample))
            if len(items) == plan.shard_size:
                yield Shard(index, items)
                items, index = [], index + 1
    if items:
        yield Shard(index, items)


def count_lines(paths) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def shard_prefix(shards_dir: Path, index: int) -> Path:
    return shards_dir / f"{index:05d}"


def shard_done(shards_dir: Path, index: int, plan: Plan) -> dict | None:
    """The header of a complete shard of this plan, or None (missing, partial, corrupt or packed with
    other settings: redo it)."""
    prefix = shard_prefix(shards_dir, index)
    if not indexed.header_path(prefix).exists() or not Path(f"{prefix}.rejects.jsonl").exists():
        return None
    try:
        header = indexed.validate(prefix, scan_tokens=False)
    except indexed.DatasetFormatError:
        return None
    expected = json.loads(json.dumps(plan.header()))  # as stored (tuples -> lists)
    if any(header.get(key) != value for key, value in expected.items()):
        return None
    return header


def clear_shard(shards_dir: Path, index: int) -> None:
    prefix = shard_prefix(shards_dir, index)
    indexed.remove_dataset(prefix)
    for suffix in (".rejects.jsonl", ".rejects.jsonl.partial"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)


def reason_kind(reason: str) -> str:
    """The reason without its specifics ("audio too long: 75.0 s > 60.0 s; file x" -> "audio too long")."""
    return re.split(r": | \(|=|; ", reason, maxsplit=1)[0]


# ------------------------------------------------------------------------------ the worker


class ShardWorker:
    """Everything one process needs to turn shards into packed files (models loaded once, on first use)."""

    def __init__(self, opts: PreprocessOptions, plan: Plan, *, threads: int):
        import torch

        from megatron_most.data.tokenizer import load_tokenizer
        from megatron_most.model.vocab import TokenLayout

        torch.set_num_threads(threads)
        self.opts, self.plan, self.threads = opts, plan, threads
        self.tokenizer = load_tokenizer(opts.tokenizer)
        self.layout = TokenLayout(plan.text_vocab_size, plan.num_units)
        self.templates = opts.templates
        self.model_seconds = 0.0
        self.loader = self.encoders = self.codebook = None

    def _load_audio_models(self) -> None:
        """HuBERT encoder(s), codebook and the audio loader, on the first sample with audio (text-only
        shards never load them)."""
        from megatron_most.audio.hubert import HubertEncoder
        from megatron_most.audio.loading import AudioLoader, AudioOptions
        from megatron_most.platform import choose_device

        opts, plan = self.opts, self.plan
        device = choose_device(opts.device)
        layers = {layer for layer in (plan.features_layer, plan.units_layer) if layer is not None}
        depth = _hubert_shape(opts.hubert)[0]
        # layer None for the last one: no output_hidden_states, so no copies of every layer's activations
        self.encoders = {
            layer: HubertEncoder(
                opts.hubert,
                layer=None if layer == depth else layer,
                device=device,
                max_batch_samples=int(opts.max_batch_seconds * SAMPLE_RATE),
            )
            for layer in sorted(layers)
        }
        if opts.units:
            self.codebook = _load_codebook(opts.units)
        # Clips shorter than the encoder's receptive field (400 samples for HuBERT, more with extra
        # convs) are rejected per sample by the loader; HubertEncoder would fail the whole batch.
        min_samples = max([400] + [e.min_samples for e in self.encoders.values()])
        self.loader = AudioLoader(
            AudioOptions(
                sample_rate=SAMPLE_RATE,
                max_seconds=opts.max_seconds,
                min_samples=min_samples,
                batch_size=opts.batch_size,
                num_threads=max(1, self.threads),
                device=opts.device,
            )
        )

    def run(self, shard: Shard, shards_dir: Path, progress=None) -> dict:
        """Pack one shard; return its header (counts). Partial files of an earlier attempt are replaced."""
        from megatron_most.rejects import RejectsWriter

        clear_shard(shards_dir, shard.index)
        prefix = shard_prefix(shards_dir, shard.index)
        writer = indexed.AudioTextWriter(prefix, feature_dim=self.plan.feature_dim)
        rejects_tmp = Path(f"{prefix}.rejects.jsonl.partial")
        stats = Counter()
        model_before = self.model_seconds
        with RejectsWriter(rejects_tmp) as rejects:
            for start in range(0, len(shard.items), self.opts.batch_size):
                batch = shard.items[start : start + self.opts.batch_size]
                self._pack_batch(batch, writer, rejects, stats)
                if progress is not None:
                    progress(len(batch))
        by_kind = Counter()
        for reason, n in rejects.counts.items():
            by_kind[reason_kind(reason)] += n
        os.replace(rejects_tmp, f"{prefix}.rejects.jsonl")
        return writer.finalize(
            {
                **self.plan.header(),
                "audio_seconds": stats["audio_samples"] / SAMPLE_RATE,
                "rejected": rejects.total,
                "rejected_by_reason": dict(by_kind.most_common()),
                "split_documents": stats["split_documents"],
                "split_chunks": stats["split_chunks"],
                "model_seconds": self.model_seconds - model_before,
                "shard": shard.index,
                "lines": len(shard.items),
            }
        )

    def _pack_batch(self, batch, writer, rejects, stats) -> None:
        from megatron_most.data.templates import RenderError, audio_refs, render
        from megatron_most.rejects import Rejected

        good = []
        for source, line, sample in batch:
            if isinstance(sample, Rejected):
                rejects.write(source, line, None, sample)
                continue
            refs = audio_refs(self.opts.task, sample)
            unusable = self._unusable_audio(refs)
            if unusable is not None:
                rejects.write(source, line, sample.id, unusable)
            else:
                good.append((source, line, sample, refs))
        segments, waves = self._audio([refs for *_, refs in good])
        for source, line, sample, refs in good:
            bad = next((path for path, _ in refs if isinstance(segments[path], Rejected)), None)
            if bad is not None:
                rejects.write(source, line, sample.id, Rejected(f"audio {segments[bad].reason}; file {bad}"))
                continue
            try:
                out = render(
                    self.opts.task,
                    sample,
                    {p: segments[p] for p, _ in refs},
                    self.tokenizer,
                    self.layout,
                    self.templates,
                    mode=self.plan.mode,
                )
            except RenderError as err:
                rejects.write(source, line, sample.id, Rejected(f"render: {err}"))
                continue
            pieces = self._limit_length(out, stats)
            if isinstance(pieces, Rejected):
                rejects.write(source, line, sample.id, pieces)
                continue
            for tokens, mask, features in pieces:
                writer.add(tokens, mask, features)
            stats["audio_samples"] += sum(len(waves[p]) for p in dict(refs))

    def _unusable_audio(self, refs: list[tuple[str, bool]]):
        """Rejected if this run's models cannot render the sample's audio (instruct data may mix text-only
        and spoken samples; plan-time checks already cover asr/tts), else None."""
        from megatron_most.rejects import Rejected

        if refs and self.opts.hubert is None:
            return Rejected(
                f"audio needs --hubert: this run packs text-only samples (no --hubert given); file {refs[0][0]}"
            )
        if self.opts.units is None:
            for path, is_response in refs:
                if is_response or self.plan.mode == "units":
                    what = "spoken reply" if is_response else "audio in units mode"
                    return Rejected(
                        f"{what} needs --units: unit tokens need a codebook (tools/train_units.py); file {path}"
                    )
        return None

    def _limit_length(self, out, stats):
        """[(tokens, loss_mask, features)] within max_tokens: lm documents split into consecutive chunks,
        other samples whole or Rejected (splitting a prompt from its response would teach nothing)."""
        from megatron_most.rejects import Rejected

        limit, n = self.opts.max_tokens, len(out.tokens)
        if limit is None or n <= limit:
            return [(out.tokens, out.loss_mask, out.features)]
        if self.opts.task != "lm":
            return Rejected(f"too long: {n} tokens > {limit} (max_tokens)")
        chunks = []
        for start in range(0, n, limit):
            mask = out.loss_mask[start : start + limit].copy()
            mask[0] = 0  # like the lm template's first token: nothing in this sample predicts it
            chunks.append((out.tokens[start : start + limit], mask, None))
        stats["split_documents"] += 1
        stats["split_chunks"] += len(chunks)
        return chunks

    def _audio(self, refs_per_sample: list[list[tuple[str, bool]]]):
        """path -> AudioSegment | Rejected for every audio of the batch; path -> waveform [samples]."""
        from megatron_most.data.templates import AudioSegment
        from megatron_most.rejects import Rejected

        need_features, need_units = set(), set()
        for refs in refs_per_sample:
            for path, is_response in refs:
                if self.plan.mode == "features" and not is_response:
                    need_features.add(path)
                else:
                    need_units.add(path)
        paths = sorted(need_features | need_units)
        if not paths:
            return {}, {}
        if self.loader is None:
            self._load_audio_models()
        loaded = dict(zip(paths, self.loader.load(paths)))
        waves = {p: w for p, w in loaded.items() if not isinstance(w, Rejected)}
        segments: dict[str, Any] = {p: w for p, w in loaded.items() if isinstance(w, Rejected)}
        features = {}  # (layer, path) -> [frames, dim] float16 tensor
        for layer, encoder in self.encoders.items():
            wanted = [
                p
                for p in waves
                if (p in need_features and layer == self.plan.features_layer)
                or (p in need_units and layer == self.plan.units_layer)
            ]
            features.update({(layer, p): f for p, f in self._encode(encoder, wanted, waves).items()})
        for path in waves:
            segment = AudioSegment()
            if path in need_features:
                segment.features = features[(self.plan.features_layer, path)].cpu().numpy()  # [frames, dim] fp16
            if path in need_units:
                segment.units = np.asarray(self.codebook.assign(features[(self.plan.units_layer, path)]))  # [n]
            segments[path] = segment
        return segments, waves

    def _encode(self, encoder, paths: list[str], waves: dict[str, np.ndarray]) -> dict:
        """HuBERT features per path (the encoder groups by length and bounds the padded batch)."""
        if not paths:
            return {}
        start = time.perf_counter()
        results = encoder([waves[p] for p in paths])  # each [frames, dim] float16
        self.model_seconds += time.perf_counter() - start
        return dict(zip(paths, results))


# ------------------------------------------------------------------------------ worker processes

_WORKER: ShardWorker | None = None
_PARENT = None
_COUNTER = None


def _init_worker(opts, plan, threads, counter, parent) -> None:
    global _WORKER, _PARENT, _COUNTER
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _PARENT, _COUNTER = parent, counter
    _WORKER = ShardWorker(opts, plan, threads=threads)


def _worker_progress(n: int) -> None:
    if os.getppid() != _PARENT:  # the main process died (killed): stop rather than work for nobody
        os._exit(1)
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _run_shard(shard: Shard, shards_dir: str) -> dict:
    return _WORKER.run(shard, Path(shards_dir), progress=_worker_progress)


# ------------------------------------------------------------------------------ the run


def preprocess(opts: PreprocessOptions, *, log=print) -> dict:
    """Pack `opts.inputs` into `opts.output_prefix`; return the dataset header (with run statistics)."""
    prefix = Path(opts.output_prefix)
    shards_dir = Path(f"{prefix}.shards")
    _check_output(opts, prefix)
    plan = make_plan(opts, log=log)
    _prepare_output(opts, prefix, shards_dir)  # only now: a run refused at planning deletes nothing
    _check_resume(shards_dir, plan, opts)
    start = time.perf_counter()
    headers, resumed = _run_shards(opts, plan, shards_dir, log)
    header = _merge_shards(plan, prefix, shards_dir, headers)
    _validate_output(prefix)
    header["model_seconds"] = sum(h.get("model_seconds", 0.0) for h in headers)
    header["wall_seconds"] = time.perf_counter() - start
    header["shards_resumed"], header["shards_packed"] = resumed, len(headers) - resumed
    if not opts.keep_shards:
        shutil.rmtree(shards_dir)
    log(summary_line(header))
    return header


def _check_output(opts: PreprocessOptions, prefix: Path) -> None:
    if indexed.header_path(prefix).exists() and not opts.overwrite:
        raise ConfigError(
            f"output_prefix={str(prefix)!r}: a complete dataset is already there "
            f"({indexed.header_path(prefix)}); pass --overwrite to replace it or choose "
            "another --output-prefix"
        )


def _prepare_output(opts: PreprocessOptions, prefix: Path, shards_dir: Path) -> None:
    """Remove what --overwrite replaces (called after the plan is validated)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if indexed.header_path(prefix).exists():
        indexed.remove_dataset(prefix)
        Path(f"{prefix}.rejects.jsonl").unlink(missing_ok=True)
    if opts.overwrite and shards_dir.exists():
        shutil.rmtree(shards_dir)
    shards_dir.mkdir(exist_ok=True)


def _check_resume(shards_dir: Path, plan: Plan, opts: PreprocessOptions) -> None:
    run = shards_dir / "run.json"
    current = plan.fingerprint()
    if run.exists():
        previous = json.loads(run.read_text(encoding="utf-8"))
        differ = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if differ:
            detail = "; ".join(f"{k}: was {previous.get(k)!r}, now {current.get(k)!r}" for k in differ[:4])
            raise ConfigError(
                f"output_prefix={opts.output_prefix!r}: {shards_dir} holds shards of an interrupted run with other "
                f"settings ({detail}); re-run with the same settings to resume, or pass --overwrite to start over"
            )
    else:
        indexed.write_json_atomic(run, current)


def _run_shards(opts: PreprocessOptions, plan: Plan, shards_dir: Path, log) -> tuple[list[dict], int]:
    """Pack every unfinished shard; return all shard headers in shard order and how many were resumed.

    Shards stream from the manifests (at most 2 per worker in flight), so memory does not grow with
    the corpus.
    """
    headers: dict[int, dict] = {}
    bar = _progress_bar(opts, count_lines(p for p, _, _ in plan.inputs))
    resumed = 0

    def todo() -> Iterator[Shard]:
        nonlocal resumed
        for shard in iter_shards(plan, opts.task):
            done = shard_done(shards_dir, shard.index, plan)
            if done is not None and done.get("lines") == len(shard.items):
                headers[shard.index] = done
                resumed += 1
                bar.update(len(shard.items))
            else:
                yield shard

    if opts.workers == 1:
        worker = None
        for shard in todo():
            worker = worker or ShardWorker(opts, plan, threads=max(1, os.cpu_count() or 1))
            headers[shard.index] = worker.run(shard, shards_dir, progress=bar.update)
    else:
        _run_pool(opts, plan, shards_dir, todo(), bar, headers)
    bar.close()
    if resumed:
        log(f"preprocess: resumed {resumed} packed shard(s), packed {len(headers) - resumed} more")
    return [headers[i] for i in sorted(headers)], resumed


def _run_pool(opts, plan, shards_dir: Path, shards: Iterator[Shard], bar, headers: dict[int, dict]) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // opts.workers)
    ctx = mp.get_context("spawn")  # fork after torch/DALI initialisation is unsafe
    counter = ctx.Value("q", 0)
    seen = 0
    # ProcessPoolExecutor (not Pool): a worker that dies raises BrokenProcessPool instead of hanging.
    pool = ProcessPoolExecutor(
        opts.workers, mp_context=ctx, initializer=_init_worker, initargs=(opts, plan, threads, counter, os.getpid())
    )
    try:
        pending = set()
        for shard in shards:
            pending.add(pool.submit(_run_shard, shard, str(shards_dir)))
            while len(pending) >= 2 * opts.workers:
                pending, seen = _collect(pending, headers, bar, counter, seen, wait, FIRST_COMPLETED)
        while pending:
            pending, seen = _collect(pending, headers, bar, counter, seen, wait, FIRST_COMPLETED)
    except BaseException:
        # Ctrl-C or a failed shard: don't wait for the shards in flight (a re-run redoes them);
        # workers exit at their next batch once this process is gone.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _collect(pending, headers, bar, counter, seen, wait, when):
    done, pending = wait(pending, timeout=0.2, return_when=when)
    for future in done:
        header = future.result()  # re-raises a worker's exception here
        headers[header["shard"]] = header
    value = counter.value
    if value > seen:  # update(0) would redraw the bar (a new line per call when stderr is a file)
        bar.update(value - seen)
    return pending, value


def _progress_bar(opts: PreprocessOptions, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="line", desc="preprocess", file=sys.stderr, disable=not opts.progress, dynamic_ncols=True
    )


def _merge_shards(plan: Plan, prefix: Path, shards_dir: Path, headers: list[dict]) -> dict:
    rejects_tmp = Path(f"{prefix}.rejects.jsonl.partial")
    reasons = Counter()
    with rejects_tmp.open("wb") as rejects:
        for h in headers:
            with open(f"{shard_prefix(shards_dir, h['shard'])}.rejects.jsonl", "rb") as f:
                shutil.copyfileobj(f, rejects)
            reasons.update(h["rejected_by_reason"])
    os.replace(rejects_tmp, f"{prefix}.rejects.jsonl")
    return indexed.concatenate(
        [str(shard_prefix(shards_dir, h["shard"])) for h in headers],
        prefix,
        {
            **plan.header(),
            "audio_seconds": sum(h["audio_seconds"] for h in headers),
            "rejected": sum(reasons.values()),
            "rejected_by_reason": dict(reasons.most_common()),
            "split_documents": sum(h.get("split_documents", 0) for h in headers),
            "split_chunks": sum(h.get("split_chunks", 0) for h in headers),
            "shards": len(headers),
            "inputs": [p for p, _, _ in plan.inputs],
        },
    )


def _validate_output(prefix: Path) -> None:
    """Read every token of the merged dataset once (ids inside the layout, <feat> count == frames), so a
    bad dataset is refused here rather than mid-training. A failure removes it (shards are kept)."""
    try:
        indexed.validate(prefix, scan_tokens=True)
    except indexed.DatasetFormatError:
        indexed.remove_dataset(prefix)
        raise


def summary_line(header: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in header.get("rejected_by_reason", {}).items())
    split = (
        f"; split {header['split_documents']} long documents into {header['split_chunks']} chunks"
        if header.get("split_documents")
        else ""
    )
    return (
        f"packed {header['samples']} samples, {header['audio_seconds'] / 3600:.3f} audio hours, "
        f"{header['tokens']} tokens{split}; rejected {header['rejected']}" + (f" ({reasons})" if reasons else "")
    )
