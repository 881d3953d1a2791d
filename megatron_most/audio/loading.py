"""Load audio files as float32 mono waveforms at one sample rate, in batches, with NVIDIA DALI.

Every path gets either a waveform or `Rejected(reason)`; one bad file never costs the rest of its
batch. Order of work:

1. probe each file with soundfile (exists, non-empty, header parses, frames > 0, WAV data chunk
   complete, duration <= max_seconds, long enough after resampling) -- cheap, and it keeps files that
   would kill a DALI batch out of it;
2. WAV/FLAC/OGG: one DALI pipeline decodes + downmixes (CPU), then resamples (CPU or GPU);
3. everything else (mp3: DALI's decoder cannot) and anything DALI failed on: soundfile decodes +
   downmixes, a second DALI pipeline resamples. A DALI failure invalidates the pipeline object, so the
   batch is rebuilt and retried per sample and only the failing sample falls through to step 3.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from megatron_most.options import options, require
from megatron_most.platform import choose_device
from megatron_most.rejects import Rejected

# Formats fn.decoders.audio reads (its docs: WAV, FLAC, OGG Vorbis/Opus); soundfile names them so.
DALI_FORMATS = frozenset({"WAV", "WAVEX", "FLAC", "OGG"})
# Formats whose header frame count is exact, so decoding fewer frames means the file is cut short
# (mp3 frame counts are estimates from the bitrate; ogg has no count in its header).
EXACT_FRAME_FORMATS = frozenset({"WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64", "CAF", "AU"})
_READ_BLOCK = 4096  # frames per soundfile read: small, so frames decoded before a mid-file error are counted


@options
class AudioOptions:
    sample_rate: int = 16000
    """Target rate in Hz (HuBERT expects 16 kHz)."""
    max_seconds: float = 60.0
    """Longer audio is rejected (checked from the header, before decoding)."""
    min_samples: int = 400
    """Shorter audio (at sample_rate) is rejected: 400 samples is one HuBERT frame's receptive field."""
    batch_size: int = 32
    """Files per DALI batch."""
    num_threads: int = 2
    """DALI CPU worker threads."""
    device: str = "auto"
    """Where DALI resamples: "cpu", "gpu" or "auto" (gpu when torch.cuda.is_available()). Decoding is
    always on the CPU (DALI has no GPU audio decoder)."""
    resample_quality: int = 50
    """DALI sinc resampler quality 0..100 (0: 3 lobes, 50: 16 lobes, 100: 64 lobes)."""

    def __post_init__(self):
        require(self.sample_rate > 0, f"AudioOptions.sample_rate={self.sample_rate}: must be > 0 (e.g. 16000)")
        require(self.max_seconds > 0, f"AudioOptions.max_seconds={self.max_seconds}: must be > 0 (e.g. 60.0)")
        require(self.min_samples >= 1, f"AudioOptions.min_samples={self.min_samples}: must be >= 1 (e.g. 400)")
        require(self.batch_size >= 1, f"AudioOptions.batch_size={self.batch_size}: must be >= 1 (e.g. 32)")
        require(self.num_threads >= 1, f"AudioOptions.num_threads={self.num_threads}: must be >= 1")
        require(
            self.device in ("cpu", "gpu", "auto"), f"AudioOptions.device={self.device!r}: use 'cpu', 'gpu' or 'auto'"
        )
        require(
            0 <= self.resample_quality <= 100,
            f"AudioOptions.resample_quality={self.resample_quality}: must be in 0..100 (default 50)",
        )


@dataclasses.dataclass(frozen=True)
class _Probe:
    """What the header says about one file that passed the checks."""

    path: str
    rate: int
    frames: int  # at the file's own rate
    format: str  # soundfile's format name, e.g. "WAV", "MP3"


