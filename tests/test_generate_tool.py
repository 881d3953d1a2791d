"""`tools/generate.py` end to end: a checkpoint of the pretraining loop, espeak-ng speech in
several containers, a small random HuBERT, a sentencepiece tokenizer and a random vocoder.

References: the same requests served in-process from the model, the prompts and HuBERT
features made directly (no tool code), and the vocoder's hop for the wav lengths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch

from tests.multiproc import run_distributed
from tests.packed_data import write_tiny_blend
from tests.speech import make_corpus, sentencepiece_model, tiny_hubert
from tests.test_pretrain import argv, train
from tests.test_vocoder import BASE, build_reference, original_state_dict

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "generate.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_tool")
    blend = write_tiny_blend(root / "data", sizes=(60, 60, 90))
    data = [blend[name][0] for name in ("asr", "tts", "text")]
    assert train(argv(data, root / "run", 3)) == [0]
    manifest = make_corpus(root / "speech", 3)
    audio = [json.loads(line)["audio"] for line in manifest.read_text().splitlines()]
    broken = root / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav file")
    cfg = dict(BASE, num_embeddings=32)  # the tiny preset's 32 units
    vocoder = build_reference(cfg)
    torch.save({"generator": original_state_dict(vocoder)}, root / "g_00000001")
    (root / "config.json").write_text(json.dumps(cfg))
    from megatron_most.audio.vocoder import convert

    convert(root / "g_00000001", root / "config.json", root / "vocoder")
    return dict(
        root=root,
        run=root / "run",
        tokenizer=sentencepiece_model(root / "sp"),
        hubert=tiny_hubert(root / "hubert", hidden=16),
        audio=audio,
        broken=str(broken),
        hop=2 * 3,
    )


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def _reference(run, tokenizer, hubert, audio):
    """Rank body: the ASR generations made directly from the model and HuBERT features."""
    from megatron_most.audio import AudioLoader, AudioOptions, HubertEncoder
    from megatron_most.data.templates import AudioSegment, TemplateOptions
    from megatron_most.data.tokenizer import load_tokenizer
    from megatron_most.inference import generate
    from megatron_most.inference.load import load_model
    from megatron_most.inference.tasks import build_prompt
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), num_experts=8)
    model = load_model(run)
    tok = load_tokenizer(tokenizer)
    waves = AudioLoader(AudioOptions(device="cpu")).load(audio)
    features = HubertEncoder(hubert, layer=2)(waves)
    segments = {p: AudioSegment(features=f.numpy()) for p, f in zip(audio, features, strict=True)}
    prompts = [
        build_prompt("asr", {"audio": p}, segments, tok, model.tokens, TemplateOptions(), mode="features")
        for p in audio
    ]
    return generate(model, prompts, max_new_tokens=5, eos_id=tok.eos)


@pytest.mark.slow
def test_asr_serves_every_file_and_records_the_broken_one(setup):
    out = setup["root"] / "asr.jsonl"
    inputs = [*setup["audio"], setup["broken"]]
    done = _tool(
        "asr", "--checkpoint", setup["run"], "--tokenizer", setup["tokenizer"], "--hubert", setup["hubert"],
        "--layer", 2, "--input", *inputs, "--out", out, "--max-new-tokens", 5, "--batch-size", 2,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [Path(p).stem for p in inputs]
    assert "error" in records[-1] and "broken" in records[-1]["error"]
    expected = run_distributed(
        _reference, 1, args=(str(setup["run"]), str(setup["tokenizer"]), str(setup["hubert"]), setup["audio"])
    )[0]
    assert [r["ids"] for r in records[:-1]] == expected


@pytest.mark.slow
def test_tts_writes_a_wav_per_spoken_output(setup):
    texts = setup["root"] / "texts.txt"
    texts.write_text("the cat sat\nfour five six\n")
    out = setup["root"] / "tts.jsonl"
    done = _tool(
        "tts", "--checkpoint", setup["run"], "--tokenizer", setup["tokenizer"], "--input", texts, "--out", out,
        "--max-new-tokens", 12, "--vocoder", setup["root"] / "vocoder", "--temperature", 1.0, "--seed", 3,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["texts-1", "texts-2"]
    spoken = [r for r in records if r["units"]]
    assert spoken, records  # random weights: some unit tokens among 12 sampled ones
    for r in spoken:
        wave, rate = soundfile.read(r["wav"])
        assert rate == 16000 and len(wave) == len(r["units"]) * setup["hop"]


def test_bad_options_exit_2_before_any_work(tmp_path):
    done = _tool("asr", "--checkpoint", tmp_path / "nothing", "--tokenizer", "x.model", "--input", "a.wav")
    assert done.returncode == 2 and "nothing" in done.stderr


@pytest.fixture(scope="module")
def hf_export(setup):
    """The pretraining checkpoint exported with `convert_checkpoint.py megatron-to-hf --format most`."""
    from megatron_most.data.tokenizer import load_tokenizer

    tok = load_tokenizer(setup["tokenizer"])
    hf = setup["root"] / "hf_export"
    if not hf.exists():
        convert = [
            sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "megatron-to-hf",
            "--megatron", str(setup["run"] / "iter_0000003"), "--out", str(hf), "--format", "most",
            "--bos-id", str(tok.bos), "--eos-id", str(tok.eos),
        ]  # fmt: skip
        done = subprocess.run(convert, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
    return hf


@pytest.mark.slow
def test_the_hf_export_generates_what_the_checkpoint_generates(setup, hf_export):
    out = setup["root"] / "asr_hf.jsonl"
    done = _tool(
        "asr", "--checkpoint", hf_export, "--tokenizer", setup["tokenizer"], "--hubert", setup["hubert"],
        "--layer", 2, "--input", *setup["audio"], "--out", out, "--max-new-tokens", 5, "--batch-size", 2,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = run_distributed(
        _reference, 1, args=(str(setup["run"]), str(setup["tokenizer"]), str(setup["hubert"]), setup["audio"])
    )[0]
    assert [r["ids"] for r in records] == expected
