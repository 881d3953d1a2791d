"""Pack JSONL manifests of speech/text into an audio-text dataset (megatron_most.data.indexed).

    manifests --(line order)--> shards of `shard_size` lines --(N worker processes)-->
        audio (AudioLoader, batched) -> HuBERT (HubertEncoder) -> units (UnitCodebook.assign)
        -> templates.render -> P.shards/NNNNN.{bin,idx,...} + NNNNN.rejects.jsonl + NNNNN.json (done mark)
    --> merged in shard order into P (+ P.rejects.jsonl), P.json written last.

Restartable: every shard is written under temporary names and renamed into place, its header
(NNNNN.json) last, so after an interruption a re-run skips the shards with a valid header and redoes
the rest. The run's settings are stored in P.shards/run.json and a re-run with different settings
(mode, tokenizer, codebook, HuBERT, layers, inputs, shard size) is refused rather than mixed.
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
from megatron_most.data.templates import MODES, TASKS
from megatron_most.options import ConfigError, options, require

MANIFEST_KIND = {"asr": "speech", "tts": "speech", "lm": "text", "instruct": "instruct"}
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
    """transformers HubertModel directory (needed by every task but lm)."""
    layer: int | None = None
    """HuBERT hidden_states layer. Default: the codebook's layer, else 11 (clipped to the depth) for
    units, the last layer for features."""
    units: str | None = None
    """UnitCodebook (safetensors); needed whenever a unit token is produced."""
    text_vocab_size: int | None = None
    """Text rows of the model's table (default: the tokenizer's size; DeepSeek-V2-Lite: 102400)."""
    workers: int = 1
    """Worker processes; each gets cores/workers torch threads."""
    shard_size: int = 1000
    """Manifest lines per shard (the unit of parallel work and of restart)."""
    max_seconds: float = 60.0
    """Longer audio is rejected."""
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
        if self.task == "lm":
            require(self.mode == "units", "mode='features' with task='lm': text samples have no audio; "
                                          "use mode='units' (the default)")
        else:
            require(self.hubert is not None, f"hubert=None with task={self.task!r}: pass --hubert DIR "
                                              "(a transformers HubertModel directory)")
        needs_units = self.task != "lm" and (self.mode == "units" or self.task == "tts")
        require(not needs_units or self.units is not None,
                f"units=None with task={self.task!r}, mode={self.mode!r}: unit tokens are produced; pass "
                "--units CODEBOOK (tools/train_units.py)")
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

    def header(self) -> dict[str, Any]:
        """The dataset header fields that describe content (counts are added by the writer)."""
        return {
            "task": self.task, "mode": self.mode, "text_vocab_size": self.text_vocab_size,
            "num_units": self.num_units, "feature_dim": self.feature_dim, "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256, "hubert": self.hubert, "hubert_sha256": self.hubert_sha256,
            "hubert_layer": self.features_layer if self.mode == "features" else self.units_layer,
            "units_layer": self.units_layer, "codebook": self.codebook, "codebook_sha256": self.codebook_sha256,
        }

    def fingerprint(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------------------------ planning (main)


def make_plan(opts: PreprocessOptions, log=print) -> Plan:
    from megatron_most.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(opts.tokenizer)
    text_vocab = opts.text_vocab_size or tokenizer.vocab_size
    require(text_vocab >= tokenizer.vocab_size,
            f"text_vocab_size={text_vocab}: smaller than the tokenizer's {tokenizer.vocab_size} ids; "
            "leave it unset or use the model's text table size")
    codebook = _load_codebook(opts.units) if opts.units else None
    depth = dim = None
    if opts.hubert:
        depth, dim = _hubert_shape(opts.hubert)
    units_layer = features_layer = None
    if codebook is not None:
        units_layer = _units_layer(opts, codebook, depth, log)
        cdim = int(codebook.centroids.shape[1])
        require(dim is None or cdim == dim,
                f"units={opts.units!r}: centroids have dimension {cdim} but the HuBERT at {opts.hubert!r} has "
                f"hidden size {dim}; use the codebook fitted on this HuBERT")
    if opts.mode == "features" and opts.task != "lm":
        features_layer = depth if opts.layer is None else _check_layer(opts.layer, depth, "layer")
    return Plan(
        task=opts.task, mode=opts.mode, text_vocab_size=text_vocab,
        num_units=int(codebook.centroids.shape[0]) if codebook is not None else 0,
        feature_dim=dim if opts.mode == "features" else 0,
        features_layer=features_layer, units_layer=units_layer,
        tokenizer=str(Path(opts.tokenizer).resolve()), tokenizer_sha256=_sha256(opts.tokenizer),
        hubert=str(Path(opts.hubert).resolve()) if opts.hubert else None,
        hubert_sha256=_sha256(opts.hubert) if opts.hubert else None,
        codebook=str(Path(opts.units).resolve()) if opts.units else None,
        codebook_sha256=_sha256(opts.units) if opts.units else None,
        inputs=tuple((str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in opts.inputs),
        shard_size=opts.shard_size,
    )


def _hubert_shape(path: str) -> tuple[int, int]:
    from transformers import HubertConfig

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
        raise ConfigError(f"layer={opts.layer}: the codebook {opts.units!r} was fitted on layer {fitted}; units "
                          f"of another layer are meaningless; drop --layer or pass --layer {fitted}")
    if fitted is not None:
        return _check_layer(int(fitted), depth, "codebook layer")
    if opts.mode == "units" and opts.layer is not None:
        return _check_layer(opts.layer, depth, "layer")
    if depth is not None and UNITS_LAYER > depth:
        log(f"preprocess: the HuBERT has {depth} layers; units use layer {depth} instead of {UNITS_LAYER}")
        return depth
    return UNITS_LAYER


def _check_layer(layer: int, depth: int | None, name: str) -> int:
    require(depth is None or 0 <= layer <= depth,
            f"{name}={layer}: the HuBERT has hidden_states 0..{depth} (0 = after the feature projection)")
    return layer


def _sha256(path: str) -> str:
    """Content hash of a file or of every file in a directory (names included)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
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


