"""AudioLoader on real speech (espeak-ng) in wav/flac/ogg/mp3 at 8..44.1 kHz, mono and stereo, and on
broken files mixed into the same batches.

Reference: soundfile decode, mean over channels, scipy's polyphase resampler. DALI uses a windowed
sinc kernel instead, so the two agree to a correlation near 1 (measured >= 0.998), not bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from megatron_most.audio.loading import AudioLoader, AudioOptions
from megatron_most.options import ConfigError
from megatron_most.rejects import Rejected
from tests.speech import make_corpus

FORMATS = (  # every container at rates other than 16 kHz, mono and stereo, plus a 16 kHz pass-through
    ("wav", 8000, 2),
    ("flac", 22050, 1),
    ("ogg", 24000, 2),
    ("mp3", 44100, 1),
    ("wav", 44100, 1),
    ("flac", 8000, 2),
    ("ogg", 44100, 1),
    ("mp3", 22050, 2),
    ("mp3", 24000, 1),
    ("wav", 16000, 1),
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    manifest = make_corpus(tmp_path_factory.mktemp("speech"), len(FORMATS), formats=FORMATS)
    return [json.loads(line)["audio"] for line in manifest.read_text().splitlines()]


def reference(path: str) -> tuple[np.ndarray, float]:
    """(16 kHz mono reference, exact resampled length) from the frames soundfile decodes."""
    data, rate = sf.read(path, dtype="float64", always_2d=True)  # [frames, channels]
    mono = data.mean(axis=1)
    g = math.gcd(16000, rate)
    return resample_poly(mono, 16000 // g, rate // g), len(mono) * 16000 / rate


def assert_matches_reference(wave: np.ndarray, path: str) -> None:
    ref, frames = reference(path)  # (mp3 headers only estimate the frame count; decoded frames are exact)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - round(frames)) <= 1, (path, len(wave), frames)
    n = min(len(wave), len(ref))
    corr = np.corrcoef(wave[:n], ref[:n])[0, 1]  # zero lag: also checks nothing is shifted
    assert corr > 0.99, (path, corr)
    assert 0.97 < wave[:n].std() / ref[:n].std() < 1.03, path  # downmix is a mean, not a sum


def test_formats_rates_channels_match_reference(corpus):
    loader = AudioLoader(AudioOptions(batch_size=4, device="cpu"))
    waves = loader.load(corpus)
    assert len(waves) == len(corpus)
    for path, wave in zip(corpus, waves):
        assert not isinstance(wave, Rejected), (path, wave)
        assert_matches_reference(wave, path)


def write_bad_files(directory: Path, good_flac: str, good_wav: str) -> dict[str, str]:
    """path -> the start of the reason it must be rejected with."""
    bad = {}
    bad[str(directory / "missing.wav")] = "missing file"
    (directory / "empty.wav").write_bytes(b"")
    bad[str(directory / "empty.wav")] = "empty file"
    (directory / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    bad[str(directory / "noise.flac")] = "cannot decode: "
    wav = Path(good_wav).read_bytes()
    (directory / "header_cut.wav").write_bytes(wav[:30])  # RIFF header cut before the data chunk
    bad[str(directory / "header_cut.wav")] = "cannot decode: "
    (directory / "half.wav").write_bytes(wav[: len(wav) // 2])  # data chunk declares more than is there
    bad[str(directory / "half.wav")] = "truncated: header declares"
    flac = Path(good_flac).read_bytes()
    (directory / "half.flac").write_bytes(flac[: len(flac) // 2])  # header fine, DALI's decoder dies mid-stream
    bad[str(directory / "half.flac")] = "truncated: decoded"
    sf.write(directory / "short.wav", np.zeros(199, np.float32), 16000)
    bad[str(directory / "short.wav")] = "too short: 199 samples < 400"
    sf.write(directory / "short8k.ogg", np.zeros(150, np.float32), 8000)  # 300 samples once resampled
    bad[str(directory / "short8k.ogg")] = "too short: 300 samples < 400"
    sf.write(directory / "long.wav", np.zeros(int(75.2 * 8000), np.int16), 8000)
    bad[str(directory / "long.wav")] = "too long: 75.2 s > 60.0 s"
    return bad


def test_bad_files_rejected_good_ones_kept(corpus, tmp_path):
    bad = write_bad_files(tmp_path, good_flac=corpus[1], good_wav=corpus[4])
    paths = []
    for i, path in enumerate(bad):  # bad files interleaved with good ones, across several DALI batches
        paths += [path, corpus[i % len(corpus)]]
    loader = AudioLoader(AudioOptions(batch_size=3, device="cpu"))
    out = loader.load(paths)
    clean = dict(zip(corpus, AudioLoader(AudioOptions(batch_size=3, device="cpu")).load(corpus)))
    for path, result in zip(paths, out):
        if path in bad:
            assert isinstance(result, Rejected), (path, result)
            assert result.reason.startswith(bad[path]), (path, result.reason)
        else:
            assert not isinstance(result, Rejected), (path, result)
            np.testing.assert_array_equal(result, clean[path])  # bad neighbours change nothing
            assert_matches_reference(result, path)


def test_truncated_flac_alone_in_dali_batch_gives_reason(corpus, tmp_path):
    flac = Path(corpus[1]).read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(flac[: len(flac) // 2])
    (result,) = AudioLoader(AudioOptions(device="cpu")).load([cut])
    assert isinstance(result, Rejected) and result.reason.startswith("truncated: decoded "), result
    assert f"of {sf.info(corpus[1]).frames} frames" in result.reason


def test_limits_follow_options(corpus):
    rate = sf.info(corpus[0]).samplerate
    seconds = sf.info(corpus[0]).frames / rate
    strict = AudioLoader(AudioOptions(max_seconds=seconds / 2, device="cpu")).load([corpus[0]])[0]
    assert strict.reason == f"too long: {seconds:.1f} s > {seconds / 2:.1f} s"
    wave = AudioLoader(AudioOptions(sample_rate=8000, device="cpu")).load([corpus[1]])[0]
    expected = sf.info(corpus[1]).frames * 8000 / sf.info(corpus[1]).samplerate
    assert abs(len(wave) - round(expected)) <= 1


def test_options_errors():
    with pytest.raises(ConfigError, match="device='tpu'"):
        AudioOptions(device="tpu")
    with pytest.raises(ConfigError, match="min_samples=0"):
        AudioOptions(min_samples=0)
    with pytest.raises(ConfigError, match="did you mean 'sample_rate'"):
        AudioOptions.from_dict({"samplerate": 16000})
    assert AudioLoader(AudioOptions(device="cpu")).load([]) == []


def test_silently_short_dali_decode_goes_to_soundfile(corpus, monkeypatch):
    """A WAV/FLAC that DALI decodes short without an error is re-decoded by soundfile, which gets
    the whole file (or names the truncation): never a half waveform passed off as good."""
    paths = [p for p in corpus if p.endswith((".wav", ".flac"))]
    full = AudioLoader(AudioOptions()).load(paths)
    loader = AudioLoader(AudioOptions())
    decode = loader._decode_batch
    monkeypatch.setattr(loader, "_decode_batch", lambda probes: [w[: len(w) // 2] for w in decode(probes)])
    for path, wave, ref in zip(paths, loader.load(paths), full):
        assert len(wave) == len(ref), path  # the soundfile + DALI resample path decoded it all
        assert_matches_reference(wave, path)
