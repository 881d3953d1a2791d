"""Build the blended train/valid/test datasets and batch them for MoSTModel.forward.

    config = AudioTextDatasetConfig.for_model(most, random_seed=1234, split="98,1,1",
                                              blend=(["asr", "tts", "text"], [0.4, 0.4, 0.2]))
    train, valid, test = build_datasets(config, [train_items, valid_items, test_items])
    batches = iter(data_loader(train, micro_batch_size, data_parallel_rank=dp_rank, data_parallel_size=dp))

Blend weights apply to packed sequences (Megatron's BlendedDataset draws items, not samples).
"""

from __future__ import annotations

from typing import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from megatron_most.data.dataset import AudioTextDataset, AudioTextDatasetConfig
from megatron_most.data.indexed import check_compatible, read_header
from megatron_most.options import require

FIXED = ("tokens", "labels", "loss_mask", "position_ids", "modality", "padding_mask", "attention_mask")


def is_built_on_rank() -> bool:
    """Every rank builds its own copy: the first pipeline stage needs tokens and audio, the last
    labels and loss mask, and building is deterministic and cheap, so no rank waits for a broadcast."""
    return True


def build_datasets(config: AudioTextDatasetConfig, sizes: list[int | None]) -> list:
    """[train, valid, test] (None where the split is 0); sizes = items wanted per split (None = one
    epoch; a blend with weights needs an int for every split, Megatron's rule)."""
    sizes = _check_sizes(config, sizes)
    _check_blend(config)
    return BlendedMegatronDatasetBuilder(AudioTextDataset, sizes, is_built_on_rank, config).build()


def _check_blend(config: AudioTextDatasetConfig) -> None:
    """Every dataset of the mixture must use the same tokenizer, codebook and feature extractor
    (each is also checked against the model's layout when it is built)."""
    blends = [config.blend] if config.blend is not None else [b for b in config.blend_per_split or [] if b]
    prefixes = list(dict.fromkeys(p for blend in blends for p in blend[0]))  # unique, in order
    if len(prefixes) > 1:
        check_compatible([(p, read_header(p)) for p in prefixes], action="blend")


def _check_sizes(config: AudioTextDatasetConfig, sizes: list[int | None]) -> list[int | None]:
    """Megatron asserts on a weighted blend with a None size; an empty split needs no size."""
    require(len(sizes) == 3, f"sizes={sizes}: give [train, valid, test] item counts")
    weighted = config.blend is not None and config.blend[1] is not None
    names = ("train", "valid", "test")
    sizes = list(sizes)
    for i, size in enumerate(sizes):
        empty = config.blend_per_split is None and config.split_matrix[i] is None
        if size is None and empty:
            sizes[i] = 0  # the split ratio is 0: nothing to build
        require(
            sizes[i] is not None or not weighted,
            f"sizes[{i}] ({names[i]}) is None but the blend has weights {config.blend[1] if weighted else None}; "
            "give the number of items for that split (a weighted blend is drawn to a length)",
        )
    return sizes


def collate(items: list[dict]) -> dict[str, torch.Tensor | None]:
    """Batch items in order: fixed fields stacked ([batch, seq], attention_mask [batch, 1, seq, seq]),
    audio_features [frames, dim] and audio_lengths [spans] concatenated in batch order (the order of
    the <feat> placeholders in the batch, as MoSTModel.forward expects). Both are None when the batch
    has no frames, so a model without the continuous path accepts units-only batches."""
    batch = {key: torch.stack([item[key] for item in items]) for key in FIXED if key in items[0]}
    if "dataset_id" in items[0]:  # added by BlendedDataset
        batch["dataset_id"] = torch.tensor([int(item["dataset_id"]) for item in items])
    lengths = torch.cat([item["audio_lengths"] for item in items])
    features = torch.cat([item["audio_features"] for item in items])
    batch["audio_features"] = features if len(features) else None
    batch["audio_lengths"] = lengths if len(features) else None
    return batch


class MicroBatchSampler:
    """Index lists of one micro batch for this data-parallel rank, Megatron's pretraining order:
    global step g takes items [g * mbs * dp, (g + 1) * mbs * dp), rank r the r-th mbs of them.
    Resumes after `consumed` items (counted over all DP ranks); drops the incomplete tail."""

    def __init__(self, length: int, micro_batch_size: int, *, rank: int = 0, size: int = 1, consumed: int = 0):
        require(micro_batch_size >= 1, f"micro_batch_size={micro_batch_size}: must be >= 1")
        require(0 <= rank < size, f"data-parallel rank {rank} is outside [0, {size})")
        self.length, self.mbs, self.rank, self.size, self.consumed = length, micro_batch_size, rank, size, consumed

    def __len__(self) -> int:
        return max(0, (self.length - self.consumed) // (self.mbs * self.size))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.size
        for start in range(self.consumed, self.length - step + 1, step):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


def data_loader(
    dataset,
    micro_batch_size: int,
    *,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    consumed_samples: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of collated micro batches for this data-parallel rank (tensor/pipeline peers of
    one DP rank get the same batches)."""
    sampler = MicroBatchSampler(
        len(dataset), micro_batch_size, rank=data_parallel_rank, size=data_parallel_size, consumed=consumed_samples
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