class AudioLoader:
    """`load(paths)` -> one float32 mono [samples] array at `sample_rate` or a `Rejected` per path."""

    def __init__(self, options: AudioOptions):
        self.options = options
        self.device_id = _device_id(options.device)  # None: CPU-only DALI pipelines
        self._decode_pipe = None
        self._resample_pipe = None

    def load(self, paths: list[str | os.PathLike]) -> list[np.ndarray | Rejected]:
        results: list[np.ndarray | Rejected | None] = [None] * len(paths)
        dali, fallback = [], []  # (index, _Probe)
        for i, path in enumerate(paths):
            probe = probe_audio(str(path), self.options)
            if isinstance(probe, Rejected):
                results[i] = probe
            else:
                (dali if probe.format in DALI_FORMATS else fallback).append((i, probe))
        for start in range(0, len(dali), self.options.batch_size):
            chunk = dali[start : start + self.options.batch_size]
            for (i, probe), wave in zip(chunk, self._decode_batch([p for _, p in chunk])):
                if wave is None or self._short(wave, probe):
                    # DALI could not decode it alone, or decoded fewer frames than the header
                    # declares without an error: soundfile decodes it again and says why.
                    fallback.append((i, probe))
                else:
                    results[i] = wave
        self._load_fallback(fallback, results)
        return [self._check_length(wave) for wave in results]

    def _short(self, wave: np.ndarray, probe: _Probe) -> bool:
        """Fewer samples than the header's exact frame count gives after resampling (1 of rounding slack)."""
        expected = resampled_length(probe.frames, probe.rate, self.options.sample_rate)
        return probe.format in EXACT_FRAME_FORMATS and len(wave) < expected - 1

    # --- DALI decode path --------------------------------------------------------------------

    def _decode_batch(self, probes: list[_Probe]) -> list[np.ndarray | None]:
        """Decode + downmix + resample a batch with DALI; None for each file it cannot decode."""
        encoded = [np.fromfile(p.path, dtype=np.uint8) for p in probes]
        try:
            return self._run_decode(encoded)
        except RuntimeError:
            self._decode_pipe = None  # a failed run leaves the pipeline object invalid
        out = []
        for data in encoded:  # retry one by one so only the failing file is lost
            try:
                out.extend(self._run_decode([data]))
            except RuntimeError:
                self._decode_pipe = None
                out.append(None)
        return out

    def _run_decode(self, encoded: list[np.ndarray]) -> list[np.ndarray]:
        if self._decode_pipe is None:
            self._decode_pipe = _build(_decode_graph, self.options, self.device_id)
        self._decode_pipe.feed_input("encoded", encoded)
        (audio,) = self._decode_pipe.run()
        return _to_numpy(audio)

    # --- soundfile decode + DALI resample path -----------------------------------------------

    def _load_fallback(self, items: list[tuple[int, _Probe]], results: list) -> None:
        pending = []  # (index, wave at native rate, rate)
        # libsndfile runs outside the GIL (cffi), so threads decode files in parallel.
        with ThreadPoolExecutor(self.options.num_threads) as pool:
            waves = list(pool.map(read_soundfile, [probe for _, probe in items]))
        for (i, probe), wave in zip(items, waves):
            if isinstance(wave, Rejected) or probe.rate == self.options.sample_rate:
                results[i] = wave
            else:
                pending.append((i, wave, probe.rate))
        for start in range(0, len(pending), self.options.batch_size):
            chunk = pending[start : start + self.options.batch_size]
            waves = self._resample_batch([w for _, w, _ in chunk], [r for _, _, r in chunk])
            for (i, _, _), wave in zip(chunk, waves):
                results[i] = wave

    def _resample_batch(self, waves: list[np.ndarray], rates: list[int]) -> list[np.ndarray | Rejected]:
        try:
            return self._run_resample(waves, rates)
        except RuntimeError:
            self._resample_pipe = None
        out = []
        for wave, rate in zip(waves, rates):
            try:
                out.extend(self._run_resample([wave], [rate]))
            except RuntimeError as err:
                self._resample_pipe = None
                out.append(
                    Rejected(f"cannot resample {rate} Hz -> {self.options.sample_rate} Hz: {_dali_message(err)}")
                )
        return out

    def _run_resample(self, waves: list[np.ndarray], rates: list[int]) -> list[np.ndarray]:
        if self._resample_pipe is None:
            self._resample_pipe = _build(_resample_graph, self.options, self.device_id)
        self._resample_pipe.feed_input("wave", waves)
        self._resample_pipe.feed_input("rate", [np.array(r, dtype=np.float32) for r in rates])
        (audio,) = self._resample_pipe.run()
        return _to_numpy(audio)

    def _check_length(self, wave: np.ndarray | Rejected) -> np.ndarray | Rejected:
        # The probe checks the header's count; this catches files that decode shorter than declared.
        if not isinstance(wave, Rejected) and len(wave) < self.options.min_samples:
            return Rejected(f"too short: {len(wave)} samples < {self.options.min_samples}")
        return wave


def probe_audio(path: str, options: AudioOptions) -> _Probe | Rejected:
    """Header checks that need no decoding; a specific Rejected reason for the first one that fails."""
    file = Path(path)
    if not file.exists():
        return Rejected("missing file")
    if not file.is_file():
        return Rejected("not a regular file")
    if file.stat().st_size == 0:
        return Rejected("empty file")
    try:
        info = sf.info(path)
    except sf.SoundFileError as err:
        return Rejected(f"cannot decode: {_soundfile_message(err)}")
    declared = wav_declared_frames(path) if info.format in ("WAV", "WAVEX") else None
    if declared is not None and declared > info.frames:  # libsndfile quietly clamps to what is there
        return Rejected(f"truncated: header declares {declared} frames, file holds {info.frames}")
    if info.frames <= 0 or info.samplerate <= 0:
        return Rejected(f"no audio frames (frames={info.frames}, rate={info.samplerate})")
    seconds = info.frames / info.samplerate
    if seconds > options.max_seconds:
        return Rejected(f"too long: {seconds:.1f} s > {options.max_seconds:.1f} s")
    samples = resampled_length(info.frames, info.samplerate, options.sample_rate)
    if samples < options.min_samples:
        return Rejected(f"too short: {samples} samples < {options.min_samples}")
    return _Probe(path=path, rate=info.samplerate, frames=info.frames, format=info.format)


