"""`tools/evaluate.py` end to end on a pretraining-loop checkpoint and espeak-ng speech (the setup
of tests/test_generate_tool.py): ASR with a broken file, TTS judged by the model's own ASR,
sWUGGY-style pairs and StoryCloze stories scored from log-likelihoods computed here directly.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_most.eval.storycloze import score_storycloze
from megatron_most.eval.zerospeech import score_zerospeech
from tests.multiproc import run_distributed
from tests.test_generate_tool import hf_export, setup  # noqa: F401 - the shared module fixtures

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "evaluate.py"


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def codebook(setup):  # noqa: F811
    from megatron_most.audio import UnitCodebook

    path = setup["root"] / "units.safetensors"
    UnitCodebook(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), layer=2).save(path)
    return path


def _common(setup, codebook):  # noqa: F811
    return ["--checkpoint", setup["run"], "--tokenizer", setup["tokenizer"], "--hubert", setup["hubert"],
            "--layer", 2, "--units", codebook, "--batch-size", 2]  # fmt: skip


def _unit_logprobs(run, hubert, codebook, paths):
    """Rank body: summed log-likelihood and count of each file's units after <boa>, computed directly."""
    from megatron_most.audio import AudioLoader, AudioOptions, HubertEncoder, UnitCodebook
    from megatron_most.inference.load import load_model
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), num_experts=8)
    model = load_model(run)
    waves = AudioLoader(AudioOptions(device="cpu")).load(paths)
    features = HubertEncoder(hubert, layer=2)(waves)
    book = UnitCodebook.load(codebook)
    out = {}
    with torch.no_grad():
        for path, f in zip(paths, features, strict=True):
            ids = torch.tensor([[model.tokens.boa, *(model.tokens.unit(int(u)) for u in book.assign(f))]])
            logp = torch.log_softmax(model(ids, torch.arange(ids.shape[1])[None], None)[0, :-1].float(), -1)
            out[path] = (logp.gather(-1, ids[0, 1:, None]).sum().item(), ids.shape[1] - 1)
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_asr_and_tts(setup, codebook, tmp_path):  # noqa: F811
    manifest = tmp_path / "test.jsonl"
    lines = [json.dumps({"id": Path(a).stem, "audio": a, "text": "one two three"}) for a in setup["audio"]]
    lines.append(json.dumps({"id": "broken", "audio": setup["broken"], "text": "four"}))
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    done = _tool("asr", *_common(setup, codebook), "--data", manifest, "--out", out, "--max-new-tokens", 4)
    assert done.returncode == 0, done.stderr[-3000:]
    asr = _results(out)["asr"]
    assert asr["wer"] is not None and asr["wer"] >= 0
    assert [f["id"] for f in asr["failed"]] == ["broken"]
    hyps = [json.loads(line) for line in (out / "asr.generations.jsonl").read_text().splitlines()]
    assert len(hyps) == 4 and "error" in hyps[-1]
    assert (out / "results.md").read_text().count("|") > 4
    done = _tool("tts", *_common(setup, codebook), "--data", manifest, "--out", out, "--max-new-tokens", 6)
    assert done.returncode == 0, done.stderr[-3000:]
    tts = _results(out)["tts"]
    assert tts["judge"] == "the model's own ASR on its units"
    assert len(tts["failed"]) + tts["n_scored"] == 4
    generated = [json.loads(line) for line in (out / "tts.generations.jsonl").read_text().splitlines()]
    with_units = {r["id"] for r in generated if r.get("units")}  # a random model may speak no units at all
    assert tts["units"]["n_compared"] == len(with_units - {"broken"})  # vs the spoken references' units
    assert tts["reference_units_asr"]["n_scored"] == 3  # the broken file has no reference units


