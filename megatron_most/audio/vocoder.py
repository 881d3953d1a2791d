"""Unit vocoder: the CodeHiFiGAN generator of fairseq / speech-resynthesis / textlesslib, units -> waveform.

unit embedding (+ one speaker and one style embedding per utterance, repeated over time and concatenated
on the channel axis) -> conv_pre(7) -> per stage: LeakyReLU(0.1), ConvTranspose1d(k, u) halving the
channels, mean of the multi-receptive-field residual blocks -> LeakyReLU(0.01) -> conv_post(7) -> tanh.
Optional duration predictor: for deduplicated units, each unit is repeated round(exp(log_dur) - 1) >= 1
times before the generator. Module names equal the public checkpoints' state-dict keys (`dict`, `spkr`,
`style`, `dur_predictor.*`, `conv_pre`, `ups.N`, `resblocks.N.convs1.M`, `conv_post`).

Public checkpoints come as {"generator": state_dict} (torch.save, weight-norm `weight_g`/`weight_v`)
plus config.json; `convert` folds the weight norm once and writes model.safetensors + config.json.

A vocoder only makes sense with the units it was trained on (same HuBERT, layer and codebook):
  textlesslib / TWIST `hifigan_lj_mhubert_base_25hz` <- mHuBERT-25Hz, layer 11, k-means 500
      (`mhubert_base_25hz_cp_mls_cv_sp_fisher_L11_km500.bin`): MoST's public pairing; hop 640 at 16 kHz
  fairseq `code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj` (also `_es_css10`, `_fr_css10`)
      <- mHuBERT base vp_en_es_fr_it3, layer 11, k-means 1000 (`..._L11_km1000.bin`), 50 Hz
  fairseq `code_hifigan/hubert_base_100_lj` <- HuBERT base LS960, layer 6, k-means 100, 50 Hz
  textlesslib Expresso `hifigan_expresso_lj_vctk_hubert_base_ls960_L9_km500` <- HuBERT base LS960, layer 9,
      k-means 500 (speaker + style ids)
MoST's units are deduplicated: they need a vocoder with a duration predictor, called with dur_prediction=True.
The first three have one (fairseq's docs: --dur-prediction; TWIST's generation script: dur_prediction=True);
textlesslib's Expresso example feeds duplicated (frame-rate) units.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from megatron_most.audio.vocoder_config import VocoderConfig
from megatron_most.options import ConfigError

FORMAT, VERSION = "megatron_most.unit_vocoder", "1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
LRELU_SLOPE = 0.1  # inside the stages; the last LeakyReLU before conv_post uses torch's default 0.01 (as trained)


def _conv(c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Conv1d:
    """Stride-1 conv that keeps the length (odd kernels)."""
    return nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)


class _ResBlock1(nn.Module):
    """x += conv(lrelu(conv_dilated(lrelu(x)))) for each dilation."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(_conv(channels, channels, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(_conv(channels, channels, kernel) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dilated, plain in zip(self.convs1, self.convs2):
            x = x + plain(F.leaky_relu(dilated(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class _ResBlock2(nn.Module):
    """x += conv_dilated(lrelu(x)) for each dilation."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(_conv(channels, channels, kernel, d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dilated in self.convs:
            x = x + dilated(F.leaky_relu(x, LRELU_SLOPE))
        return x


class _DurationPredictor(nn.Module):
    """fairseq's VariancePredictor at inference (no dropout): [B, T, dim] -> log(duration + 1) [B, T]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Sequential(_conv(dim, hidden, 3), nn.ReLU())  # Sequential: keys conv1.0.* as in the original
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(_conv(hidden, hidden, 3), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(-1)


class UnitVocoder(nn.Module):
    """`vocoder(units [B, T] long, speaker=, style=, dur_prediction=)` -> waveform [B, T' x hop] in [-1, 1]."""

    def __init__(self, config: VocoderConfig):
        super().__init__()
        self.config = config
        self.dict = nn.Embedding(config.num_embeddings, config.embedding_dim)
        self.spkr = nn.Embedding(config.num_speakers, config.embedding_dim) if config.num_speakers else None
        self.style = nn.Embedding(config.num_styles, config.embedding_dim) if config.num_styles else None
        hidden = config.duration_hidden_dim
        self.dur_predictor = _DurationPredictor(config.embedding_dim, hidden) if hidden else None
        channels = config.upsample_initial_channel
        self.conv_pre = _conv(config.model_in_dim, channels, 7)
        self.ups, self.resblocks = nn.ModuleList(), nn.ModuleList()
        block = _ResBlock1 if config.resblock == "1" else _ResBlock2
        for rate, kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for k, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(block(channels, k, dilations))
        self.conv_post = _conv(channels, 1, 7)
        self.eval()

    @property
    def hop(self) -> int:
        return self.config.hop

    @torch.no_grad()
    def predict_durations(self, units: torch.Tensor) -> torch.Tensor:
        """[B, T] frames per unit (>= 1): round(exp(log_dur) - 1), as fairseq's CodeGenerator."""
        if self.dur_predictor is None:
            raise ConfigError("this vocoder has no duration predictor (config without dur_predictor_params)")
        log_dur = self.dur_predictor(self.dict(self._check_units(units)))
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    @torch.no_grad()
    def forward(self, units: torch.Tensor, speaker=None, style=None, dur_prediction: bool = False) -> torch.Tensor:
        """units: [B, T] ids; speaker / style: one id per utterance (int or [B]) when the vocoder has them.

        dur_prediction=True (for deduplicated units) repeats unit i of row b predicted[b, i] times. Each row
        is predicted on its own (convs and LayerNorm do not mix rows); rows must then come out equally long,
        else ValueError (no padding: it would become audio): synthesize such utterances one at a time.
        """
        x = self.dict(self._check_units(units))  # [B, T, E]
        if dur_prediction:
            repeats = self.predict_durations(units)
            rows = [torch.repeat_interleave(row, n, dim=0) for row, n in zip(x, repeats)]
            if len({len(r) for r in rows}) > 1:
                raise ValueError(f"predicted lengths differ across the batch {repeats.sum(1).tolist()}: one row a call")
            x = torch.stack(rows)
        parts = [x]
        for table, ids, name in ((self.spkr, speaker, "speaker"), (self.style, style, "style")):
            parts += self._per_utterance(table, ids, name, x.shape[0], x.shape[1])
        return self._generate(torch.cat(parts, dim=-1).transpose(1, 2))

    def _generate(self, x: torch.Tensor) -> torch.Tensor:
        """[B, model_in_dim, frames] -> [B, frames x hop]."""
        x = self.conv_pre(x)
        per_stage = len(self.config.resblock_kernel_sizes)
        for stage, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[stage * per_stage : (stage + 1) * per_stage]
            x = sum(block(x) for block in blocks) / per_stage
        return torch.tanh(self.conv_post(F.leaky_relu(x))).squeeze(1)

    def _check_units(self, units: torch.Tensor) -> torch.Tensor:
        if units.ndim != 2 or units.dtype != torch.long:
            raise ValueError(f"units must be a [B, T] int64 tensor, got {units.dtype} {tuple(units.shape)}")
        if units.numel() and (units.min() < 0 or units.max() >= self.config.num_embeddings):
            raise ValueError(
                f"unit ids must be in 0..{self.config.num_embeddings - 1}; got {units.min()}..{units.max()}"
            )
        return units

    @staticmethod
    def _per_utterance(table, ids, name: str, batch: int, frames: int) -> list[torch.Tensor]:
        """One embedding per utterance, repeated over all frames; [] when the vocoder has no such table."""
        if table is None:
            if ids is not None:
                raise ValueError(f"this vocoder has no {name} embedding; pass {name}=None")
            return []
        if ids is None:
            raise ValueError(f"this vocoder needs {name}= (an id in 0..{table.num_embeddings - 1})")
        ids = torch.as_tensor(ids, dtype=torch.long, device=table.weight.device).reshape(-1)
        if len(ids) not in (1, batch):
            raise ValueError(f"{name}: one id per utterance (or one for all), got {len(ids)} for a batch of {batch}")
        ids = ids.expand(batch)
        return [table(ids)[:, None, :].expand(batch, frames, -1)]


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`X.weight_g` + `X.weight_v` (or torch's parametrizations.weight.original0/1) -> `X.weight` = g v / ||v||.

    torch.nn.utils.weight_norm(dim=0): one norm per slice along dim 0, over all other dims; for
    ConvTranspose1d ([in, out, k]) that is per *input* channel, and g has shape [in, 1, 1].
    """
    renames = {".parametrizations.weight.original0": ".weight_g", ".parametrizations.weight.original1": ".weight_v"}
    named = {}
    for key, tensor in state.items():
        for old, new in renames.items():
            key = key[: -len(old)] + new if key.endswith(old) else key
        named[key] = tensor
    out = {k: t for k, t in named.items() if not k.endswith((".weight_g", ".weight_v"))}
    for g_key in [k for k in named if k.endswith(".weight_g")]:
        base = g_key[: -len("_g")]
        g, v = named[g_key], named.get(base + "_v")
        if v is None or g.shape != (v.shape[0],) + (1,) * (v.ndim - 1):
            raise ConfigError(f"weight norm {base}: need {base}_v and a {base}_g of shape [v.shape[0], 1, ...] (dim=0)")
        norm = torch.linalg.vector_norm(v.double(), dim=tuple(range(1, v.ndim)), keepdim=True)
        out[base] = (v.double() * (g.double() / norm)).to(v.dtype)  # folded once in float64, stored as v's dtype
    orphans = [k for k in named if k.endswith(".weight_v") and k[: -len("_v")] + "_g" not in named]
    if orphans:
        raise ConfigError(f"weight norm: {orphans} have no matching weight_g")
    return out


def load_vocoder(path: str | Path, config: str | Path | None = None) -> UnitVocoder:
    """A converted directory (model.safetensors + config.json), a .safetensors file, or an original checkpoint
    ({"generator": state_dict}, read with weights_only=True). `config` defaults to config.json beside it."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"vocoder {path}: no such file (or no {WEIGHTS} in that directory)")
    config = Path(config) if config is not None else weights.parent / CONFIG
    if not config.is_file():
        raise ConfigError(f"vocoder {path}: config {config} not found; pass the checkpoint's config.json")
    state = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_original(weights)
    model = UnitVocoder(VocoderConfig.from_json(config))
    _load_exact(model, state, f"vocoder {weights} (config {config})")
    return model


def convert(checkpoint: str | Path, config: str | Path, out_dir: str | Path) -> dict:
    """Original checkpoint + config.json -> out_dir/model.safetensors (weight norm folded) + config.json."""
    model = load_vocoder(checkpoint, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.contiguous() for k, t in model.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": FORMAT, "version": VERSION})
    (out_dir / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    parameters = sum(t.numel() for t in tensors.values())
    return dict(
        out=str(out_dir), tensors=len(tensors), parameters=parameters, hop=model.hop, rate=model.config.sampling_rate
    )


def _read_original(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ConfigError(f"vocoder {path}: not a tensor-only torch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("generator"), dict):
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigError(f"vocoder {path}: expected {{'generator': state_dict}}, found {keys}")
    return fold_weight_norm(checkpoint["generator"])


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if (metadata.get("format"), metadata.get("version")) != (FORMAT, VERSION):
                raise ConfigError(f"vocoder {path}: no format={FORMAT!r} version={VERSION!r} metadata; use convert()")
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"vocoder {path}: not a readable safetensors file ({err})") from err


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, with every missing, unexpected or mis-shaped key named first."""
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in sorted(expected)
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{source}: checkpoint and config disagree: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {shapes}"
        )
    model.load_state_dict(state)
