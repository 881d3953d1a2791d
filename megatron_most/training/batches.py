"""Training data for the loop: the blended datasets of --data-path, each rank's micro-batches,
and the forward step that feeds them to MoSTModel and reports losses per task and per target
modality.

Every rank builds the same datasets (deterministic from the config) and reads the micro-batches
of its data-parallel rank, so tensor- and pipeline-parallel peers see identical batches without
a broadcast; the loader resumes after the consumed samples. Tensors move to the rank's device
in one place, `to_device`, inside the forward step.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from megatron_most.audio.augment import SpecAugment
from megatron_most.data.blend import build_datasets, data_loader
from megatron_most.data.dataset import AudioTextDatasetConfig, check_header
from megatron_most.data.indexed import check_compatible, read_header
from megatron_most.model.config import MoSTConfig
from megatron_most.model.loss import lm_loss
from megatron_most.platform import device
from megatron_most.training.config import TrainConfig, parse_blend

MODALITY_KEYS = ("text loss sum", "text tokens", "unit loss sum", "unit tokens")
"""lm_loss's report of losses by target modality (text tokens, unit tokens), as sums."""


def _blends(cfg: TrainConfig) -> dict[str, tuple[list[str], list[float] | None]]:
    if cfg.train_data_path is not None:
        blends = {"train": parse_blend(cfg.train_data_path, "--train-data-path")}
        if cfg.valid_data_path is not None:
            blends["valid"] = parse_blend(cfg.valid_data_path, "--valid-data-path")
        return blends
    return {"data": parse_blend(cfg.data_path)}


def dataset_config(cfg: TrainConfig, most: MoSTConfig) -> AudioTextDatasetConfig:
    blends = _blends(cfg)
    augment = SpecAugment(
        time_masks=cfg.spec_augment_time_masks, time_width=cfg.spec_augment_time_width,
        freq_masks=cfg.spec_augment_freq_masks, freq_width=cfg.spec_augment_freq_width,
        groups=cfg.spec_augment_groups,
    )  # fmt: skip
    common = dict(random_seed=cfg.seed, sequence_length=most.seq_length, spec_augment=augment)
    if "data" in blends:
        return AudioTextDatasetConfig.for_model(most, blend=blends["data"], split=cfg.split, **common)
    per_split = [blends["train"], blends.get("valid"), None]
    return AudioTextDatasetConfig.for_model(most, blend_per_split=per_split, **common)


def prefixes(cfg: TrainConfig) -> list[str]:
    """Every prefix of the run's blends, in order, once."""
    return list(dict.fromkeys(p for names, _ in _blends(cfg).values() for p in names))


def check_data(cfg: TrainConfig, most: MoSTConfig) -> None:
    """Before any process group exists: every prefix is a complete dataset made for this model's
    tokens (tokenizer, codebook, feature size) and the datasets of a blend agree with each other.
    Raises ConfigError / DatasetFormatError naming the prefix and the fix."""
    config = dataset_config(cfg, most)
    headers = [(p, read_header(p)) for p in prefixes(cfg)]
    for prefix, header in headers:
        check_header(prefix, header, config)
    if len(headers) > 1:
        check_compatible(headers, action="blend")


def task_names(cfg: TrainConfig, split: str = "train") -> list[str]:
    """The task of each dataset of a split's blend (the header's task, else the prefix's name; the
    prefix's name also when two datasets share a task), indexed like the batches' `dataset_id`."""
    blends = _blends(cfg)
    names = blends.get(split if split in blends else "data", blends.get("train"))[0]
    tasks = []
    for prefix in names:
        task = read_header(prefix).get("task")
        tasks.append(task if isinstance(task, str) else Path(prefix).name)
    # a task packed twice (ASR from features and from units) is reported per dataset: its prefix's name
    return [Path(p).name if tasks.count(t) > 1 else t for p, t in zip(names, tasks)]


def build(cfg: TrainConfig, most: MoSTConfig, *, global_batch: int) -> tuple:
    """(train, valid) datasets sized for the run: train_iters global batches (an upper bound
    under batch ramp-up) and eval_iters global batches of validation (the same ones each time)."""
    sizes = [cfg.train_iters * global_batch, cfg.eval_iters * global_batch, cfg.eval_iters * global_batch]
    train, valid, _ = build_datasets(dataset_config(cfg, most), sizes)
    return train, valid


def loader(dataset, cfg: TrainConfig, *, dp_rank: int, dp_size: int, consumed: int = 0, workers: int | None = None):
    """This data-parallel rank's micro-batches of `dataset` after `consumed` samples (all ranks)."""
    return iter(
        data_loader(
            dataset,
            cfg.micro_batch_size,
            data_parallel_rank=dp_rank,
            data_parallel_size=dp_size,
            consumed_samples=consumed,
            num_workers=cfg.num_workers if workers is None else workers,
        )
    )


def to_device(batch: dict) -> dict:
    """Every tensor of a collated batch on this rank's device (the one move of the data path)."""
    target = device()
    return {k: v.to(target, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def report_keys(tasks: list[str]) -> tuple[str, ...]:
    """The loss report's keys, identical on every rank (the schedule reduces them in this order)."""
    per_task = [k for task in dict.fromkeys(tasks) for k in (f"loss sum/{task}", f"tokens/{task}")]
    return ("loss", *MODALITY_KEYS, *per_task)


def forward_step(tasks: list[str], most: MoSTConfig, data_iterator, model):
    """Megatron forward step: one micro-batch through MoSTModel, and its loss function."""
    batch = to_device(next(data_iterator))
    per_token = model(
        batch["tokens"],
        batch["position_ids"],
        None,  # the model derives packed-row attention from the position ids
        labels=batch["labels"],
        audio_features=batch.get("audio_features"),
        audio_lengths=batch.get("audio_lengths"),
        padding_mask=batch["padding_mask"],
    )
    dataset_id = batch.get("dataset_id")
    return per_token, functools.partial(task_loss, batch["labels"], batch["loss_mask"], dataset_id, tasks, most)


def task_loss(labels, loss_mask, dataset_id, tasks, most, per_token_loss):
    """lm_loss over the micro-batch plus loss sums and token counts per task (a row comes from
    one dataset of the blend: `dataset_id`)."""
    loss, report = lm_loss(per_token_loss, labels, loss_mask, most.tokens)
    mask = loss_mask.float() * (labels != most.tokens.feature)  # what lm_loss counts
    per_row_loss = (per_token_loss.float() * mask).sum(-1).detach()  # [batch]
    per_row_tokens = mask.sum(-1)
    ids = dataset_id if dataset_id is not None else torch.zeros_like(per_row_tokens, dtype=torch.long)
    for task in dict.fromkeys(tasks):
        rows = torch.tensor([tasks[i] == task for i in ids.tolist()], device=ids.device)
        report[f"loss sum/{task}"] = (per_row_loss * rows).sum()
        report[f"tokens/{task}"] = (per_row_tokens * rows).sum()
    return loss, report
