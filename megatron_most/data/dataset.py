"""Training dataset: packed fixed-length sequences of audio-text samples, Megatron-Core style.

`AudioTextDataset` is a Megatron-Core `MegatronDataset`, so `BlendedMegatronDatasetBuilder`
builds the train/valid/test splits of a weighted blend of preprocessed prefixes (see
`megatron_most.data.blend`). Each item is one sequence of `sequence_length` tokens holding
several whole samples, packed greedily (next-fit) in a seeded shuffled order:

    tokens/labels   [seq] int64   labels = next token (a chunk of seq + 1 tokens, like GPTDataset)
    loss_mask       [seq] float32 0 at padding, at each sample's last token (its label is the next
                                  sample), where the label is <feat> and where the stored mask is 0
    position_ids    [seq] int64   restart at 0 for every packed sample (and for the padding tail)
    modality        [seq] int64   TokenLayout.modality (1 = unit or <feat>)
    padding_mask    [seq] bool    True = padding
    attention_mask  [1, seq, seq] bool, True = masked: causal within a sample, nothing across
                                  samples (only with create_attention_mask; MoSTModel derives it
                                  from position_ids)
    audio_features  [frames, dim] float32, the item's <feat> frames in placeholder order
    audio_lengths   [spans] int64 frames per run of <feat> (one <boa> <feat>... <eoa> span each)

Everything depends only on the config (seed, blend, split, sizes), never on the rank, so every
rank that builds the dataset sees the same items.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank

from megatron_most.audio.augment import SpecAugment, spec_augment
from megatron_most.data.indexed import (
    FEATURE_DTYPE,
    FEATURE_STORAGE,
    FEATURES_SUFFIX,
    LOSS_MASK_SUFFIX,
    MASK_DTYPE,
    TOKEN_DTYPE,
    open_audio_text,
)
from megatron_most.model.vocab import TokenLayout, check_vocab
from megatron_most.options import ConfigError, require

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class AudioTextDatasetConfig(BlendedMegatronDatasetConfig):
    """BlendedMegatronDatasetConfig plus the model's token layout and the packing settings.

    `sequence_length` is the model's seq_length; `random_seed` drives every shuffle.
    """

    text_vocab_size: int
    """Text vocabulary size of the model (MoSTConfig.text_vocab_size); datasets must match."""
    num_units: int
    """HuBERT units of the model (MoSTConfig.num_units); datasets with units must match."""
    feature_dim: int = 0
    """Continuous feature size of the model (MoSTConfig.audio_feature_dim); 0 = no continuous path."""
    pad_id: int = 0
    """Token id written at padding positions (a text id; padding is never attended to or a target)."""
    create_attention_mask: bool = False
    """Also return the dense block-diagonal causal attention_mask [1, seq, seq] (4 MiB per item at
    seq 2048). MoSTModel does not need it: it derives the same mask from the position ids, which
    restart at every packed sample (model/packing.py). For models that take only a dense mask."""
    pack: bool = True
    """Pack several samples per sequence; False = one sample per sequence, the rest padding."""
    spec_augment: SpecAugment | None = None
    """Mask the continuous features of the train split (audio/augment.py), seeded per item so a
    resumed run masks as an uninterrupted one; valid/test items are never masked. It changes no
    index, so it is not among the cache-key attributes."""

    def __post_init__(self) -> None:
        check_vocab(self.text_vocab_size, self.num_units)
        require(self.feature_dim >= 0, f"AudioTextDatasetConfig.feature_dim={self.feature_dim}: must be >= 0")
        require(
            self.sequence_length >= 1, f"AudioTextDatasetConfig.sequence_length={self.sequence_length}: must be >= 1"
        )
        require(
            0 <= self.pad_id < self.text_vocab_size,
            f"AudioTextDatasetConfig.pad_id={self.pad_id}: must be a text token id in [0, {self.text_vocab_size})",
        )
        require(
            self.blend is not None or self.blend_per_split is not None,
            "AudioTextDatasetConfig: give blend (with split) or blend_per_split; there is no mock audio-text data",
        )
        super().__post_init__()

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.text_vocab_size, self.num_units, audio=bool(self.num_units or self.feature_dim))

    @classmethod
    def for_model(cls, most, **kwargs) -> "AudioTextDatasetConfig":
        """Config matching a MoSTConfig's layout and seq_length; `kwargs` = the other fields."""
        kwargs.setdefault("sequence_length", most.seq_length)
        return cls(
            text_vocab_size=most.text_vocab_size, num_units=most.num_units, feature_dim=most.audio_feature_dim, **kwargs
        )