def resampled_length(frames: int, rate: int, target: int) -> int:
    """Output length of DALI's resampler (measured: ceil(frames * target / rate))."""
    return math.ceil(frames * target / rate)


def read_soundfile(probe: _Probe) -> np.ndarray | Rejected:
    """Decode with soundfile and downmix to mono (mean of channels) at the file's own rate."""
    blocks, got = [], 0
    try:
        with sf.SoundFile(probe.path) as f:
            while True:
                chunk = f.read(_READ_BLOCK, dtype="float32", always_2d=True)  # [n, channels]
                if not len(chunk):
                    break
                blocks.append(chunk.mean(axis=1))  # [n] mono
                got += len(chunk)
    except sf.SoundFileError as err:
        if got:
            return Rejected(f"truncated: decoded {got} of {probe.frames} frames ({_soundfile_message(err)})")
        return Rejected(f"cannot decode: {_soundfile_message(err)}")
    if got == 0:
        return Rejected("cannot decode: no frames decoded")
    if probe.format in EXACT_FRAME_FORMATS and got < probe.frames:
        return Rejected(f"truncated: decoded {got} of {probe.frames} frames")
    return np.concatenate(blocks).astype(np.float32, copy=False)


def wav_declared_frames(path: str) -> int | None:
    """Frames the RIFF 'data' chunk header declares (None if not a plain RIFF/WAVE or size unknown)."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        block_align = None
        while len(head := f.read(8)) == 8:
            chunk_id, size = head[:4], int.from_bytes(head[4:], "little")
            if chunk_id == b"data":
                # 0 / 0xFFFFFFFF: streaming writers that never filled the size in; nothing is declared.
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            body = f.read(min(size, 16)) if chunk_id == b"fmt " else b""
            if chunk_id == b"fmt " and len(body) >= 14:
                block_align = int.from_bytes(body[12:14], "little")
            f.seek(size + (size & 1) - len(body), os.SEEK_CUR)  # chunks are padded to even sizes
    return None


# --- DALI graphs (nvidia.dali is imported in the functions: heavy, loaded only to build a pipeline) ---


def _decode_graph(options: AudioOptions, gpu: bool):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)  # [bytes] whole file
    audio, rate = fn.decoders.audio(encoded, downmix=True, dtype=types.FLOAT)  # [samples] native rate
    return _resample_node(audio, rate, options, gpu)


def _resample_graph(options: AudioOptions, gpu: bool):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    wave = fn.external_source(name="wave", dtype=types.FLOAT, ndim=1)  # [samples] mono, native rate
    rate = fn.external_source(name="rate", dtype=types.FLOAT, ndim=0)  # scalar Hz per sample
    return _resample_node(wave, rate, options, gpu)


def _resample_node(audio, rate, options: AudioOptions, gpu: bool):
    import nvidia.dali.fn as fn

    # Same sinc kernel as decoders.audio(sample_rate=...) (measured identical), but it has a GPU backend.
    return fn.audio_resample(
        audio.gpu() if gpu else audio,
        in_rate=rate,
        out_rate=float(options.sample_rate),
        quality=float(options.resample_quality),
    )


def _build(graph, options: AudioOptions, device_id: int | None):
    from nvidia.dali import pipeline_def

    # prefetch_queue_depth=1: each feed_input is consumed by exactly the next run().
    pipe = pipeline_def(
        graph,
        batch_size=options.batch_size,
        num_threads=options.num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_dynamic=True,
    )(options, device_id is not None)
    pipe.build()
    return pipe


def _to_numpy(batch) -> list[np.ndarray]:
    if hasattr(batch, "as_cpu"):  # TensorListGPU
        batch = batch.as_cpu()
    return [np.array(batch.at(i), dtype=np.float32) for i in range(len(batch))]  # copies out of DALI's buffers


def _device_id(device: str) -> int | None:
    chosen = choose_device(device, field="AudioOptions.device")
    return chosen.index if chosen.type == "cuda" else None  # None: CPU-only DALI pipelines


def _dali_message(err: Exception) -> str:
    """The operator's own message out of DALI's multi-line error (between 'encountered:' and 'C++ context')."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1].split("C++ context", 1)[0]
    return " ".join(text.split()) or type(err).__name__


def _soundfile_message(err: Exception) -> str:
    # soundfile prefixes "Error opening '<path>': "; the path is already in the rejects log.
    text = str(err)
    return text.split("': ", 1)[1] if text.startswith("Error opening '") and "': " in text else text
