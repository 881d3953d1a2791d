"""Shards and the process that packs them (run by megatron_most.data.preprocess, in-process or in a pool).

A shard is `shard_size` consecutive manifest lines; `ShardWorker.run` packs one: audio (AudioLoader,
batched) -> HuBERT (HubertEncoder) -> units (UnitCodebook.assign) -> templates.render ->
P.shards/NNNNN.{bin,idx,...} + NNNNN.rejects.jsonl, and NNNNN.json (the shard's done mark) last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megatron_most.audio.encoder import load_encoder
from megatron_most.audio.loading import AudioLoader, AudioOptions
from megatron_most.data import indexed
from megatron_most.data.manifest import read_manifest
from megatron_most.data.preprocess_plan import Plan, PreprocessOptions, hubert_shape, load_codebook
from megatron_most.data.templates import AudioSegment, RenderError, audio_refs, render
from megatron_most.data.tokenizer import load_tokenizer
from megatron_most.model.vocab import TokenLayout
from megatron_most.platform import choose_device
from megatron_most.rejects import Rejected, RejectsWriter

MANIFEST_KIND = {"asr": "speech", "tts": "speech", "lm": "text", "instruct": "instruct"}
SAMPLE_RATE = 16000  # HuBERT input rate


@dataclasses.dataclass
class Shard:
    index: int
    items: list  # (source path, line number, sample | Rejected)


def iter_shards(plan: Plan, task: str) -> Iterator[Shard]:
    """Consecutive groups of `shard_size` non-blank manifest lines, across manifests in order."""
    items, index = [], 0
    for source, _, _ in plan.inputs:
        for line_no, sample in read_manifest(source, MANIFEST_KIND[task]):
            items.append((source, line_no, sample))
            if len(items) == plan.shard_size:
                yield Shard(index, items)
                items, index = [], index + 1
    if items:
        yield Shard(index, items)


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
        opts, plan = self.opts, self.plan
        device = choose_device(opts.device)
        layers = {layer for layer in (plan.features_layer, plan.units_layer) if layer is not None}
        depth = hubert_shape(opts.hubert)[0]
        # layer None for the last one: no output_hidden_states, so no copies of every layer's activations
        self.encoders = {
            layer: load_encoder(
                opts.hubert,
                layer=None if layer == depth else layer,
                device=device,
                max_batch_samples=int(opts.max_batch_seconds * SAMPLE_RATE),
            )
            for layer in sorted(layers)
        }
        if opts.units:
            self.codebook = load_codebook(opts.units)
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


def init_worker(opts, plan, threads, counter, parent) -> None:
    global _WORKER, _PARENT, _COUNTER
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _PARENT, _COUNTER = parent, counter
    _WORKER = ShardWorker(opts, plan, threads=threads)


def _worker_progress(n: int) -> None:
    if os.getppid() != _PARENT:  # the main process died (killed): stop rather than work for nobody
        os._exit(1)
    with _COUNTER.get_lock():
        _COUNTER.value += n


def run_shard(shard: Shard, shards_dir: str) -> dict:
    return _WORKER.run(shard, Path(shards_dir), progress=_worker_progress)
