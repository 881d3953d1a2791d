"""HubertEncoder (batched == the transformers model on each waveform alone), UnitCodebook, fit_codebook
and tools/train_units.py end to end on espeak speech with a tiny random HuBERT."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_most.audio.hubert import HubertEncoder
from megatron_most.audio.loading import AudioLoader, AudioOptions
from megatron_most.audio.units import UnitCodebook, dedup_units, fit_codebook
from megatron_most.options import ConfigError
from tests.speech import make_corpus, tiny_hubert

ROOT = Path(__file__).resolve().parents[1]
FORMATS = (("wav", 16000, 1), ("flac", 22050, 2), ("ogg", 24000, 1), ("wav", 8000, 2))


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory) -> Path:
    return tiny_hubert(tmp_path_factory.mktemp("hubert"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("speech"), 6, formats=FORMATS)


@pytest.fixture(scope="module")
def speech(corpus) -> list[np.ndarray]:
    paths = [json.loads(line)["audio"] for line in corpus.read_text().splitlines()]
    waves = AudioLoader(AudioOptions(device="cpu")).load(paths)
    # Plus lengths at the frame boundaries: 400 = one frame, 719/720 = the step from one frame to two.
    return waves[:4] + [waves[4][:400], waves[5][:719], waves[5][:720], waves[0][:5001]]


def single(model, wave: np.ndarray, layer: int | None) -> torch.Tensor:
    """Independent reference: the transformers model on one unpadded waveform, no mask."""
    with torch.no_grad():
        out = model(torch.from_numpy(wave)[None], output_hidden_states=True)
    return (out.last_hidden_state if layer is None else out.hidden_states[layer])[0]  # [frames, dim]


def assert_batched_equals_single(encoder: HubertEncoder, model, waves, layer) -> None:
    feats = encoder(waves)
    assert len(feats) == len(waves)
    for wave, got in zip(waves, feats):
        ref = single(model, wave, layer)
        assert got.dtype == torch.float16
        assert got.shape == ref.shape == (encoder.num_frames(len(wave)), encoder.feature_dim)
        # float16 output: within a rounding step of the float32 reference (|x| ~ 3 -> step 2e-3).
        torch.testing.assert_close(got.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("layer", [None, 2, 0])
def test_group_norm_batch_equals_single(hubert_dir, speech, layer):
    from transformers import HubertModel

    model = HubertModel.from_pretrained(hubert_dir).eval()
    assert model.config.feat_extract_norm == "group"
    encoder = HubertEncoder(hubert_dir, layer=layer)
    assert (encoder.min_samples, encoder.frame_rate, encoder.num_frames(720)) == (400, 50.0, 2)
    assert_batched_equals_single(encoder, model, speech, layer)


def test_plain_zero_padding_would_differ(hubert_dir, speech):
    """The reason for the masked GroupNorm: a padded batch through the bare model changes short items."""
    from transformers import HubertModel

    model = HubertModel.from_pretrained(hubert_dir).eval()
    short, long = speech[4], speech[0]
    padded = torch.zeros(2, len(long))
    padded[0, : len(short)] = torch.from_numpy(short)
    padded[1] = torch.from_numpy(long)
    with torch.no_grad():
        naive = model(padded).last_hidden_state[0, :1]
    assert (naive - single(model, short, None)).abs().max() > 0.05


def test_layer_norm_model_and_small_batches(tmp_path, speech):
    """feat_extract_norm="layer" (HuBERT large style): no hook, attention_mask only; several sub-batches."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(1)
    config = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    HubertModel(config).eval().save_pretrained(tmp_path)
    model = HubertModel.from_pretrained(tmp_path).eval()
    encoder = HubertEncoder(tmp_path, layer=None, max_batch_samples=60000)  # forces several batches
    assert len(encoder._batches([len(w) for w in speech])) > 1
    assert_batched_equals_single(encoder, model, speech, None)


def test_encoder_errors(hubert_dir):
    with pytest.raises(ConfigError, match="layer=5"):
        HubertEncoder(hubert_dir, layer=5)
    encoder = HubertEncoder(hubert_dir)
    with pytest.raises(ValueError, match=">= 400 samples"):
        encoder([np.zeros(399, np.float32)])
    assert encoder([]) == []


def loop_assign(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    out = []
    for frame in features.astype(np.float64):
        dists = [float(((frame - c) ** 2).sum()) for c in centroids.astype(np.float64)]
        out.append(int(np.argmin(dists)))
    return np.array(out, dtype=np.int64)


def test_assign_matches_loop_and_groupby():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((50, 16)).astype(np.float32)
    features = rng.standard_normal((9000, 16)).astype(np.float16)  # > one 8192-frame chunk, fp16 like HuBERT's
    codebook = UnitCodebook(centroids, layer=11)
    raw = codebook.assign(features, dedup=False)
    assert raw.dtype == np.int64
    np.testing.assert_array_equal(raw, loop_assign(features, centroids))
    expected = np.array([unit for unit, _ in itertools.groupby(raw.tolist())], dtype=np.int64)
    np.testing.assert_array_equal(codebook.assign(torch.from_numpy(features)), expected)
    runs = np.array([3, 3, 3, 1, 1, 3, 2, 2], dtype=np.int64)
    np.testing.assert_array_equal(dedup_units(runs), [3, 1, 3, 2])
    assert len(codebook.assign(np.zeros((0, 16), np.float32))) == 0
    with pytest.raises(ValueError, match=r"expected \[frames, 16\]"):
        codebook.assign(np.zeros((4, 8), np.float32))


def test_save_load_round_trip_and_refusals(tmp_path):
    centroids = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    UnitCodebook(centroids, layer=11, hubert="mhubert").save(tmp_path / "cb.safetensors")
    loaded = UnitCodebook.load(tmp_path / "cb.safetensors")
    assert torch.equal(loaded.centroids, torch.from_numpy(centroids))
    assert (loaded.k, loaded.dim, loaded.layer, loaded.hubert) == (7, 5, 11, "mhubert")
    with open(tmp_path / "cb.pkl", "wb") as f:
        pickle.dump({"centroids": centroids}, f)
    torch.save({"centroids": torch.from_numpy(centroids)}, tmp_path / "cb.pt")
    (tmp_path / "garbage").write_bytes(np.random.default_rng(2).bytes(512))
    for name in ("cb.pkl", "cb.pt", "garbage"):
        with pytest.raises(ConfigError, match="not a readable safetensors file"):
            UnitCodebook.load(tmp_path / name)
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="format='megatron_most.unit_codebook'"):
        UnitCodebook.load(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="file not found"):
        UnitCodebook.load(tmp_path / "nope.safetensors")