def shard_done(shards_dir: Path, index: int) -> dict | None:
    """The header of a complete shard, or None (missing, partial or corrupt: redo it)."""
    prefix = shard_prefix(shards_dir, index)
    if not indexed.header_path(prefix).exists() or not Path(f"{prefix}.rejects.jsonl").exists():
        return None
    try:
        return indexed.validate(prefix, scan_tokens=False)
    except indexed.DatasetFormatError:
        return None


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
    """Everything one process needs to turn shards into packed files (models loaded once)."""

    def __init__(self, opts: PreprocessOptions, plan: Plan, *, threads: int):
        import torch

        from megatron_most.data.templates import TemplateOptions
        from megatron_most.data.tokenizer import load_tokenizer
        from megatron_most.model.vocab import TokenLayout

        torch.set_num_threads(threads)
        self.opts, self.plan = opts, plan
        self.tokenizer = load_tokenizer(opts.tokenizer)
        self.layout = TokenLayout(plan.text_vocab_size, plan.num_units)
        self.templates = TemplateOptions()
        self.model_seconds = 0.0
        self.loader = self.encoders = self.codebook = None
        if opts.task != "lm":
            self._load_audio_models(threads)

    def _load_audio_models(self, threads: int) -> None:
        import torch

        from megatron_most.audio.hubert import HubertEncoder
        from megatron_most.audio.loading import AudioLoader, AudioOptions

        opts, plan = self.opts, self.plan
        self.loader = AudioLoader(AudioOptions(sample_rate=SAMPLE_RATE, max_seconds=opts.max_seconds,
                                               batch_size=opts.batch_size, num_threads=max(1, threads),
                                               device=opts.device))
        gpu = opts.device == "gpu" or (opts.device == "auto" and torch.cuda.is_available())
        device = "cuda" if gpu else "cpu"
        layers = {layer for layer in (plan.features_layer, plan.units_layer) if layer is not None}
        depth = _hubert_shape(opts.hubert)[0]
        # layer None for the last one: no output_hidden_states, so no copies of every layer's activations
        self.encoders = {layer: HubertEncoder(opts.hubert, layer=None if layer == depth else layer, device=device,
                                              max_batch_samples=int(opts.max_batch_seconds * SAMPLE_RATE))
                         for layer in sorted(layers)}
        if opts.units:
            self.codebook = _load_codebook(opts.units)

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
                batch = shard.items[start:start + self.opts.batch_size]
                self._pack_batch(batch, writer, rejects, stats)
                if progress is not None:
                    progress(len(batch))
        by_kind = Counter()
        for reason, n in rejects.counts.items():
            by_kind[reason_kind(reason)] += n
        os.replace(rejects_tmp, f"{prefix}.rejects.jsonl")
        return writer.finalize({
            **self.plan.header(), "audio_seconds": stats["audio_samples"] / SAMPLE_RATE,
            "rejected": rejects.total, "rejected_by_reason": dict(by_kind.most_common()),
            "model_seconds": self.model_seconds - model_before, "shard": shard.index, "lines": len(shard.items),
        })

    def _pack_batch(self, batch, writer, rejects, stats) -> None:
        from megatron_most.data.templates import RenderError, audio_refs, render
        from megatron_most.rejects import Rejected

        good = []
        for source, line, sample in batch:
            if isinstance(sample, Rejected):
                rejects.write(source, line, None, sample)
            else:
                good.append((source, line, sample, audio_refs(self.opts.task, sample)))
        segments, waves = self._audio([refs for *_, refs in good])
        for source, line, sample, refs in good:
            bad = next((path for path, _ in refs if isinstance(segments[path], Rejected)), None)
            if bad is not None:
                rejects.write(source, line, sample.id, Rejected(f"audio {segments[bad].reason}; file {bad}"))
                continue
            try:
                out = render(self.opts.task, sample, {p: segments[p] for p, _ in refs}, self.tokenizer, self.layout,
                             self.templates, mode=self.plan.mode)
            except RenderError as err:
                rejects.write(source, line, sample.id, Rejected(f"render: {err}"))
                continue
            writer.add(out.tokens, out.loss_mask, out.features)
            stats["audio_samples"] += sum(len(waves[p]) for p in dict(refs))

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
        loaded = dict(zip(paths, self.loader.load(paths)))
        waves = {p: w for p, w in loaded.items() if not isinstance(w, Rejected)}
        segments: dict[str, Any] = {p: w for p, w in loaded.items() if isinstance(w, Rejected)}
        features = {}  # (layer, path) -> [frames, dim] float16 tensor
        for layer, encoder in self.encoders.items():
            wanted = [p for p in waves if (p in need_features and layer == self.plan.features_layer)
                      or (p in need_units and layer == self.plan.units_layer)]
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
    _prepare_output(opts, prefix, shards_dir)
    plan = make_plan(opts, log=log)
    _check_resume(shards_dir, plan, opts)
    start = time.perf_counter()
    headers, resumed = _run_shards(opts, plan, shards_dir, log)
    header = _merge_shards(plan, prefix, shards_dir, headers)
    header["model_seconds"] = sum(h.get("model_seconds", 0.0) for h in headers)
    header["wall_seconds"] = time.perf_counter() - start
    header["shards_resumed"], header["shards_packed"] = resumed, len(headers) - resumed
    if not opts.keep_shards:
        shutil.rmtree(shards_dir)
    log(summary_line(header))
    return header


