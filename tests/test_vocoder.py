"""Unit vocoder (megatron_most/audio/vocoder.py) against an independent plain-PyTorch CodeHiFiGAN.

The reference below is built from torch.nn.utils weight-norm modules in the public checkpoints' key
layout (`dict`, `spkr`, `style`, `dur_predictor.*`, `conv_pre`, `ups.N`, `resblocks.N.convs1.M`, ...),
given random weights (g and v drawn separately, so g != ||v||), saved as {"generator": state_dict}
next to a config.json, and run with its own forward. It does not import the module under test.
"""

from __future__ import annotations

import fractions
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, remove_weight_norm, weight_norm

from megatron_most.audio.vocoder import VocoderConfig, convert, fold_weight_norm, load_vocoder
from megatron_most.options import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 forward of the same weights; measured differences are ~1e-7

BASE = {
    "resblock": "1",
    "upsample_rates": [2, 3],
    "upsample_kernel_sizes": [4, 5],
    "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 3]],
    "num_embeddings": 20,
    "embedding_dim": 8,
    "model_in_dim": 8,
    "sampling_rate": 16000,
}
VARIANTS = {
    "plain": dict(BASE),
    # Training-only keys as in speech-resynthesis configs: ignored.
    "speaker_style_duration": dict(
        BASE,
        model_in_dim=24,
        multispkr="from_input_file",
        num_speakers=4,
        multistyle="from_input_file",
        num_styles=3,
        dur_predictor_params={
            "encoder_embed_dim": 8,
            "var_pred_hidden_dim": 12,
            "var_pred_kernel_size": 3,
            "var_pred_dropout": 0.5,
        },
        dur_prediction_weight=1.0,
        segment_size=8960,
        code_hop_size=6,
        f0=False,
        dist_config={"dist_backend": "nccl", "dist_url": "env://"},
    ),
    # multispkr without num_speakers -> 200 speakers; built with torch's parametrizations.weight_norm.
    "resblock2_speaker": dict(
        BASE, resblock="2", resblock_dilation_sizes=[[1, 3], [2, 4]], model_in_dim=16, multispkr="single"
    ),
}


# ---------------------------------------------------------------- independent reference


def _wn(module: nn.Module, parametrized: bool) -> nn.Module:
    return parametrizations.weight_norm(module) if parametrized else weight_norm(module)


