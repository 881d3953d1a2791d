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

Modules: preprocess_plan (PreprocessOptions, Plan, make_plan: settings checked in the main process),
preprocess_worker (shards, ShardWorker, the worker processes' entry points), this one (the run).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from megatron_most.data import indexed
from megatron_most.data.preprocess_plan import Plan, PreprocessOptions, make_plan
from megatron_most.data.preprocess_worker import (
    Shard,
    ShardWorker,
    init_worker,
    iter_shards,
    run_shard,
    shard_done,
    shard_prefix,
)
from megatron_most.options import ConfigError


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
    threads = max(1, (os.cpu_count() or 1) // opts.workers)
    ctx = mp.get_context("spawn")  # fork after torch/DALI initialisation is unsafe
    counter = ctx.Value("q", 0)
    seen = 0
    # ProcessPoolExecutor (not Pool): a worker that dies raises BrokenProcessPool instead of hanging.
    pool = ProcessPoolExecutor(
        opts.workers, mp_context=ctx, initializer=init_worker, initargs=(opts, plan, threads, counter, os.getpid())
    )
    try:
        pending = set()
        for shard in shards:
            pending.add(pool.submit(run_shard, shard, str(shards_dir)))
            while len(pending) >= 2 * opts.workers:
                pending, seen = _collect(pending, headers, bar, counter, seen)
        while pending:
            pending, seen = _collect(pending, headers, bar, counter, seen)
    except BaseException:
        # Ctrl-C or a failed shard: don't wait for the shards in flight (a re-run redoes them);
        # workers exit at their next batch once this process is gone.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _collect(pending, headers, bar, counter, seen):
    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
    for future in done:
        header = future.result()  # re-raises a worker's exception here
        headers[header["shard"]] = header
    value = counter.value
    if value > seen:  # update(0) would redraw the bar (a new line per call when stderr is a file)
        bar.update(value - seen)
    return pending, value


def count_lines(paths) -> int:
    """Non-blank lines of the manifests at `paths` (the progress bar's total)."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _progress_bar(opts: PreprocessOptions, total: int):
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
