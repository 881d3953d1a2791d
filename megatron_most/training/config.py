"""The pretraining configuration: Megatron-LM's argument names and meanings, plus MoST's own.

One field per setting, its docstring the `--help` text. Sources, later ones winning: the
field defaults, `--config FILE.yaml` (the same names with underscores), the command line
(`--tensor-model-parallel-size 2`). An unknown name in either is an error naming the closest
known one. Where the defaults differ from Megatron-LM the field says so.

    config = parse(["--config", "examples/tiny_cpu/stage1.yaml", "--train-iters", "50"])
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_most.model.config import CONFIG_NAME, MoSTConfig, preset, read_config
from megatron_most.moe.config import MAMoEConfig
from megatron_most.options import ConfigError, options, require
from megatron_most.platform.layout import ParallelLayout

LR_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@options
class TrainConfig:
    # ---------------------------------------------------------------- model and layout
    preset: str = "tiny"
    """MoST preset: deepseek_v2_lite_most | deepseek_v2_lite | tiny (model/config.py)."""
    most_config: str | None = None
    """A most_config.json (the MoSTConfig saved next to every checkpoint), or its directory, to train
    instead of --preset: e.g. a scaling-sweep size written by tools/sweep.py; --seq-length and the
    MAMoE flags still apply on top of it."""
    seq_length: int | None = None
    """Sequence length of the packed training items; None = the preset's."""
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual pipeline stage (interleaved 1F1B schedule); None = no virtual stages."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size."""
    expert_tensor_parallel_size: int | None = None
    """Tensor-parallel size inside experts; None = tensor_model_parallel_size (Megatron's default)."""
    sequence_parallel: bool | None = None
    """Sequence parallelism; None = on when tensor_model_parallel_size > 1 (Megatron-Core requires it
    for MoE with TP; Megatron-LM's default is off)."""
    bf16: bool | None = None
    """bf16 parameters and compute (fp32 main grads, optimizer states, routers); None = bf16 on
    GPUs, fp32 on CPUs (Megatron-LM's default is fp32 everywhere)."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute: full (whole layers, see recompute_method) or selective (MoE layers)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With full recompute: uniform (every recompute_num_layers-th chunk) or block (the first N)."""
    recompute_num_layers: int = 1
    """With full recompute: layers per recompute chunk (uniform) or recomputed layers (block)."""
    mamoe_masking: Literal["zero_after_softmax", "renormalize_in_group"] | None = None
    """MAMoE masking rule; None = the preset's (moe/config.py)."""
    mamoe_variant: Literal["mamoe", "vanilla", "no_shared"] | None = None
    """MAMoE variant (the paper's ablations); None = the preset's."""
    mamoe_balance_loss: Literal["global", "per_group"] | None = None
    """Balance loss over all experts or per modality group; None = the preset's."""
    mamoe_placement: Literal["balanced", "contiguous"] | None = None
    """Expert placement over EP ranks; None = the preset's (balanced)."""
    moe_aux_loss_coeff: float | None = None
    """Balance-loss coefficient; None = the preset's (0.001, DeepSeek-V2-Lite's aux_loss_alpha)."""
    moe_z_loss_coeff: float | None = None
    """Router z-loss coefficient; None = the preset's (off)."""

    # ---------------------------------------------------------------- batch and schedule
    micro_batch_size: int = 1
    """Sequences per micro batch per data-parallel rank."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all data-parallel ranks; None = micro_batch_size x DP."""
    rampup_batch_size: list[int] | None = None
    """Batch-size ramp-up: [start batch, increment, ramp-up samples] (Megatron's meaning)."""
    train_iters: int = 100
    """Optimizer steps to train for (the total, counting steps before a resume)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    """Decay after warmup (Megatron-LM's default is linear)."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to lr."""
    lr_decay_iters: int | None = None
    """Steps over which lr decays to min_lr; None = train_iters."""
    lr_wsd_decay_iters: int | None = None
    """WSD: the final decay steps (stable before them); None = 10% of lr_decay_iters."""
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine"] = "exponential"
    """WSD: shape of the final decay."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    seed: int = 1234
    """Seed of the initial weights, data order and every random stream."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Reduce gradient buckets during the backward pass."""
    overlap_param_gather: bool = False
    """Gather updated parameters during the next forward pass (distributed optimizer only)."""

    # ---------------------------------------------------------------- data
    data_path: list[str] | None = None
    """Blend: prefixes, or weights and prefixes ("0.4 data/asr 0.4 data/tts 0.2 data/text")."""
    split: str = "969,30,1"
    """Train/valid/test split of every prefix, as ratios."""
    train_data_path: list[str] | None = None
    """A separate blend for training (instead of data_path + split)."""
    valid_data_path: list[str] | None = None
    """A separate blend for validation."""
    num_workers: int = 2
    """Data-loader worker processes per rank."""
    spec_augment_time_masks: int = 0
    """SpecAugment on the continuous audio features of training items (not Megatron-LM's): time
    masks per utterance; 0 with spec_augment_freq_masks 0 = off."""
    spec_augment_time_width: int = 5
    """Longest time mask in feature frames (capped at a fifth of the utterance)."""
    spec_augment_freq_masks: int = 0
    """Frequency masks per utterance."""
    spec_augment_freq_width: int = 10
    """Widest frequency mask in channels of one stacked frame (log-mel bins)."""
    spec_augment_groups: int = 1
    """Frames stacked per feature vector: 4 for the logmel encoder (4 x 80 bins), 1 for HuBERT."""

    # ---------------------------------------------------------------- checkpoints and exit
    save: str | None = None
    """Checkpoint directory (iter_NNNNNNN/ + latest_checkpointed_iteration.txt)."""
    load: str | None = None
    """Resume from this checkpoint directory (its latest iteration), at any layout."""
    pretrained_checkpoint: str | None = None
    """Start from these weights only (iteration 0, new optimizer and data order) when `load` holds
    no checkpoint yet (Megatron-LM's meaning: a resubmitted job resumes from `load`)."""
    save_interval: int | None = None
    """Save every this many steps (and at the end); None = only at the end and on a signal."""
    keep_last: int | None = None
    """Keep only the newest K checkpoints in `save`; None = keep all."""
    async_save: bool = False
    """Write checkpoints in the background (GPU runs); the latest pointer moves once complete."""
    no_load_optim: bool = False
    """With load: do not load optimizer and LR-scheduler states."""
    no_load_rng: bool = False
    """With load: do not restore random-number generator states."""
    exit_interval: int | None = None
    """Save and exit when the step count is a multiple of this."""
    exit_duration_in_mins: float | None = None
    """Save and exit after this many minutes of training."""
    exit_signal_handler: bool = False
    """Also save and exit 0 on SIGUSR1 (SIGTERM always does)."""
    distributed_timeout_minutes: int = 10
    """Collectives waiting longer than this fail the job."""

    # ---------------------------------------------------------------- evaluation and logs
    eval_interval: int = 1000
    """Validation every this many steps (per-task losses)."""
    eval_iters: int = 10
    """Validation micro-batch rounds (global batches) per evaluation."""
    log_interval: int = 10
    """A log line (and a metrics.jsonl record) every this many steps."""
    log_dir: str | None = None
    """Where metrics.jsonl and the routing heatmaps go; None = `save`."""
    log_throughput: bool = False
    """Also log tokens/s, TFLOP/s per GPU and MFU (FLOPs from model/estimate.py)."""
    tensorboard_dir: str | None = None
    """TensorBoard event files here."""
    wandb_project: str | None = None
    """Log to this wandb project (offline without WANDB_API_KEY; never blocks training)."""
    wandb_exp_name: str | None = None
    """wandb run name."""
    mamoe_stats_interval: int | None = None
    """Per-layer, per-modality expert-load statistics and the routing heatmap every this many steps."""
    loss_spike_factor: float = 3.0
    """Log a loss spike when the loss exceeds this factor times its running mean."""
    max_consecutive_skipped_iters: int = 5
    """Stop the run after this many optimizer steps in a row were skipped (non-finite loss or grads)."""

    def __post_init__(self):
        positive = ("micro_batch_size", "train_iters", "log_interval", "eval_interval", "eval_iters")
        for name in positive:
            require(getattr(self, name) >= 1, f"--{_flag(name)}={getattr(self, name)}: must be >= 1")
        require(self.lr_decay_style in LR_STYLES, f"--lr-decay-style={self.lr_decay_style!r}: one of {LR_STYLES}")
        decay = self.lr_decay_iters or self.train_iters
        require(
            self.lr_warmup_iters < decay,
            f"--lr-warmup-iters={self.lr_warmup_iters} must be below the decay steps ({decay}: --lr-decay-iters, "
            "else --train-iters)",
        )
        require(0 <= self.min_lr <= self.lr, f"--min-lr={self.min_lr}: must be within 0..--lr ({self.lr})")
        require(
            self.data_path is not None or self.train_data_path is not None,
            "--data-path is missing: give the packed prefixes to train on (weights optional)",
        )
        require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer",
        )
        require(
            not (self.load and self.pretrained_checkpoint), "give --load (resume) or --pretrained-checkpoint, not both"
        )
        blends = (self.data_path, self.train_data_path, self.valid_data_path)
        for name, paths in zip(("data_path", "train_data_path", "valid_data_path"), blends):
            if paths is not None:
                parse_blend(paths, f"--{_flag(name)}")

    # ---------------------------------------------------------------- derived
    @property
    def layout(self) -> ParallelLayout:
        """The parallel layout; virtual stages follow from the preset's layer count."""
        sp = self.tensor_model_parallel_size > 1 if self.sequence_parallel is None else self.sequence_parallel
        vpp = None
        if self.num_layers_per_virtual_pipeline_stage is not None:
            per_rank = self._base_model().num_layers // self.pipeline_model_parallel_size
            vpp = max(1, per_rank // self.num_layers_per_virtual_pipeline_stage)
        return ParallelLayout(
            vpp=vpp,
            tp=self.tensor_model_parallel_size,
            pp=self.pipeline_model_parallel_size,
            ep=self.expert_model_parallel_size,
            etp=self.expert_tensor_parallel_size,
            sp=sp,
        )

    @property
    def precision(self) -> str:
        return "auto" if self.bf16 is None else ("bf16" if self.bf16 else "fp32")

    def model_config(self) -> MoSTConfig:
        """The preset (or --most-config) with this run's sequence length and MAMoE overrides."""
        most = self._base_model()
        changes = {
            field: getattr(self, name)
            for name, field in (
                ("mamoe_masking", "masking"),
                ("mamoe_variant", "variant"),
                ("mamoe_balance_loss", "balance_loss"),
                ("mamoe_placement", "placement"),
                ("moe_aux_loss_coeff", "balance_coeff"),
                ("moe_z_loss_coeff", "z_loss_coeff"),
            )
            if getattr(self, name) is not None
        }
        mamoe: MAMoEConfig = dataclasses.replace(most.mamoe, **changes)
        return most.replace(mamoe=mamoe, seq_length=self.seq_length or most.seq_length)

    def _base_model(self) -> MoSTConfig:
        if self.most_config is None:
            return preset(self.preset)
        path = Path(self.most_config)
        try:  # read_config takes the directory holding most_config.json
            return read_config(path.parent if path.name == CONFIG_NAME else path)
        except FileNotFoundError as e:
            raise ConfigError(f"--most-config {self.most_config}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_blend(paths: list[str], flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """Megatron's blend syntax: ["a", "b"] (equal weights) or ["0.4", "a", "0.6", "b"]."""
    require(len(paths) > 0, f"{flag} is empty")
    try:
        float(paths[0])
    except ValueError:
        return list(paths), None
    require(len(paths) % 2 == 0, f"{flag} {' '.join(paths)}: weights and prefixes must alternate (weight prefix ...)")
    weights, prefixes = paths[0::2], paths[1::2]
    try:
        values = [float(w) for w in weights]
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}: weights and prefixes must alternate (0.4 data/asr 0.6 data/tts)") from e
    bad = [w for w in values if not w > 0]
    require(not bad, f"{flag}: blend weights must be positive, got {bad}")
    return prefixes, values


# ---------------------------------------------------------------------------------- parsing


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _docs() -> dict[str, str]:
    """Field docstrings (the string literal under each field) as help texts."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as `int | None` or `list[str] | None`."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 - our own source
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0]), False
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain MoST with Megatron-Core (Megatron-LM's flags; see README).", allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file with the same names (underscores); the command line wins")
    docs = _docs()
    for name, field in _fields().items():
        kind, many = _base_type(field.type)
        help_text = docs.get(name, "")
        if kind is bool:
            action = "store_true" if name.startswith("no_") else argparse.BooleanOptionalAction
            parser.add_argument(f"--{_flag(name)}", action=action, default=None, help=help_text)
        else:
            parser.add_argument(
                f"--{_flag(name)}", type=kind, nargs="+" if many else None, default=None, help=help_text
            )
    return parser


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), list(_fields()), n=1, cutoff=0.5)
    return f"; did you mean --{_flag(close[0])}?" if close else "; see --help"


def _read_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    values = yaml.safe_load(file.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of names to values, got {type(values).__name__}")
    for key in values:
        if key not in _fields():
            raise ConfigError(f"--config {path}: unknown name {key!r}{_closest(key)}")
    return values


def parse(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line (and --config). ConfigError names the field, value and fix."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = next((u for u in unknown if u.startswith("--")), unknown[0])
        raise ConfigError(f"unknown argument {name!r}{_closest(name.lstrip('-').split('=')[0])}")
    values = _read_yaml(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    values.update(given)
    for key, value in values.items():  # YAML numbers and strings for list-valued fields
        if _base_type(_fields()[key].type)[1] and isinstance(value, str):
            values[key] = value.split()
    return TrainConfig.from_dict(values)


def describe(config: TrainConfig) -> str:
    """The resolved configuration, one `name: value` per line (printed at start)."""
    return "\n".join(f"  {name}: {value}" for name, value in config.to_dict().items())


__all__ = ["TrainConfig", "parse", "parse_blend", "build_parser", "describe", "LR_STYLES"]
