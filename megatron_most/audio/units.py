"""K-means codebook over HuBERT features: fit it, store it (safetensors), turn features into unit ids.

Units follow the HuBERT recipe (fairseq examples/hubert/simple_kmeans): MiniBatchKMeans on frames
of one layer, each frame -> nearest centroid, and for MoST consecutive duplicate units are removed.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sklearn.cluster import MiniBatchKMeans

from megatron_most.options import ConfigError

FORMAT = "megatron_most.unit_codebook"
VERSION = "1"
_ASSIGN_CHUNK = 8192  # frames per distance matrix: [chunk, K] stays small for K=500


class UnitCodebook:
    """`centroids` [K, dim] float32; `assign(features)` -> int64 unit ids in 0..K-1."""

    def __init__(self, centroids: torch.Tensor | np.ndarray, *, layer: int | None = None, hubert: str = ""):
        centroids = torch.as_tensor(centroids, dtype=torch.float32).contiguous()
        if centroids.ndim != 2 or min(centroids.shape) < 1:
            raise ConfigError(f"UnitCodebook centroids shape {tuple(centroids.shape)}: need [K, dim] with K, dim >= 1")
        self.centroids = centroids  # [K, dim]
        self.layer = layer
        self.hubert = hubert
        self._norms = (centroids * centroids).sum(dim=1)  # [K] ||c||^2

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def assign(self, features: torch.Tensor | np.ndarray, *, dedup: bool = True) -> np.ndarray:
        """Nearest centroid (squared Euclidean) per frame [frames, dim] -> [frames'] int64."""
        features = torch.as_tensor(features).to(self.centroids.device, torch.float32)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"UnitCodebook.assign: features shape {tuple(features.shape)}, expected "
                f"[frames, {self.dim}] (codebook fitted on HuBERT layer {self.layer} features)"
            )
        ids = []
        for chunk in features.split(_ASSIGN_CHUNK):  # [n, dim]
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so it drops out of argmin.
            ids.append(torch.argmin(self._norms[None, :] - 2.0 * chunk @ self.centroids.T, dim=1))
        units = torch.cat(ids).cpu().numpy().astype(np.int64) if ids else np.zeros(0, np.int64)
        return dedup_units(units) if dedup else units

    def save(self, path: str | os.PathLike) -> None:
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "k": str(self.k),
            "dim": str(self.dim),
            "hubert_layer": "" if self.layer is None else str(self.layer),
            "hubert": self.hubert,
        }
        save_file({"centroids": self.centroids.cpu()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnitCodebook":
        """Read a codebook written by `save` (safetensors only: never unpickles anything)."""
        fix = "write one with tools/train_units.py (UnitCodebook.save)"
        if not os.path.isfile(path):
            raise ConfigError(f"unit codebook {path}: file not found; {fix}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                centroids = f.get_tensor("centroids") if "centroids" in f.keys() else None
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"unit codebook {path}: not a readable safetensors file ({err}); {fix}") from err
        if metadata.get("format") != FORMAT or centroids is None:
            raise ConfigError(
                f"unit codebook {path}: safetensors file without format={FORMAT!r} metadata and a "
                f"'centroids' tensor; {fix}"
            )
        if metadata.get("version") != VERSION:
            raise ConfigError(f"unit codebook {path}: version {metadata.get('version')!r}, this code reads {VERSION!r}")
        expected = (int(metadata["k"]), int(metadata["dim"]))
        if tuple(centroids.shape) != expected or centroids.dtype != torch.float32:
            raise ConfigError(
                f"unit codebook {path}: centroids {centroids.dtype} {tuple(centroids.shape)} disagree "
                f"with metadata k, dim = {expected} (float32); the file is damaged, {fix}"
            )
        layer = metadata.get("hubert_layer", "")
        return cls(centroids, layer=int(layer) if layer else None, hubert=metadata.get("hubert", ""))


def dedup_units(units: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats: [5, 5, 7, 5] -> [5, 7, 5]."""
    if len(units) == 0:
        return units
    keep = np.empty(len(units), dtype=bool)
    keep[0] = True
    np.not_equal(units[1:], units[:-1], out=keep[1:])
    return units[keep]


def fit_codebook(
    features: Iterable[np.ndarray | torch.Tensor],
    *,
    k: int = 500,
    seed: int = 0,
    batch_size: int = 10000,
    max_frames: int | None = None,
    n_init: int = 20,
    max_iter: int = 100,
    layer: int | None = None,
    hubert: str = "",
) -> UnitCodebook:
    """MiniBatchKMeans on the frames of `features` ([frames, dim] each); deterministic for a seed.

    max_frames: keep a uniform random sample (reservoir, seeded) of at most this many frames, so
    memory stays bounded however much audio streams in. Defaults follow fairseq's learn_kmeans.py.
    """
    if k < 1 or batch_size < 1 or n_init < 1 or max_iter < 1:
        raise ConfigError(
            f"fit_codebook: k={k}, batch_size={batch_size}, n_init={n_init}, max_iter={max_iter}: all must be >= 1"
        )
    frames = _collect(features, max_frames, np.random.default_rng(seed))  # [n, dim] float32
    if len(frames) < k:
        raise ConfigError(
            f"fit_codebook: k={k} centroids need at least {k} feature frames, got {len(frames)}; "
            "lower k or give more audio (more manifests / a larger --max-hours)"
        )
    kmeans = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        n_init=n_init,
        max_iter=max_iter,
        batch_size=batch_size,
        random_state=seed,
        compute_labels=False,
        tol=0.0,
        max_no_improvement=100,
        reassignment_ratio=0.0,
    )
    kmeans.fit(frames)
    return UnitCodebook(kmeans.cluster_centers_.astype(np.float32), layer=layer, hubert=hubert)


def _collect(features: Iterable, max_frames: int | None, rng: np.random.Generator) -> np.ndarray:
    """All frames, or a reservoir sample (Algorithm R, vectorised per chunk) of max_frames of them."""
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"fit_codebook: max_frames={max_frames}: must be >= 1 or None (keep all)")
    chunks, reservoir, seen = [], None, 0
    for chunk in features:
        chunk = _as_frames(chunk)  # [n, dim]
        if max_frames is None:
            chunks.append(chunk)
            continue
        if reservoir is None:
            reservoir = np.empty((max_frames, chunk.shape[1]), dtype=np.float32)
        fill = min(max(max_frames - seen, 0), len(chunk))
        reservoir[seen : seen + fill] = chunk[:fill]
        rest = np.arange(fill, len(chunk))  # rows that compete for a slot
        slots = rng.integers(0, seen + rest + 1)  # frame number t replaces slot j < max_frames w.p. max_frames/(t+1)
        hit = slots < max_frames
        rows, slots = rest[hit], slots[hit]
        _, last = np.unique(slots[::-1], return_index=True)  # sequential semantics: the latest writer wins
        keep = len(slots) - 1 - last
        reservoir[slots[keep]] = chunk[rows[keep]]
        seen += len(chunk)
    if max_frames is None:
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return reservoir[: min(seen, max_frames)] if reservoir is not None else np.zeros((0, 0), np.float32)


def _as_frames(chunk) -> np.ndarray:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu().float().numpy()
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim != 2:
        raise ValueError(f"fit_codebook: features must be [frames, dim] arrays, got shape {chunk.shape}")
    return chunk