class AudioTextSource:
    """One preprocessed prefix (validated by indexed.open_audio_text): the header and flat memory
    maps of tokens, loss mask and features, with per-sample element offsets so that an item is a
    few numpy slices."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        # No token scan: it reads the whole .bin on every rank at startup; preprocessing scanned
        # it and MoSTModel validates ids per batch.
        files = open_audio_text(prefix, scan_tokens=False)
        self.header = files.header
        self.lengths = files.lengths.astype(np.int64)  # [samples]
        self.token_offsets = files.tokens.index.sequence_pointers // np.dtype(TOKEN_DTYPE).itemsize
        self.mask_offsets = files.loss_mask.index.sequence_pointers // np.dtype(MASK_DTYPE).itemsize
        self.tokens = _flat(prefix, TOKEN_DTYPE)
        self.mask = _flat(prefix + LOSS_MASK_SUFFIX, MASK_DTYPE)
        self.feature_dim = files.feature_dim
        self.features = None
        if self.feature_dim:
            self.feature_offsets = files.features.index.sequence_pointers // np.dtype(FEATURE_STORAGE).itemsize
            self.feature_sizes = files.features.sequence_lengths.astype(np.int64)  # frames * dim per sample
            self.features = _flat(prefix + FEATURES_SUFFIX, FEATURE_STORAGE).view(FEATURE_DTYPE)
        files.close()

    def __len__(self) -> int:
        return len(self.lengths)

    # Memory maps do not pickle (numpy would copy the whole file): reopen in DataLoader workers.
    def __getstate__(self):
        return self.prefix

    def __setstate__(self, prefix):
        self.__init__(prefix)


def check_header(prefix: str, h: dict, config: AudioTextDatasetConfig) -> None:
    """The dataset's token ids must mean what the model's layout says they mean (header `h` of
    the dataset at `prefix`; also run by the training entry before any process group exists)."""
    path = f"{prefix}.json"
    if h["text_vocab_size"] != config.text_vocab_size:
        raise ConfigError(
            f"{path}: text_vocab_size={h['text_vocab_size']} but the model has "
            f"text_vocab_size={config.text_vocab_size}; preprocess with the model's tokenizer and "
            "--preset/--text-vocab-size of the model (tools/preprocess_audio_text.py)"
        )
    # 0 in the header = the dataset holds no unit tokens / no features, which fits any model.
    if h["num_units"] and h["num_units"] != config.num_units:
        raise ConfigError(
            f"{path}: num_units={h['num_units']} but the model has num_units={config.num_units}; "
            "preprocess with the model's unit codebook"
        )
    if h["feature_dim"] and h["feature_dim"] != config.feature_dim:
        raise ConfigError(
            f"{path}: feature_dim={h['feature_dim']} but the model has audio_feature_dim={config.feature_dim}; "
            "preprocess with the model's HuBERT (or units mode)"
        )


def _flat(prefix: str, dtype) -> np.ndarray:
    path = prefix + ".bin"
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)  # mmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r")


def pack_next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Item boundaries for greedy next-fit packing of samples in the given order.

    Returns offsets [items + 1]: item i holds samples offsets[i]:offsets[i+1]. Every length
    must be <= capacity. One searchsorted per item (not per sample) keeps this fast.
    """
    ends = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))  # [n + 1]
    offsets = [0]
    n = len(lengths)
    while offsets[-1] < n:
        start = offsets[-1]
        end = int(np.searchsorted(ends, ends[start] + capacity, side="right")) - 1
        if end == start:
            raise ValueError(f"sample at position {start} has {lengths[start]} tokens, over the capacity {capacity}")
        offsets.append(end)
    return np.asarray(offsets, dtype=np.int64)


