"""Preprocessing settings: `PreprocessOptions` (what the user asks for) and `Plan` (what every worker
packs with), resolved and checked once in the main process by `make_plan` (megatron_most.data.preprocess).

The plan's fingerprint is stored with the shards and compared on resume, so it holds content hashes of
the tokenizer, HuBERT and codebook files and the manifests' sizes and mtimes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import HubertConfig

from megatron_most.audio.encoder import logmel_fingerprint
from megatron_most.audio.logmel import LogMelEncoder, is_logmel
from megatron_most.audio.units import UnitCodebook
from megatron_most.data import indexed
from megatron_most.data.templates import MODES, TASKS, TemplateOptions
from megatron_most.data.tokenizer import load_tokenizer
from megatron_most.options import ConfigError, options, require
from megatron_most.platform import choose_device

# Bumped whenever the packing changes what a shard contains, so shards of older code are not resumed.
CODE_VERSION = 2
# Files that define a HF tokenizer (its directory may also hold the model's weights: ~31 GB for
# DeepSeek-V2-Lite, which must not be read just to fingerprint the tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
HUBERT_FILES = ("config.json", "preprocessor_config.json")
HUBERT_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
UNITS_LAYER = 11  # mHuBERT-base layer the release clusters (MOST_SPEC.md "Audio paths")


@options
class PreprocessOptions:
    inputs: tuple[str, ...]
    """JSONL manifests, packed in this order (line order within each)."""
    task: str
    """asr | tts | lm | instruct (templates.render)."""
    output_prefix: str
    """Output prefix P: P.bin/.idx, P_loss_mask.*, P_features.* (features mode), P.json, P.rejects.jsonl."""
    tokenizer: str
    """sentencepiece .model file or Hugging Face tokenizer directory."""
    mode: str = "units"
    """units: audio becomes unit tokens; features: prompt audio becomes <feat> frames + stored features."""
    hubert: str | None = None
    """transformers HubertModel directory (needed by asr/tts; by instruct for audio turns: without it
    instruct packs text-only samples and rejects those with audio)."""
    layer: int | None = None
    """HuBERT hidden_states layer. Default: the codebook's layer, else 11 (clipped to the depth) for
    units, the last layer for features."""
    units: str | None = None
    """UnitCodebook (safetensors); needed whenever a unit token is produced (tts; asr in units mode;
    instruct in units mode with --hubert). Features-mode instruct without it rejects spoken replies."""
    text_vocab_size: int | None = None
    """Text rows of the model's table (default: the tokenizer's size; DeepSeek-V2-Lite: 102400)."""
    workers: int = 1
    """Worker processes; each gets cores/workers torch threads."""
    shard_size: int = 1000
    """Manifest lines per shard (the unit of parallel work and of restart)."""
    max_seconds: float = 60.0
    """Longer audio is rejected."""
    max_tokens: int | None = None
    """Longest sample in tokens (None: no limit). Use the model's seq_length + 1 so the training
    dataset never has to skip a sample. lm documents longer than this are split into consecutive
    chunks of <= max_tokens tokens (first chunk keeps <bos>, last keeps <eos>); longer samples of the
    other tasks are rejected ("too long")."""
    templates: TemplateOptions = dataclasses.field(default_factory=TemplateOptions)
    """Prompt templates (tools/preprocess_audio_text.py --template-config FILE.json)."""
    device: str = "auto"
    """auto | cpu | gpu: where DALI resamples and HuBERT runs."""
    batch_size: int = 32
    """Samples per audio-loading batch."""
    max_batch_seconds: float = 320.0
    """Padded audio seconds per HuBERT forward (bounds memory with long files)."""
    keep_shards: bool = False
    """Keep P.shards/ after the merge."""
    overwrite: bool = False
    """Replace an existing complete output (and discard unfinished shards of another run)."""
    progress: bool = True
    """tqdm progress bar on stderr."""

    def __post_init__(self):
        require(len(self.inputs) > 0, "inputs: give at least one manifest (--input MANIFEST ...)")
        require(self.task in TASKS, f"task={self.task!r}: must be one of {TASKS}")
        require(self.mode in MODES, f"mode={self.mode!r}: must be one of {MODES}")
        require(self.workers >= 1, f"workers={self.workers}: must be >= 1")
        require(self.shard_size >= 1, f"shard_size={self.shard_size}: must be >= 1 (e.g. 1000)")
        require(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        require(self.device in ("auto", "cpu", "gpu"), f"device={self.device!r}: use auto, cpu or gpu")
        require(self.max_batch_seconds > 0, f"max_batch_seconds={self.max_batch_seconds}: must be > 0")
        require(self.max_seconds > 0, f"max_seconds={self.max_seconds}: must be > 0 (e.g. 60)")
        require(
            self.max_tokens is None or self.max_tokens >= 2,
            f"max_tokens={self.max_tokens}: must be >= 2 (the model's seq_length + 1) or None for no limit",
        )
        require(
            isinstance(self.templates, TemplateOptions),
            f"templates={type(self.templates).__name__}: must be a TemplateOptions "
            "(TemplateOptions.from_dict(json) for a --template-config file)",
        )
        if self.task == "lm":
            require(
                self.mode == "units",
                "mode='features' with task='lm': text samples have no audio; use mode='units' (the default)",
            )
        elif self.task in ("asr", "tts") or self.mode == "features":
            # instruct in features mode needs the feature dimension for the layout of the whole dataset
            require(
                self.hubert is not None,
                f"hubert=None with task={self.task!r}, mode={self.mode!r}: pass "
                "--audio-encoder DIR (a transformers HubertModel directory) or --audio-encoder logmel"
                + ("; text-only instruct data packs in mode 'units' without it" if self.task == "instruct" else ""),
            )
        needs_units = (
            self.task == "tts"
            or (self.task == "asr" and self.mode == "units")
            or (self.task == "instruct" and self.mode == "units" and self.hubert is not None)
        )
        require(
            not needs_units or self.units is not None,
            f"units=None with task={self.task!r}, mode={self.mode!r}: unit tokens are produced; pass "
            "--units CODEBOOK (tools/train_units.py)"
            + ("; or drop --hubert to pack text-only instruct samples" if self.task == "instruct" else ""),
        )
        for path in self.inputs:
            require(Path(path).is_file(), f"inputs: manifest {path!r} does not exist")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Settings resolved once in the main process and shared by every worker (and checked on resume)."""

    task: str
    mode: str
    text_vocab_size: int
    num_units: int
    feature_dim: int
    features_layer: int | None
    units_layer: int | None
    tokenizer: str
    tokenizer_sha256: str
    hubert: str | None
    hubert_sha256: str | None
    codebook: str | None
    codebook_sha256: str | None
    inputs: tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns)
    shard_size: int
    max_seconds: float
    max_tokens: int | None
    templates: dict[str, str]
    format_version: int = indexed.VERSION
    code_version: int = CODE_VERSION

    def header(self) -> dict[str, Any]:
        """The dataset header fields that describe content (counts are added by the writer)."""
        return {
            "task": self.task,
            "mode": self.mode,
            "text_vocab_size": self.text_vocab_size,
            "num_units": self.num_units,
            "feature_dim": self.feature_dim,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "hubert": self.hubert,
            "hubert_sha256": self.hubert_sha256,
            "hubert_layer": self.features_layer if self.mode == "features" else self.units_layer,
            "units_layer": self.units_layer,
            "codebook": self.codebook,
            "codebook_sha256": self.codebook_sha256,
            "max_seconds": self.max_seconds,
            "max_tokens": self.max_tokens,
            "templates": dict(self.templates),
            "code_version": self.code_version,
        }

    def fingerprint(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def make_plan(opts: PreprocessOptions, log=print) -> Plan:
    """Resolve and check every setting here, in the main process: a bad tokenizer, HuBERT, codebook or
    device is a ConfigError now, not a worker that dies at start (BrokenProcessPool)."""
    tokenizer = load_tokenizer(opts.tokenizer)
    if opts.hubert:
        choose_device(opts.device)
    text_vocab = opts.text_vocab_size or tokenizer.vocab_size
    require(
        text_vocab >= tokenizer.vocab_size,
        f"text_vocab_size={text_vocab}: smaller than the tokenizer's {tokenizer.vocab_size} ids; "
        "leave it unset or use the model's text table size",
    )
    codebook = load_codebook(opts.units) if opts.units else None
    depth = dim = None
    if opts.hubert:
        depth, dim = hubert_shape(opts.hubert)
    units_layer = features_layer = None
    if codebook is not None:
        units_layer = _units_layer(opts, codebook, depth, log)
        cdim = int(codebook.centroids.shape[1])
        require(
            dim is None or cdim == dim,
            f"units={opts.units!r}: centroids have dimension {cdim} but the HuBERT at {opts.hubert!r} has "
            f"hidden size {dim}; use the codebook fitted on this HuBERT",
        )
    if opts.mode == "features" and opts.task != "lm":
        features_layer = depth if opts.layer is None else _check_layer(opts.layer, depth, "layer")
    return Plan(
        task=opts.task,
        mode=opts.mode,
        text_vocab_size=text_vocab,
        num_units=int(codebook.centroids.shape[0]) if codebook is not None else 0,
        feature_dim=dim if opts.mode == "features" else 0,
        features_layer=features_layer,
        units_layer=units_layer,
        tokenizer=str(Path(opts.tokenizer).resolve()),
        tokenizer_sha256=_sha256(opts.tokenizer, TOKENIZER_FILES + ("*.model",)),
        hubert=_encoder_name(opts.hubert),
        hubert_sha256=_encoder_sha256(opts.hubert),
        codebook=str(Path(opts.units).resolve()) if opts.units else None,
        codebook_sha256=_sha256(opts.units) if opts.units else None,
        inputs=tuple((str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in opts.inputs),
        shard_size=opts.shard_size,
        max_seconds=opts.max_seconds,
        max_tokens=opts.max_tokens,
        templates=dataclasses.asdict(opts.templates),
    )


def _encoder_name(spec: str | None) -> str | None:
    return None if spec is None else spec if is_logmel(spec) else str(Path(spec).resolve())


def _encoder_sha256(spec: str | None) -> str | None:
    if spec is None:
        return None
    return logmel_fingerprint() if is_logmel(spec) else _sha256(spec, HUBERT_FILES + HUBERT_WEIGHTS)


def hubert_shape(path: str) -> tuple[int, int]:
    """(transformer layers, hidden size) of the audio encoder `path` (a HubertModel directory or
    "logmel"); ConfigError if it is neither."""
    if is_logmel(path):
        encoder = LogMelEncoder()
        return encoder.depth, encoder.feature_dim
    directory = Path(path)
    require(
        directory.is_dir() and (directory / "config.json").is_file(),
        f"hubert={path!r}: no config.json there; pass a transformers HubertModel directory "
        "(save_pretrained output: config.json + model.safetensors)",
    )
    require(
        any(any(directory.glob(pattern)) for pattern in HUBERT_WEIGHTS),
        f"hubert={path!r}: no weights (model.safetensors / pytorch_model.bin); pass the complete HubertModel directory",
    )
    try:
        config = HubertConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"hubert={path!r}: not a transformers HubertModel directory ({err})") from None
    return config.num_hidden_layers, config.hidden_size


def load_codebook(path: str) -> UnitCodebook:
    if not Path(path).is_file():
        raise ConfigError(f"units={path!r}: no such file; pass a codebook from tools/train_units.py")
    return UnitCodebook.load(path)


def _units_layer(opts: PreprocessOptions, codebook, depth: int | None, log) -> int:
    fitted = getattr(codebook, "layer", None)
    if fitted is not None and opts.layer is not None and opts.mode == "units" and opts.layer != fitted:
        raise ConfigError(
            f"layer={opts.layer}: the codebook {opts.units!r} was fitted on layer {fitted}; units "
            f"of another layer are meaningless; drop --layer or pass --layer {fitted}"
        )
    if fitted is not None:
        return _check_layer(int(fitted), depth, "codebook layer")
    if opts.mode == "units" and opts.layer is not None:
        return _check_layer(opts.layer, depth, "layer")
    if depth is not None and UNITS_LAYER > depth:
        log(f"preprocess: the HuBERT has {depth} layers; units use layer {depth} instead of {UNITS_LAYER}")
        return depth
    return UNITS_LAYER


def _check_layer(layer: int, depth: int | None, name: str) -> int:
    require(
        depth is None or 0 <= layer <= depth,
        f"{name}={layer}: the HuBERT has hidden_states 0..{depth} (0 = after the feature projection)",
    )
    return layer


def _sha256(path: str, patterns: tuple[str, ...] = ()) -> str:
    """Content hash of a file, or of a directory's top-level files matching `patterns` (names included,
    sorted, streamed in 4 MB blocks): only what defines the tokenizer / model, not everything beside it."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
    else:
        files = [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