def _text_logprobs(run, tokenizer, texts):
    """Rank body: summed log-probability and count of <bos> text <eos> after <bos>, from full logits."""
    from megatron_most.data.tokenizer import load_tokenizer
    from megatron_most.inference.load import load_model
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), num_experts=8)
    model, tok = load_model(run), load_tokenizer(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos, *tok.encode(text), tok.eos]])
            logp = torch.log_softmax(model(ids, torch.arange(ids.shape[1])[None], None)[0, :-1].float(), -1)
            total += logp.gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    return total, count


@pytest.mark.slow
def test_text_perplexity_matches_direct_log_likelihoods(setup, codebook, tmp_path):  # noqa: F811
    texts = ["one two three", "the quick brown fox", "seven"]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    done = _tool("text", *_common(setup, codebook), "--data", data, "--out", tmp_path / "eval")
    assert done.returncode == 0, done.stderr[-3000:]
    result = _results(tmp_path / "eval")["text"]
    total, count = run_distributed(
        _text_logprobs, 1, args=(str(setup["run"]), str(setup["tokenizer"]), texts), timeout_s=300
    )[0]
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(np.exp(-total / count), rel=1e-4)
    assert "| text | perplexity |" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.slow
def test_spoken_lm_scores_match_direct_log_likelihoods(setup, codebook, hf_export, tmp_path):  # noqa: F811
    audio = setup["audio"]
    direct = run_distributed(
        _unit_logprobs, 1, args=(str(setup["run"]), str(setup["hubert"]), str(codebook), audio), timeout_s=300
    )[0]
    folder = Path(audio[0]).parent
    gold = tmp_path / "gold.csv"
    with gold.open("w", newline="") as f:  # pairs: (0 correct, 1 foil), (2 correct, 0 foil)
        writer = csv.writer(f)
        writer.writerow(["id", "filename", "correct", "voice"])
        for pair, (good, bad) in enumerate([(0, 1), (2, 0)]):
            writer.writerow([pair, Path(audio[good]).stem, 1, "v"])
            writer.writerow([pair, Path(audio[bad]).stem, 0, "v"])
    for reduction in ("sum", "mean"):
        out = tmp_path / f"swuggy_{reduction}"
        done = _tool("swuggy", *_common(setup, codebook), "--data", gold, "--audio-dir", folder, "--out", out,
                     "--reduction", reduction)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        value = {Path(p).stem: (s / n if reduction == "mean" else s) for p, (s, n) in direct.items()}
        expected = score_zerospeech("swuggy", str(gold), value)["accuracy"]
        got = _results(out)["swuggy"]
        assert got["accuracy"] == pytest.approx(expected) and got["reduction"] == reduction
    out = tmp_path / "swuggy_hf"  # the HF export scores the same (transformers' forward, no groups)
    common = _common(setup, codebook)
    common[1] = hf_export
    done = _tool("swuggy", *common, "--data", gold, "--audio-dir", folder, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    value = {Path(p).stem: s for p, (s, n) in direct.items()}
    per_item = [json.loads(line) for line in (out / "swuggy.items.jsonl").read_text().splitlines()]
    assert _results(out)["swuggy"]["accuracy"] == pytest.approx(
        score_zerospeech("swuggy", str(gold), value)["accuracy"]
    )
    assert per_item
    stories = tmp_path / "stories.jsonl"
    stories.write_text(json.dumps({"id": "s1", "positive": audio[0], "negative": audio[1]}) + "\n")
    out = tmp_path / "sc"
    done = _tool("storycloze", *_common(setup, codebook), "--data", stories, "--out", out, "--reduction", "mean")
    assert done.returncode == 0, done.stderr[-3000:]
    items = {"s1": {side: {"logprob": direct[a][0], "units": direct[a][1]} for side, a in
                    (("positive", audio[0]), ("negative", audio[1]))}}  # fmt: skip
    assert _results(out)["storycloze"]["accuracy"] == score_storycloze(items, reduction="mean")["accuracy"]
    assert np.isfinite(list(direct.values())[0][0])