def build_reference(cfg: dict, parametrized: bool = False) -> nn.Module:
    """CodeHiFiGAN in the original module tree (weight norm on every generator conv, dim=0)."""
    ref, emb = nn.Module(), cfg["embedding_dim"]
    ref.dict = nn.Embedding(cfg["num_embeddings"], emb)
    if cfg.get("multispkr"):
        ref.spkr = nn.Embedding(cfg.get("num_speakers", 200), emb)
    if cfg.get("multistyle"):
        ref.style = nn.Embedding(cfg.get("num_styles", 100), emb)
    if cfg.get("dur_predictor_params"):
        hidden = cfg["dur_predictor_params"]["var_pred_hidden_dim"]
        dur = ref.dur_predictor = nn.Module()
        dur.conv1 = nn.Sequential(nn.Conv1d(emb, hidden, 3, padding=1), nn.ReLU())
        dur.ln1 = nn.LayerNorm(hidden)
        dur.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, 3, padding=1), nn.ReLU())
        dur.ln2 = nn.LayerNorm(hidden)
        dur.proj = nn.Linear(hidden, 1)
    ch = cfg["upsample_initial_channel"]
    ref.conv_pre = _wn(nn.Conv1d(cfg["model_in_dim"], ch, 7, 1, padding=3), parametrized)
    ref.ups, ref.resblocks = nn.ModuleList(), nn.ModuleList()
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        ref.ups.append(_wn(nn.ConvTranspose1d(ch >> i, ch >> (i + 1), k, u, padding=(k - u) // 2), parametrized))
        for k_res, dilations in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]):
            block, c = nn.Module(), ch >> (i + 1)

            def conv(d, k_res=k_res, c=c):
                return _wn(nn.Conv1d(c, c, k_res, 1, dilation=d, padding=(k_res * d - d) // 2), parametrized)

            if cfg["resblock"] == "1":
                block.convs1 = nn.ModuleList(conv(d) for d in dilations)
                block.convs2 = nn.ModuleList(conv(1) for _ in dilations)
            else:
                block.convs = nn.ModuleList(conv(d) for d in dilations)
            ref.resblocks.append(block)
    ref.conv_post = _wn(nn.Conv1d(ch >> len(cfg["upsample_rates"]), 1, 7, 1, padding=3), parametrized)
    _randomize(ref)
    return ref.eval()


def _randomize(ref: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.copy_(0.4 + 0.8 * torch.rand(p.shape, generator=gen))  # not ||v||: folding must use g
            elif name.startswith("dur_predictor.proj.bias"):
                p.fill_(1.1)  # exp(1.1) - 1 ~ 2: durations spread over 1..4 instead of all clamping to 1
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "weight" in name else 0.1))


def original_state_dict(ref: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's key names: parametrizations.weight.original0/1 written as weight_g/weight_v."""
    names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for key, tensor in ref.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        out[key] = tensor.clone()
    return out


def _reference_durations(dur: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = dur.ln1(dur.conv1(x).transpose(1, 2)).transpose(1, 2)
    h = dur.ln2(dur.conv2(h).transpose(1, 2))
    log_dur = dur.proj(h)[..., 0]
    return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)


def _reference_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(block, "convs1"):
        for c1, c2 in zip(block.convs1, block.convs2):
            x = c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1)) + x
    else:
        for c in block.convs:
            x = c(F.leaky_relu(x, 0.1)) + x
    return x


@torch.no_grad()
def reference_forward(ref, cfg, units, speaker=None, style=None, dur_prediction=False):
    """-> (waveform [B, samples], durations or None); duration prediction on a batch of one, as fairseq."""
    x = ref.dict(units).transpose(1, 2)  # [B, E, T]
    durations = None
    if dur_prediction:
        assert x.shape[0] == 1
        durations = _reference_durations(ref.dur_predictor, x)
        x = torch.repeat_interleave(x, durations.view(-1), dim=2)
    for name, ids in (("spkr", speaker), ("style", style)):
        if hasattr(ref, name):
            e = getattr(ref, name)(ids.view(-1, 1)).transpose(1, 2)  # [B, E, 1]
            x = torch.cat([x, e.repeat(1, 1, x.shape[2])], dim=1)
    x = ref.conv_pre(x)
    n = len(cfg["resblock_kernel_sizes"])
    for i, up in enumerate(ref.ups):
        x = up(F.leaky_relu(x, 0.1))
        outs = [_reference_block(ref.resblocks[i * n + j], x) for j in range(n)]
        x = torch.stack(outs).sum(0) / n
    x = torch.tanh(ref.conv_post(F.leaky_relu(x, 0.01)))
    return x[:, 0], durations


# ---------------------------------------------------------------- fixtures


def write_original(tmp: Path, name: str, parametrized: bool = False):
    cfg = VARIANTS[name]
    ref = build_reference(cfg, parametrized)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": original_state_dict(ref)}, tmp / "g_00000100")
    (tmp / "config.json").write_text(json.dumps(cfg))
    return ref, cfg, tmp / "g_00000100", tmp / "config.json"


def inputs(cfg, batch=2, frames=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    units = torch.randint(0, cfg["num_embeddings"], (batch, frames), generator=gen)
    speaker = torch.randint(0, cfg.get("num_speakers", 200), (batch,), generator=gen) if cfg.get("multispkr") else None
    style = torch.randint(0, cfg["num_styles"], (batch,), generator=gen) if cfg.get("multistyle") else None
    return units, speaker, style


def hop(cfg) -> int:
    return math.prod(cfg["upsample_rates"])


def assert_close(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= TOL, diff
    # A meaningful comparison: the waveform is neither silent nor saturated by tanh.
    assert 0.02 < want.abs().mean().item() < 0.9
    return diff


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("layer", ["conv", "conv_transpose"])
@pytest.mark.parametrize("parametrized", [False, True])
def test_fold_weight_norm_matches_torch(layer, parametrized):
    """ConvTranspose1d [in, out, k]: torch's dim=0 norm is per input channel, g is [in, 1, 1]."""
    module = nn.Conv1d(5, 7, 3) if layer == "conv" else nn.ConvTranspose1d(6, 3, 4, stride=2)
    wrapped = nn.Sequential(_wn(module, parametrized))
    _randomize(wrapped)
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    g_key = "0.parametrizations.weight.original0" if parametrized else "0.weight_g"
    assert state[g_key].shape == ((7 if layer == "conv" else 6), 1, 1)  # conv: out channels; transpose: in
    if parametrized:
        expected = wrapped[0].weight.detach()
    else:
        expected = remove_weight_norm(wrapped[0]).weight.detach()
    folded = fold_weight_norm(state)
    assert set(folded) == {"0.weight", "0.bias"}
    assert (folded["0.weight"] - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", list(VARIANTS))
def test_original_checkpoint_matches_reference(tmp_path, name):
    ref, cfg, ckpt, cfg_path = write_original(tmp_path, name, parametrized=name == "resblock2_speaker")
    model = load_vocoder(ckpt, cfg_path)
    units, speaker, style = inputs(cfg)
    got = model(units, speaker=speaker, style=style)
    want, _ = reference_forward(ref, cfg, units, speaker, style)
    assert got.shape == (2, 13 * hop(cfg)) == (2, 13 * model.hop)
    assert_close(got, want)
    one, _ = reference_forward(ref, cfg, units[1:], *(None if t is None else t[1:] for t in (speaker, style)))
    assert_close(got[1:], one)  # a row of a batch = that utterance alone


def test_duration_prediction(tmp_path):
    ref, cfg, ckpt, cfg_path = write_original(tmp_path, "speaker_style_duration")
    model = load_vocoder(ckpt, cfg_path)
    units, speaker, style = inputs(cfg, batch=1, frames=9, seed=3)
    durations = model.predict_durations(units)
    got = model(units, speaker=speaker, style=style, dur_prediction=True)
    want, ref_durations = reference_forward(ref, cfg, units, speaker, style, dur_prediction=True)
    assert torch.equal(durations, ref_durations)
    assert len(set(durations.view(-1).tolist())) > 1  # not all clamped to 1
    assert got.shape == (1, int(durations.sum()) * hop(cfg))
    assert_close(got, want)
    # Batch: identical rows give the same waveform as one; rows of different predicted length are refused.
    twice = model(units.repeat(2, 1), speaker=speaker.repeat(2), style=style.repeat(2), dur_prediction=True)
    assert torch.allclose(twice, got.repeat(2, 1), atol=1e-6)
    other = _units_of_other_length(model, cfg, int(durations.sum()))
    with pytest.raises(ValueError, match="predicted lengths differ"):
        model(torch.cat([units, other]), speaker=speaker, style=style, dur_prediction=True)


def _units_of_other_length(model, cfg, samples: int) -> torch.Tensor:
    for seed in range(10, 30):
        units = inputs(cfg, batch=1, frames=9, seed=seed)[0]
        if int(model.predict_durations(units).sum()) != samples:
            return units
    raise AssertionError("every random sequence predicted the same length")


def test_convert_tool_roundtrip(tmp_path):
    ref, cfg, ckpt, cfg_path = write_original(tmp_path / "orig", "speaker_style_duration")
    out = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_vocoder.py"), "--checkpoint", str(ckpt)]
        + ["--config", str(cfg_path), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["hop"] == hop(cfg) and summary["tensors"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert VocoderConfig.from_json(out / "config.json") == VocoderConfig.from_json(cfg_path)
    converted, original = load_vocoder(out), load_vocoder(ckpt, cfg_path)
    units, speaker, style = inputs(cfg)
    got = converted(units, speaker=speaker, style=style)
    assert torch.equal(got, original(units, speaker=speaker, style=style))
    assert_close(got, reference_forward(ref, cfg, units, speaker, style)[0])


def test_bad_checkpoints_are_named(tmp_path):
    ref, cfg, ckpt, cfg_path = write_original(tmp_path, "plain")
    state = original_state_dict(ref)

    def load_with(sd, name):
        torch.save({"generator": sd}, tmp_path / name)
        return load_vocoder(tmp_path / name, cfg_path)

    missing = {k: v for k, v in state.items() if k != "ups.1.bias"}
    with pytest.raises(ConfigError, match=r"missing keys \['ups.1.bias'\]"):
        load_with(missing, "missing")
    no_post = {k: v for k, v in state.items() if not k.startswith("conv_post.weight")}
    with pytest.raises(ConfigError, match=r"missing keys \['conv_post.weight'\]"):
        load_with(no_post, "no_post")
    with pytest.raises(ConfigError, match="conv_pre.weight_v"):  # weight_v without weight_g
        load_with({k: v for k, v in state.items() if k != "conv_pre.weight_g"}, "orphan")
    with pytest.raises(ConfigError, match=r"unexpected keys \['spkr.weight'\]"):
        load_with(dict(state, **{"spkr.weight": torch.zeros(200, 8)}), "extra")
    with pytest.raises(ConfigError, match=r"shape mismatches \['dict.weight \(21, 8\) != \(20, 8\)'\]"):
        load_with(dict(state, **{"dict.weight": torch.zeros(21, 8)}), "shape")
    torch.save({"generator": state, "args": fractions.Fraction(1, 3)}, tmp_path / "pickled")
    with pytest.raises(ConfigError, match="not a tensor-only torch checkpoint"):
        load_vocoder(tmp_path / "pickled", cfg_path)
    torch.save({"model": state}, tmp_path / "wrong_root")
    with pytest.raises(ConfigError, match="expected {'generator': state_dict}"):
        load_vocoder(tmp_path / "wrong_root", cfg_path)
    with pytest.raises(ConfigError, match="config .* not found"):
        load_vocoder(ckpt, tmp_path / "nope.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_in_dim": None}, "required key 'model_in_dim' is missing"),
        ({"upsample_rate": [2, 3]}, "unknown key 'upsample_rate'"),
        ({"f0": True}, "F0 conditioning"),
        ({"embedder_params": {"x": 1}}, "d-vector"),
        ({"model_in_dim": 16}, "model_in_dim 16 != 1 x embedding_dim 8"),
        ({"upsample_kernel_sizes": [4, 4]}, "kernel 4 / rate 3"),
        ({"resblock_dilation_sizes": [[1, 3], [1, 3]]}, "needs 3 dilations"),
        (
            {"dur_predictor_params": {"encoder_embed_dim": 8, "var_pred_hidden_dim": 4, "var_pred_kernel_size": 5}},
            "= 3",
        ),
    ],
)
def test_bad_configs_are_named(tmp_path, change, message):
    raw = {k: v for k, v in dict(BASE, **change).items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as err:
        VocoderConfig.from_json(path)
    assert str(path) in str(err.value)


def test_convert_rejects_mismatched_config(tmp_path):
    _, cfg, ckpt, _ = write_original(tmp_path / "a", "plain")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(cfg, num_embeddings=30)))
    with pytest.raises(ConfigError, match="dict.weight"):
        convert(ckpt, other, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
