"""Packing real speech (espeak-ng, wav/flac/ogg/mp3) into audio-text datasets, and their validation.

The packed tokens are compared against an independent assembly: sentencepiece called directly on
the template's text runs, transformers' HubertModel run on each waveform alone (no batching), and a
plain nearest-centroid loop with consecutive-duplicate removal. Files are read back with
Megatron's own IndexedDataset.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from megatron_most.data import indexed
from megatron_most.data.indexed import DatasetFormatError, open_audio_text
from megatron_most.data.preprocess import preprocess
from megatron_most.data.preprocess_plan import TOKENIZER_FILES, PreprocessOptions, _sha256, make_plan
from megatron_most.data.preprocess_worker import shard_done
from megatron_most.options import ConfigError
from tests import speech

ROOT = Path(__file__).resolve().parent.parent
LAYER = 3  # units layer of the codebook (the tiny HuBERT has 4 layers)
ASR_INSTRUCTION = "Transcribe the following speech into text."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    manifest = speech.make_corpus(root / "corpus", 8)
    hubert = speech.tiny_hubert(root / "hubert")
    sp_model = speech.sentencepiece_model(root / "sp")
    lines = manifest.read_text(encoding="utf-8").splitlines()
    waves = _reference_waves([json.loads(line)["audio"] for line in lines])
    feats = _reference_features(hubert, waves)
    from megatron_most.audio.units import UnitCodebook, fit_codebook

    codebook = fit_codebook([f[LAYER] for f in feats], k=12, n_init=1, max_iter=20, layer=LAYER)
    codebook.save(root / "codebook.safetensors")
    return dict(
        root=root,
        manifest=manifest,
        lines=lines,
        hubert=hubert,
        sp=sp_model,
        waves=waves,
        feats=feats,
        codebook=root / "codebook.safetensors",
        centroids=UnitCodebook.load(root / "codebook.safetensors"),
    )


def _reference_waves(paths):
    """16 kHz mono waveforms (the audio loader is tested on its own in test_audio_loading.py)."""
    from megatron_most.audio.loading import AudioLoader, AudioOptions

    return AudioLoader(AudioOptions(device="cpu")).load(paths)


def _reference_features(hubert_dir, waves):
    """hidden_states of a plain HubertModel on each waveform alone, rounded to float16 like the stored data."""
    from transformers import HubertModel

    model = HubertModel.from_pretrained(str(hubert_dir)).eval()
    out = []
    with torch.inference_mode():
        for wave in waves:
            states = model(torch.from_numpy(wave)[None], output_hidden_states=True).hidden_states
            out.append([s[0].to(torch.float16).float().numpy() for s in states])  # [layers+1] of [frames, dim]
    return out


def _reference_units(features, centroids):
    units = []
    for frame in features:  # plain loop: nearest centroid by squared distance, then drop repeats
        best = min(range(len(centroids)), key=lambda k: float(((frame - centroids[k]) ** 2).sum()))
        if not units or units[-1] != best:
            units.append(best)
    return units


def _reference_asr(sp, text, audio_tokens):
    """Release template: <bos>{instruction}\\n\\n{audio}<eos>\\n\\nOutput: <bos>{text}<eos>; loss on the response."""
    prompt = [sp.bos_id(), *sp.encode(ASR_INSTRUCTION + "\n\n"), *audio_tokens, sp.eos_id(), *sp.encode("\n\nOutput: ")]
    response = [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _opts(env, prefix, **kw):
    base = dict(
        inputs=(str(env["manifest"]),),
        task="asr",
        output_prefix=str(prefix),
        tokenizer=str(env["sp"]),
        hubert=str(env["hubert"]),
        units=str(env["codebook"]),
        shard_size=3,
        progress=False,
    )
    return PreprocessOptions(**{**base, **kw})


def _read(prefix):
    """Every sample through Megatron's IndexedDataset: [(tokens, loss_mask, features or None)]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}_loss_mask")
    feats = IndexedDataset(f"{prefix}_features") if Path(f"{prefix}_features.idx").exists() else None
    # copies: the arrays are views of mmaps that close with their IndexedDataset
    return [
        (tokens[i].tolist(), mask[i].tolist(), None if feats is None else np.array(feats[i]))
        for i in range(len(tokens))
    ]