class AudioTextDataset(MegatronDataset):
    """Packed audio-text sequences from one prefix and split (see the module docstring)."""

    def __init__(self, dataset: AudioTextSource, dataset_path, indices, num_samples, index_split: Split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        check_header(dataset.prefix, dataset.header, config)
        layout = config.layout
        self.seq = config.sequence_length
        self.layout = layout
        self.feat_id = layout.feature
        self.order, self.offsets, self.epochs = self._build_index()
        self._causal = None
        if config.create_attention_mask:
            # True above the diagonal; copied per item, then blocks below the diagonal are masked.
            self._causal = np.triu(np.ones((self.seq, self.seq), dtype=bool), k=1)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: AudioTextSource) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: AudioTextDatasetConfig) -> AudioTextSource:
        source = open_source(dataset_path)
        check_header(source.prefix, source.header, config)  # fail before any index is built
        return source

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return MegatronDataset._key_config_attributes() + [
            "text_vocab_size",
            "num_units",
            "feature_dim",
            "pad_id",
            "create_attention_mask",
            "pack",
        ]

    def _build_index(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Sample order (all epochs concatenated) and item offsets into it.

        Each epoch is a fresh permutation of the split's samples that fit, seeded by
        (seed, split, epoch); items never straddle epochs. Epochs are added until there are
        at least num_samples items (one epoch when num_samples is None).
        """
        capacity = self.seq + 1  # seq inputs + the label of the last one
        indices = np.asarray(self.indices, dtype=np.int64)
        lengths = self.dataset.lengths[indices]
        fits = indices[lengths <= capacity]
        self.skipped = len(indices) - len(fits)
        where = f"{self.dataset_path} ({self.index_split.name} split)"
        if len(indices) == 0:
            if not self.num_samples:  # an unused split of a small dataset
                return np.zeros(0, np.int64), np.zeros(1, np.int64), 0
            raise ConfigError(
                f"{where}: {self.num_samples} items requested but the split holds none of the dataset's "
                f"{len(self.dataset)} samples; change split (now {self.config.split!r}) or add data"
            )
        if len(fits) == 0:
            raise ConfigError(
                f"{where}: no sample fits sequence_length + 1 = {capacity} tokens ({len(indices)} samples, "
                f"shortest {int(lengths.min())}); raise sequence_length"
            )
        if self.skipped:
            log_single_rank(
                logger, logging.WARNING, f"{where}: skipped {self.skipped} samples longer than {capacity} tokens"
            )
        orders, offsets, items, epoch, used = [], [np.zeros(1, np.int64)], 0, 0, 0
        while epoch == 0 or (self.num_samples is not None and items < self.num_samples):
            rng = np.random.default_rng([self.config.random_seed, self.index_split.value, epoch])
            order = rng.permutation(fits)
            bounds = (
                pack_next_fit(self.dataset.lengths[order], capacity)
                if self.config.pack
                else np.arange(len(order) + 1, dtype=np.int64)
            )
            offsets.append(bounds[1:] + used)
            orders.append(order)
            used += len(order)
            items += len(bounds) - 1
            epoch += 1
        return np.concatenate(orders), np.concatenate(offsets), epoch

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def samples(self, idx: int) -> np.ndarray:
        """Low-level sample indices packed into item `idx`, in order."""
        return self.order[self.offsets[idx] : self.offsets[idx + 1]]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        src, seq = self.dataset, self.seq
        ids = self.samples(idx)
        lens = src.lengths[ids]  # [k]
        n = int(lens.sum())  # <= seq + 1
        buf = np.full(seq + 1, self.config.pad_id, dtype=np.int64)
        buf[:n] = _gather(src.tokens, src.token_offsets[ids], lens)
        stored = np.zeros(seq + 1, dtype=np.float32)
        stored[:n] = _gather(src.mask, src.mask_offsets[ids], lens)
        tokens, labels = buf[:-1].copy(), buf[1:].copy()

        starts = np.concatenate(([0], np.cumsum(lens)))  # [k + 1]: sample starts, then the padding start
        loss_mask = stored[1:].copy()  # stored mask marks targets, so the label at i is buf[i + 1]
        last = starts[1:] - 1  # each sample's last token: its label would be the next sample
        loss_mask[last[last < seq]] = 0.0
        loss_mask[labels == self.feat_id] = 0.0
        segment_lens = np.diff(starts, append=seq + 1)  # samples, then the padding tail
        position_ids = np.arange(seq + 1, dtype=np.int64) - np.repeat(starts, segment_lens)

        item = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids[:seq]),
            "modality": self.layout.modality(torch.from_numpy(tokens)),  # the vocabulary's one rule
            "padding_mask": torch.from_numpy(np.arange(seq) >= n),
        }
        if self._causal is not None:
            item["attention_mask"] = torch.from_numpy(self._attention_mask(starts))
        features, lengths = self._audio(ids, tokens, buf[:n])
        augment = self.config.spec_augment
        if augment is not None and augment.active and self.index_split == Split.train and len(lengths):
            rng = np.random.default_rng(
                [self.config.random_seed, zlib.crc32(os.path.basename(self.dataset.prefix).encode()), idx]
            )
            features = torch.from_numpy(spec_augment(features.numpy(), lengths.numpy(), augment, rng))
        item["audio_features"], item["audio_lengths"] = features, lengths
        return item

    def _attention_mask(self, starts: np.ndarray) -> np.ndarray:
        mask = self._causal.copy()  # [seq, seq]
        bounds = starts.tolist() + [self.seq]
        for begin, end in zip(bounds[1:-1], bounds[2:]):  # segments after the first (padding included)
            if begin < self.seq:
                mask[begin:end, :begin] = True
        return mask[None]  # [1, seq, seq]

    def _audio(self, ids: np.ndarray, tokens: np.ndarray, packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the <feat> tokens in `tokens` [seq]; `packed` [n <= seq + 1] = all packed tokens."""
        src, dim = self.dataset, self.config.feature_dim
        if src.features is None:
            return torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
        sizes = src.feature_sizes[ids]
        flat = _gather(src.features, src.feature_offsets[ids], sizes)
        stored = flat.reshape(-1, dim)  # [stored frames, dim]
        placeholders = int(np.count_nonzero(packed == self.feat_id))
        if placeholders != len(stored):
            raise ValueError(
                f"{src.prefix}: samples {ids.tolist()} have {placeholders} <feat> tokens but {len(stored)} feature "
                "frames; re-run preprocessing"
            )
        is_feat = np.concatenate(([0], tokens == self.feat_id, [0])).astype(np.int8)
        edges = np.diff(is_feat)
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)  # [spans]
        features = stored[: int(runs.sum())]  # a sample ending in <feat> at the chunk's extra token loses that frame
        # torch converts float16 about 10x faster than numpy's astype
        return torch.from_numpy(features).float(), torch.from_numpy(runs.astype(np.int64))


def _gather(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate flat[offsets[j] : offsets[j] + lengths[j]] over j (memory-map slices, one copy)."""
    return np.concatenate([flat[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist())])


def open_source(prefix: str) -> AudioTextSource:
    """The low-level dataset of one prefix (header checked, .bin/.idx pairs opened)."""
    return AudioTextSource(prefix)