def _prepare_output(opts: PreprocessOptions, prefix: Path, shards_dir: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if indexed.header_path(prefix).exists():
        if not opts.overwrite:
            raise ConfigError(f"output_prefix={str(prefix)!r}: a complete dataset is already there "
                              f"({indexed.header_path(prefix)}); pass --overwrite to replace it or choose "
                              "another --output-prefix")
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
            done = shard_done(shards_dir, shard.index)
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
    pool = ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(opts, plan, threads, counter, os.getpid()))
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

    return tqdm(total=total, unit="line", desc="preprocess", file=sys.stderr, disable=not opts.progress,
                dynamic_ncols=True)


def _merge_shards(plan: Plan, prefix: Path, shards_dir: Path, headers: list[dict]) -> dict:
    rejects_tmp = Path(f"{prefix}.rejects.jsonl.partial")
    reasons = Counter()
    with rejects_tmp.open("wb") as rejects:
        for h in headers:
            with open(f"{shard_prefix(shards_dir, h['shard'])}.rejects.jsonl", "rb") as f:
                shutil.copyfileobj(f, rejects)
            reasons.update(h["rejected_by_reason"])
    os.replace(rejects_tmp, f"{prefix}.rejects.jsonl")
    return indexed.concatenate([str(shard_prefix(shards_dir, h["shard"])) for h in headers], prefix, {
        **plan.header(), "audio_seconds": sum(h["audio_seconds"] for h in headers),
        "rejected": sum(reasons.values()), "rejected_by_reason": dict(reasons.most_common()),
        "shards": len(headers), "inputs": [p for p, _, _ in plan.inputs],
    })


def summary_line(header: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in header.get("rejected_by_reason", {}).items())
    return (f"packed {header['samples']} samples, {header['audio_seconds'] / 3600:.3f} audio hours, "
            f"{header['tokens']} tokens; rejected {header['rejected']}" + (f" ({reasons})" if reasons else ""))