def clusters(seed: int = 0, k: int = 6, dim: int = 12, per: int = 300):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-20, 20, (k, dim)).astype(np.float32)
    points = centers.repeat(per, axis=0) + rng.normal(0, 0.2, (k * per, dim)).astype(np.float32)
    return centers, points[rng.permutation(len(points))]


def test_fit_recovers_centers_deterministically():
    centers, points = clusters()
    chunks = np.array_split(points, 7)  # features arrive per utterance
    codebook = fit_codebook(chunks, k=6, seed=3, batch_size=256, n_init=3, layer=11)
    dist = ((codebook.centroids.numpy()[:, None] - centers[None]) ** 2).sum(-1) ** 0.5  # [K, K]
    assert sorted(dist.argmin(axis=1).tolist()) == list(range(6))  # one fitted centroid per true center
    assert dist.min(axis=1).max() < 0.1  # noise std 0.2 over 300 points per center: mean error ~0.04
    again = fit_codebook(chunks, k=6, seed=3, batch_size=256, n_init=3, layer=11)
    assert torch.equal(codebook.centroids, again.centroids)
    sampled = fit_codebook(chunks, k=6, seed=3, batch_size=256, n_init=3, max_frames=600)
    dist = ((sampled.centroids.numpy()[:, None] - centers[None]) ** 2).sum(-1) ** 0.5
    assert dist.min(axis=1).max() < 0.2


def test_fit_needs_k_frames():
    with pytest.raises(ConfigError, match="k=500 centroids need at least 500 feature frames, got 40"):
        fit_codebook([np.zeros((40, 4), np.float32)], k=500)


def test_train_units_tool_end_to_end(tmp_path, corpus, hubert_dir, speech):
    output = tmp_path / "codebook.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_units.py"),
            "--input",
            str(corpus),
            "--hubert",
            str(hubert_dir),
            "--layer",
            "2",
            "--k",
            "8",
            "--seed",
            "1",
            "--n-init",
            "1",
            "--device",
            "cpu",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["k"], summary["dim"], summary["layer"], summary["utterances"]) == (8, 32, 2, 6)
    encoder = HubertEncoder(hubert_dir, layer=2)
    paths = [json.loads(line)["audio"] for line in corpus.read_text().splitlines()]
    lengths = [len(w) for w in AudioLoader(AudioOptions(device="cpu")).load(paths)]
    assert summary["frames"] == sum(encoder.num_frames(n) for n in lengths)
    assert summary["rejected"] == {}
    codebook = UnitCodebook.load(output)
    assert (codebook.k, codebook.dim, codebook.layer) == (8, 32, 2)
    units = codebook.assign(encoder([speech[0]])[0])
    assert units.dtype == np.int64 and 0 < len(units) and units.min() >= 0 and units.max() < 8
    assert (units[1:] != units[:-1]).all()


def test_train_units_max_hours_budget(tmp_path, corpus, hubert_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_units", ROOT / "tools" / "train_units.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus.read_text() + '{"id": "x", "audio": "missing.wav", "text": "t"}\nnot json\n')
    args = [
        "--input",
        str(bad),
        "--hubert",
        str(hubert_dir),
        "--layer",
        "2",
        "--k",
        "4",
        "--n-init",
        "1",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "cb.safetensors"),
    ]
    assert tool.main(args + ["--max-hours", str(250 / 50 / 3600)]) == 0  # a budget of 250 frames
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 250 and summary["utterances"] < 6
    assert UnitCodebook.load(tmp_path / "cb.safetensors").k == 4
    assert tool.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["utterances"] == 6
    assert summary["rejected"] == {"manifest: not JSON (Expecting value at column 1)": 1, "audio: missing file": 1}
    assert tool.main(args[:-2] + ["--k", "100000", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "k=100000 centroids need at least 100000" in capsys.readouterr().err
    assert tool.main(args + ["--max-frames", "60"]) == 0  # reservoir: the fit sees 60 of all frames
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fit_frames"] == 60 and summary["frames"] > 60 and summary["utterances"] == 6
    assert tool.main(args + ["--max-frames", "2"]) == 2
    assert "--max-frames=2: must be >= --k=4" in capsys.readouterr().err
    assert tool.main(args[:3] + [str(tmp_path)] + args[4:]) == 2  # --hubert without config.json
    assert "no config.json" in capsys.readouterr().err
