"""The configuration of a CodeHiFiGAN unit vocoder: the config.json of fairseq /
speech-resynthesis / textlesslib checkpoints, checked key by key (see audio/vocoder.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from megatron_most.options import ConfigError

_REQUIRED = tuple(
    "upsample_rates upsample_kernel_sizes upsample_initial_channel resblock_kernel_sizes resblock_dilation_sizes "
    "num_embeddings embedding_dim model_in_dim".split()
)
_OPTIONAL = frozenset(
    "resblock multispkr num_speakers multistyle num_styles dur_predictor_params sampling_rate".split()
)
# Generator inputs this module does not implement: accepted only when absent or falsy (off).
_UNSUPPORTED = {
    "f0": "F0 conditioning",
    "f0_quant_num_bin": "quantised F0 embedding",
    "f0_quantizer_path": "F0 VQ quantizer",
    "lambda_commit": "F0 VQ-VAE encoder",
    "lambda_commit_code": "unit VQ-VAE encoder",
    "embedder_params": "speaker d-vector input",
    "num_style_tokens": "style tokens",
}
# Keys that do not change the generator: training / data settings (speech-resynthesis train.py, dataset.py)
# and settings read only by the features refused above. Any other key is an error, so that a new
# architecture switch is never silently dropped.
_IGNORED = frozenset(
    "input_training_file input_validation_file num_gpus batch_size learning_rate adam_b1 adam_b2 lr_decay seed "
    "segment_size code_hop_size num_mels num_freq n_fft hop_size win_size fmin fmax fmax_for_loss num_workers "
    "dist_config dur_prediction_weight f0_stats f0_normalize f0_feats f0_median f0_interp f0_hop_size "
    "style_hop_size f0_quantizer f0_vq_params f0_encoder_params f0_decoder_params code_vq_params "
    "code_encoder_params embedder_dim".split()
)
_KNOWN = frozenset(_REQUIRED) | _OPTIONAL | _IGNORED | frozenset(_UNSUPPORTED)
_DUR_KEYS = {"encoder_embed_dim", "var_pred_hidden_dim", "var_pred_kernel_size", "var_pred_dropout"}


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
    """The generator's shape, read from the checkpoint's config.json (`from_json`) and written back (`to_dict`)."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    model_in_dim: int
    resblock: str = "1"  # "1": (dilated conv, conv) pairs (HiFi-GAN V1, every public unit vocoder); "2": one conv
    num_speakers: int = 0  # 0: no speaker table (`multispkr` off); with multispkr the original defaults to 200
    num_styles: int = 0  # 0: no style table (`multistyle` off); with multistyle the original defaults to 100
    duration_hidden_dim: int = 0  # 0: no duration predictor (no `dur_predictor_params`)
    duration_dropout: float = 0.0  # training only; kept so that `to_dict` writes back what was read
    sampling_rate: int = 16000

    def __post_init__(self):
        where = "VocoderConfig"
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise ConfigError(f"{where}: upsample_rates and upsample_kernel_sizes need the same, non-zero length")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if rate < 1 or kernel < rate or (kernel - rate) % 2:
                # padding (k - u) // 2 gives exactly u output samples per input frame only when k - u is even
                raise ConfigError(f"{where}: upsample kernel {kernel} / rate {rate}: need kernel >= rate, even gap")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            raise ConfigError(f"{where}: upsample_initial_channel too small to halve {len(self.upsample_rates)}x")
        if self.resblock not in ("1", "2"):
            raise ConfigError(f"{where}: resblock {self.resblock!r}: must be '1' or '2'")
        dilations = 3 if self.resblock == "1" else 2
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise ConfigError(f"{where}: resblock_kernel_sizes and resblock_dilation_sizes need the same length")
        if any(len(d) != dilations for d in self.resblock_dilation_sizes):
            raise ConfigError(f"{where}: resblock {self.resblock} needs {dilations} dilations per kernel size")
        inputs = 1 + (self.num_speakers > 0) + (self.num_styles > 0)
        if self.model_in_dim != inputs * self.embedding_dim:
            raise ConfigError(
                f"{where}: model_in_dim {self.model_in_dim} != {inputs} x embedding_dim {self.embedding_dim} "
                "(units + speaker + style embeddings); the checkpoint has inputs this vocoder does not implement"
            )

    @property
    def hop(self) -> int:
        """Waveform samples per unit frame (16 kHz: 320 for 50 Hz units, 640 for 25 Hz units)."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_json(cls, path: str | Path) -> "VocoderConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"vocoder config {path}: cannot read it as JSON ({err})") from err
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "VocoderConfig":
        """Original config.json keys -> config; names the key and `source` for anything missing or unknown."""
        if not isinstance(raw, dict):
            raise ConfigError(f"vocoder config {source}: expected a JSON object, got {type(raw).__name__}")
        for key in _REQUIRED:
            if key not in raw:
                raise ConfigError(f"vocoder config {source}: required key {key!r} is missing")
        for key, value in raw.items():
            if key in _UNSUPPORTED and value:
                raise ConfigError(f"vocoder config {source}: {key}={value!r} ({_UNSUPPORTED[key]}) is not supported")
            if key not in _KNOWN:
                raise ConfigError(f"vocoder config {source}: unknown key {key!r} (not a generator or training key)")
        dur = raw.get("dur_predictor_params") or {}
        if dur and (set(dur) - _DUR_KEYS or _DUR_KEYS - {"var_pred_dropout"} - set(dur)):
            raise ConfigError(
                f"vocoder config {source}: dur_predictor_params {sorted(dur)}: expected {sorted(_DUR_KEYS)}"
            )
        if dur and (dur["encoder_embed_dim"] != raw["embedding_dim"] or dur["var_pred_kernel_size"] != 3):
            # The predictor reads the unit embeddings; its second conv has padding 1 in the original, so only
            # kernel 3 keeps one duration per unit.
            raise ConfigError(
                f"vocoder config {source}: dur_predictor_params {dur}: need encoder_embed_dim = "
                "embedding_dim and var_pred_kernel_size = 3"
            )
        try:
            lists = ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes")
            counts = ("upsample_initial_channel", "num_embeddings", "embedding_dim", "model_in_dim")
            return cls(
                **{key: tuple(int(v) for v in raw[key]) for key in lists},
                **{key: int(raw[key]) for key in counts},
                resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in raw["resblock_dilation_sizes"]),
                resblock=str(raw.get("resblock", "1")),
                num_speakers=int(raw.get("num_speakers", 200)) if raw.get("multispkr") else 0,
                num_styles=int(raw.get("num_styles", 100)) if raw.get("multistyle") else 0,
                duration_hidden_dim=int(dur["var_pred_hidden_dim"]) if dur else 0,
                duration_dropout=float(dur.get("var_pred_dropout", 0.0)),
                sampling_rate=int(raw.get("sampling_rate", 16000)),
            )
        except ConfigError as err:
            raise ConfigError(f"vocoder config {source}: {err}") from err
        except (TypeError, ValueError) as err:
            raise ConfigError(f"vocoder config {source}: a value has the wrong type ({err})") from err

    def to_dict(self) -> dict:
        """Original key layout (readable by fairseq / textlesslib too)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k in _REQUIRED or k in _OPTIONAL}
        out.update(multispkr=self.num_speakers > 0, multistyle=self.num_styles > 0)
        if self.duration_hidden_dim:
            out["dur_predictor_params"] = dict(
                encoder_embed_dim=self.embedding_dim,
                var_pred_hidden_dim=self.duration_hidden_dim,
                var_pred_kernel_size=3,
                var_pred_dropout=self.duration_dropout,
            )
        return out