@pytest.fixture(scope="module")
def units_run(env):
    prefix = env["root"] / "out" / "asr_units"
    header = preprocess(_opts(env, prefix), log=lambda *_: None)
    return prefix, header


def test_asr_units_match_independent_assembly(env, units_run):
    import sentencepiece as spm

    prefix, header = units_run
    sp = spm.SentencePieceProcessor(model_file=str(env["sp"]))
    T = sp.get_piece_size()
    centroids = env["centroids"].centroids.numpy()
    samples = _read(prefix)
    assert len(samples) == 8 and header["samples"] == 8 and header["rejected"] == 0
    assert header["num_units"] == 12 and header["units_layer"] == LAYER and header["text_vocab_size"] == T
    for i in (0, 1, 3, 6):  # wav 16 kHz, flac 22.05 kHz stereo, mp3 24 kHz, flac
        units = _reference_units(env["feats"][i][LAYER], centroids)
        audio = [T, *(T + 3 + u for u in units), T + 1]  # <boa> units <eoa>
        expected_tokens, expected_mask = _reference_asr(sp, json.loads(env["lines"][i])["text"], audio)
        assert samples[i][0] == expected_tokens, f"sample {i}"
        assert samples[i][1] == expected_mask
    seconds = sum(len(w) for w in env["waves"]) / 16000
    assert header["audio_seconds"] == pytest.approx(seconds)
    assert header["tokens"] == sum(len(s[0]) for s in samples)


def test_asr_features_match_hubert(env, tmp_path):
    import sentencepiece as spm

    header = preprocess(_opts(env, tmp_path / "f", mode="features", units=None), log=lambda *_: None)
    sp = spm.SentencePieceProcessor(model_file=str(env["sp"]))
    T = sp.get_piece_size()
    assert header["mode"] == "features" and header["feature_dim"] == 32 and header["hubert_layer"] == 4
    samples = _read(tmp_path / "f")
    for i in (0, 2, 4):  # wav, ogg 44.1 kHz, wav 8 kHz stereo
        last = env["feats"][i][-1]  # [frames, 32]
        audio = [T, *[T + 2] * len(last), T + 1]  # <boa> <feat>*frames <eoa>
        expected_tokens, expected_mask = _reference_asr(sp, json.loads(env["lines"][i])["text"], audio)
        assert samples[i][0] == expected_tokens and samples[i][1] == expected_mask
        stored = samples[i][2].view(np.float16).reshape(-1, 32).astype(np.float32)
        np.testing.assert_allclose(stored, last, atol=2e-2, rtol=1e-2)
    files = open_audio_text(tmp_path / "f")
    assert files.sample_features(0).shape == (len(env["feats"][0][-1]), 32)


def test_tts_and_text_lm(env, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(env["sp"]))
    T = sp.get_piece_size()
    preprocess(_opts(env, tmp_path / "tts", task="tts", shard_size=8), log=lambda *_: None)
    centroids = env["centroids"].centroids.numpy()
    samples = _read(tmp_path / "tts")
    for i in (0, 5):
        text = json.loads(env["lines"][i])["text"]
        prompt = [
            sp.bos_id(),
            *sp.encode("Convert the following text into speech.\n\n" + text),
            sp.eos_id(),
            *sp.encode("\n\nOutput: "),
        ]
        units = _reference_units(env["feats"][i][LAYER], centroids)
        response = [sp.bos_id(), T, *(T + 3 + u for u in units), T + 1, sp.eos_id()]  # units are targets
        assert samples[i][0] == prompt + response
        assert samples[i][1] == [0] * len(prompt) + [1] * len(response)

    corpus = speech.make_text_corpus(tmp_path / "text.jsonl", n=5)
    header = preprocess(
        _opts(env, tmp_path / "lm", task="lm", inputs=(str(corpus),), hubert=None, units=None), log=lambda *_: None
    )
    assert header["samples"] == 5 and header["audio_seconds"] == 0 and header["num_units"] == 0
    for (tokens, mask, _), line in zip(_read(tmp_path / "lm"), corpus.read_text().splitlines()):
        assert tokens == [sp.bos_id(), *sp.encode(json.loads(line)["text"]), sp.eos_id()]
        assert mask == [0] + [1] * (len(tokens) - 1)


def _bad_corpus(env, directory: Path) -> tuple[Path, dict]:
    """The 8 good lines with every kind of bad line between them; returns (manifest, expected reason counts)."""
    directory.mkdir()
    good = env["lines"]
    source = json.loads(good[0])["audio"]
    data = Path(source).read_bytes()
    (directory / "empty.wav").write_bytes(b"")
    (directory / "corrupt.wav").write_bytes(bytes(range(256)) * 40)
    (directory / "truncated.wav").write_bytes(data[: len(data) // 2])
    sf.write(directory / "short.wav", np.zeros(100, np.float32), 16000)
    sf.write(directory / "long.wav", 0.1 * np.sin(np.arange(16000 * 5) / 9).astype(np.float32), 16000)

    def speech_line(audio, text="hello world", **extra):
        return json.dumps({"id": Path(audio).stem, "audio": str(audio), "text": text, **extra}).encode()

    bad = [
        (speech_line(directory / "missing.wav"), "audio missing file"),
        (speech_line(directory / "empty.wav"), "audio empty file"),
        (speech_line(directory / "corrupt.wav"), "audio cannot decode"),
        (speech_line(directory / "truncated.wav"), "audio truncated"),
        (speech_line(directory / "short.wav"), "audio too short"),
        (speech_line(directory / "long.wav"), "audio too long"),
        (speech_line(source, text=""), "empty field 'text'"),
        (b'{"id": "x", "audio": "a.wav", "text": "caf\xe9"}', "line is not valid UTF-8"),
        (b"this is not json", "not JSON"),
        (json.dumps({"id": "y", "audio": source}).encode(), "missing field 'text'"),
    ]
    lines = []
    for i, line in enumerate(good):
        lines.append(line.encode())
        if i < len(bad):
            lines.append(bad[i][0])
    lines += [b for b, _ in bad[len(good) :]]
    manifest = directory / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest, {reason: 1 for _, reason in bad}


def test_bad_inputs_are_rejected_and_good_ones_packed(env, units_run, tmp_path):
    manifest, expected = _bad_corpus(env, tmp_path / "bad")
    log = []
    header = preprocess(
        _opts(env, tmp_path / "out", inputs=(str(manifest),), max_seconds=4.0, shard_size=4), log=log.append
    )
    assert header["samples"] == 8 and header["rejected"] == 10
    assert header["rejected_by_reason"] == expected
    assert "rejected 10" in log[-1] and "audio too long: 1" in log[-1]
    rejects = [json.loads(line) for line in Path(f"{tmp_path / 'out'}.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 10 and all(r["source"] == str(manifest.resolve()) and r["line"] for r in rejects)
    assert any(r["reason"] == f"audio missing file; file {tmp_path / 'bad' / 'missing.wav'}" for r in rejects)
    assert {r["line"] for r in rejects} == {2 * i + 2 for i in range(8)} | {17, 18}
    assert _read(tmp_path / "out") == _read(units_run[0])  # every good sample, same tokens as the clean run


def _done_markers(shards: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in shards.glob("[0-9]*.json")}


def test_interrupted_run_resumes_only_unfinished_shards(env, units_run, tmp_path):
    """A 2-worker CLI run killed (SIGKILL, whole process group) mid-way; the re-run packs only the rest."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(env["lines"] * 4) + "\n", encoding="utf-8")  # 32 lines -> 16 shards of 2
    prefix, shards = tmp_path / "out", Path(f"{tmp_path / 'out'}.shards")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_audio_text.py"),
        "--input",
        str(manifest),
        "--task",
        "asr",
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(env["sp"]),
        "--hubert",
        str(env["hubert"]),
        "--units",
        str(env["codebook"]),
        "--workers",
        "2",
        "--shard-size",
        "2",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _done_markers(shards) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tool and its workers: a preempted machine
        proc.wait()
    done = {
        name: mtime for name, mtime in _done_markers(shards).items() if indexed.header_path(shards / name[:-5]).exists()
    }
    assert 0 < len(done) < 16, f"kill came too late or too early: {len(done)} of 16 shards done"

    with pytest.raises(ConfigError, match="other settings.*mode"):  # resuming with other settings is refused
        preprocess(_opts(env, prefix, inputs=(str(manifest),), shard_size=2, mode="features"))
    with pytest.raises(ConfigError, match="other settings.*max_seconds: was 60.0, now 30.0"):
        preprocess(_opts(env, prefix, inputs=(str(manifest),), shard_size=2, max_seconds=30.0))
    header = preprocess(
        _opts(env, prefix, inputs=(str(manifest),), shard_size=2, keep_shards=True), log=lambda *_: None
    )
    assert header["shards_resumed"] == len(done) and header["shards_packed"] == 16 - len(done)
    after = _done_markers(shards)
    assert len(after) == 16 and all(after[name] == mtime for name, mtime in done.items())
    assert _read(prefix) == _read(units_run[0]) * 4

    # Without run.json, each shard's own header still keeps shards of other settings out of a resume.
    same = make_plan(_opts(env, prefix, inputs=(str(manifest),), shard_size=2), log=lambda *_: None)
    other = make_plan(_opts(env, prefix, inputs=(str(manifest),), shard_size=2, max_seconds=30.0), log=lambda *_: None)
    assert shard_done(shards, 0, same) is not None and shard_done(shards, 0, other) is None

    with pytest.raises(ConfigError, match="already there.*--overwrite"):
        preprocess(_opts(env, prefix, inputs=(str(manifest),), shard_size=2))


def test_merge_tool(env, units_run, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import merge_datasets

    prefix, _ = units_run
    assert merge_datasets.main(["--input", str(prefix), str(prefix), "--output", str(tmp_path / "m")]) == 0
    merged = open_audio_text(tmp_path / "m")
    assert merged.header["task"] == ["asr"] and merged.header["samples"] == 16
    assert _read(tmp_path / "m") == _read(prefix) * 2

    other = tmp_path / "other"  # same layout but features: refused, naming the field
    for path in indexed.dataset_files(prefix, with_features=False):
        shutil.copy(path, str(path).replace(str(prefix), str(other)))
    header = json.loads(Path(f"{other}.json").read_text())
    Path(f"{other}.json").write_text(json.dumps({**header, "codebook_sha256": "0" * 64}))
    assert merge_datasets.main(["--input", str(prefix), str(other), "--output", str(tmp_path / "m2")]) == 2
    assert "codebook_sha256" in capsys.readouterr().err
    assert not Path(f"{tmp_path / 'm2'}.json").exists()


def _copy(prefix, dest, *, features=False):
    for path in indexed.dataset_files(prefix, with_features=features):
        shutil.copy(path, str(path).replace(str(prefix), str(dest)))
    return dest


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupted_files_are_refused(units_run, tmp_path):
    prefix, _ = units_run
    cases = {
        "truncated": (lambda p: os.truncate(f"{p}.bin", os.path.getsize(f"{p}.bin") - 8), r"\.bin: .*truncated"),
        "dtype": (lambda p: _patch(f"{p}.idx", 17, bytes([5])), r"\.idx: dtype int64 but .* int32"),
        "magic": (lambda p: _patch(f"{p}_loss_mask.idx", 0, b"XXXX"), r"_loss_mask\.idx: not a Megatron index"),
        "version": (lambda p: _patch(f"{p}.idx", 9, (2).to_bytes(8, "little")), r"\.idx: index version 2"),
        "idx size": (lambda p: os.truncate(f"{p}.idx", os.path.getsize(f"{p}.idx") - 8), r"\.idx: .* bytes but"),
        "header": (lambda p: _rewrite_header(p, version=2), r"\.json: format version 2"),
        "token range": (lambda p: _patch(f"{p}.bin", 4, (10**6).to_bytes(4, "little")), r"outside the layout"),
    }
    for name, (corrupt, message) in cases.items():
        bad = _copy(prefix, tmp_path / name.replace(" ", "_"))
        corrupt(bad)
        with pytest.raises(DatasetFormatError, match=message):
            open_audio_text(bad)


def _rewrite_header(prefix, **changes):
    header = json.loads(Path(f"{prefix}.json").read_text())
    Path(f"{prefix}.json").write_text(json.dumps({**header, **changes}))


def test_mismatched_components_are_refused(tmp_path):
    """Loss mask / features written by another run: lengths disagree with the tokens."""
    T, dim = 50, 4
    feat = T + 2

    def write(prefix, samples, feature_dim=dim):
        writer = indexed.AudioTextWriter(prefix, feature_dim=feature_dim)
        for tokens, frames in samples:
            writer.add(np.array(tokens), np.zeros(len(tokens)), np.ones((frames, dim), np.float16) if frames else None)
        writer.finalize({"task": "asr", "mode": "features", "text_vocab_size": T, "num_units": 0})

    write(tmp_path / "a", [([1, T, feat, feat, T + 1, 2], 2), ([1, 2], 0)])
    assert open_audio_text(tmp_path / "a").sample_features(0).shape == (2, dim)
    write(tmp_path / "b", [([1, T, feat, T + 1, 2], 1), ([1, 2, 3], 0)])
    mixed = _copy(tmp_path / "a", tmp_path / "mixed", features=True)
    for ext in (".bin", ".idx"):  # loss mask of run b next to the tokens of run a
        shutil.copy(f"{tmp_path / 'b'}_loss_mask{ext}", f"{mixed}_loss_mask{ext}")
    with pytest.raises(DatasetFormatError, match=r"_loss_mask\.idx: sample 0 has 5 loss-mask entries but .* 6"):
        open_audio_text(mixed)
    write(tmp_path / "c", [([1, T, feat, T + 1, 2, 3], 1), ([1, 2], 0)])  # same lengths, 1 frame instead of 2
    mixed = _copy(tmp_path / "a", tmp_path / "mixed2", features=True)
    for ext in (".bin", ".idx"):
        shutil.copy(f"{tmp_path / 'c'}_features{ext}", f"{mixed}_features{ext}")
    with pytest.raises(DatasetFormatError, match=r"_features\.idx: sample 0 has 1 feature frames but 2 <feat>"):
        open_audio_text(mixed)
    _rewrite_header(mixed, feature_dim=3)
    with pytest.raises(DatasetFormatError, match="not a multiple of feature_dim 3"):
        open_audio_text(mixed)


# ------------------------------------------------------------------------------ instruct, limits, templates

USER_TEXT, REPLY = "What is the weather like?", "It is sunny today."
CHAT = "Respond to the following input."


def _instruct_manifest(env, path: Path) -> Path:
    """spoken question + text reply; text question + text reply; text question + spoken reply."""
    audio = json.loads(env["lines"][0])["audio"]
    samples = [
        [{"role": "user", "audio": audio}, {"role": "assistant", "content": REPLY}],
        [{"role": "user", "content": USER_TEXT}, {"role": "assistant", "content": REPLY}],
        [{"role": "user", "content": USER_TEXT}, {"role": "assistant", "audio": audio}],
    ]
    path.write_text("".join(json.dumps({"id": f"chat{i}", "messages": m}) + "\n" for i, m in enumerate(samples)))
    return path


def _reference_chat(sp, user, reply):
    """One user/assistant pair in the release template; user/reply are text or a list of audio token ids."""

    def run(text_before, value, text_after=""):
        if isinstance(value, str):
            return sp.encode(text_before + value + text_after)
        return [*sp.encode(text_before), *value, *(sp.encode(text_after) if text_after else [])]

    prompt = [sp.bos_id(), *run(CHAT + "\n\n", user), sp.eos_id(), *sp.encode("\n\nOutput: ")]
    response = [sp.bos_id(), *run("", reply), sp.eos_id()]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def test_instruct_features_units_and_text_only(env, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(env["sp"]))
    T = sp.get_piece_size()
    manifest = _instruct_manifest(env, tmp_path / "chat.jsonl")
    units = [
        T,
        *(T + 3 + u for u in _reference_units(env["feats"][0][LAYER], env["centroids"].centroids.numpy())),
        T + 1,
    ]
    frames = env["feats"][0][-1]  # [frames, 32] last layer
    text_pair = _reference_chat(sp, USER_TEXT, REPLY)

    # features without a codebook: the spoken reply is rejected with its reason (no crash)
    header = preprocess(
        _opts(env, tmp_path / "f", task="instruct", inputs=(str(manifest),), mode="features", units=None),
        log=lambda *_: None,
    )
    assert header["samples"] == 2 and header["rejected_by_reason"] == {"spoken reply needs --units": 1}
    (t0, m0, f0), (t1, m1, _) = _read(tmp_path / "f")
    assert (t0, m0) == _reference_chat(sp, [T, *[T + 2] * len(frames), T + 1], REPLY)
    np.testing.assert_allclose(f0.view(np.float16).reshape(-1, 32).astype(np.float32), frames, atol=2e-2, rtol=1e-2)
    assert (t1, m1) == text_pair

    # units with a codebook: all three, the spoken reply as target units
    header = preprocess(_opts(env, tmp_path / "u", task="instruct", inputs=(str(manifest),)), log=lambda *_: None)
    assert header["samples"] == 3 and header["rejected"] == 0
    samples = [(t, m) for t, m, _ in _read(tmp_path / "u")]
    assert samples == [_reference_chat(sp, units, REPLY), text_pair, _reference_chat(sp, USER_TEXT, units)]

    # text-only instruct data: no --hubert / --units needed; audio samples rejected, not the run
    header = preprocess(
        _opts(
            env,
            tmp_path / "t",
            task="instruct",
            inputs=(str(manifest),),
            hubert=None,
            units=None,
            max_tokens=len(text_pair[0]),
        ),
        log=lambda *_: None,
    )
    assert header["samples"] == 1 and header["rejected_by_reason"] == {"audio needs --hubert": 2}
    assert [(t, m) for t, m, _ in _read(tmp_path / "t")] == [text_pair]
    with pytest.raises(ConfigError, match="units=None with task='tts'.*--units"):
        _opts(env, tmp_path / "x", task="tts", units=None)

    # over-long non-lm samples are rejected, counted by kind
    header = preprocess(
        _opts(
            env,
            tmp_path / "long",
            task="instruct",
            inputs=(str(manifest),),
            hubert=None,
            units=None,
            max_tokens=len(text_pair[0]) - 1,
        ),
        log=lambda *_: None,
    )
    assert header["samples"] == 0 and header["rejected_by_reason"] == {"audio needs --hubert": 2, "too long": 1}
    rejects = [json.loads(line) for line in Path(f"{tmp_path / 'long'}.rejects.jsonl").read_text().splitlines()]
    too_long = [r for r in rejects if r["reason"].startswith("too long")]
    assert [(r["id"], r["reason"]) for r in too_long] == [
        ("chat1", f"too long: {len(text_pair[0])} tokens > {len(text_pair[0]) - 1} (max_tokens)")
    ]


def test_lm_documents_split_at_max_tokens(env, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(env["sp"]))
    corpus = speech.make_text_corpus(tmp_path / "text.jsonl", n=4)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    docs = [[sp.bos_id(), *sp.encode(text), sp.eos_id()] for text in texts]
    limit = 9
    log = []
    header = preprocess(
        _opts(env, tmp_path / "lm", task="lm", inputs=(str(corpus),), hubert=None, units=None, max_tokens=limit),
        log=log.append,
    )
    expected = []
    for doc in docs:  # consecutive pieces of <= limit tokens; each piece's first token is not a target
        for start in range(0, len(doc), limit):
            piece = doc[start : start + limit]
            expected.append((piece, [0] + [1] * (len(piece) - 1)))
    assert [(t, m) for t, m, _ in _read(tmp_path / "lm")] == expected
    split = sum(len(d) > limit for d in docs)
    assert split > 0 and header["split_documents"] == split and header["split_chunks"] == len(expected) - 4 + split
    assert header["max_tokens"] == limit and f"split {split} long documents" in log[-1]


def test_template_config_from_the_cli(env, tmp_path, capsys):
    import sentencepiece as spm

    sys.path.insert(0, str(ROOT / "tools"))
    import preprocess_audio_text as tool

    sp = spm.SentencePieceProcessor(model_file=str(env["sp"]))
    corpus = speech.make_text_corpus(tmp_path / "text.jsonl", n=3)
    config = tmp_path / "templates.json"
    config.write_text(json.dumps({"lm": "<bos>Document: {text}<eos>"}))
    base = ["--input", str(corpus), "--task", "lm", "--tokenizer", str(env["sp"]), "--no-progress"]
    assert tool.main(base + ["--output-prefix", str(tmp_path / "lm"), "--template-config", str(config)]) == 0
    for (tokens, mask, _), line in zip(_read(tmp_path / "lm"), corpus.read_text().splitlines()):
        assert tokens == [sp.bos_id(), *sp.encode("Document: " + json.loads(line)["text"]), sp.eos_id()]
        assert mask == [0] + [1] * (len(tokens) - 1)
    assert open_audio_text(tmp_path / "lm").header["templates"]["lm"] == "<bos>Document: {text}<eos>"

    config.write_text(json.dumps({"lm_template": "<bos>{text}<eos>"}))
    assert tool.main(base + ["--output-prefix", str(tmp_path / "x"), "--template-config", str(config)]) == 2
    assert "unknown field 'lm_template'" in capsys.readouterr().err


def test_short_clip_for_a_larger_receptive_field_is_rejected(env, tmp_path):
    """A HuBERT with an extra conv (receptive field 720 samples): a 600-sample clip is 'too short', the rest packs."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(32,) * 8,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
    )
    HubertModel(config).eval().save_pretrained(tmp_path / "hubert")
    sf.write(tmp_path / "short.wav", 0.1 * np.sin(np.arange(600) / 5).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        env["lines"][0] + "\n" + json.dumps({"id": "s", "audio": str(tmp_path / "short.wav"), "text": "hi"}) + "\n"
    )
    header = preprocess(
        _opts(
            env, tmp_path / "out", inputs=(str(manifest),), hubert=str(tmp_path / "hubert"), mode="features", units=None
        ),
        log=lambda *_: None,
    )
    assert header["samples"] == 1 and header["rejected_by_reason"] == {"audio too short": 1}


def test_plan_errors_come_before_any_deletion(env, units_run, tmp_path):
    existing = _copy(units_run[0], tmp_path / "old")
    shutil.copy(indexed.header_path(units_run[0]), indexed.header_path(existing))
    (tmp_path / "no_hubert").mkdir()
    with pytest.raises(ConfigError, match="hubert=.*no config.json"):
        preprocess(_opts(env, existing, hubert=str(tmp_path / "no_hubert"), overwrite=True))
    assert open_audio_text(existing).header["samples"] == 8  # the old dataset is untouched
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='gpu': CUDA is not available"):
            preprocess(_opts(env, tmp_path / "gpu", device="gpu"))


def test_tokenizer_hash_reads_only_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "model-00001.safetensors").write_bytes(b"weights")
    first = _sha256(str(tmp_path), TOKENIZER_FILES)
    (tmp_path / "model-00001.safetensors").write_bytes(b"other weights")
    assert _sha256(str(tmp_path), TOKENIZER_FILES) == first
    (tmp_path / "tokenizer.json").write_text('{"a": 2}')
    assert _sha256(str(tmp_path), TOKENIZER_FILES) != first
