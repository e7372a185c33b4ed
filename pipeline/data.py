"""Datasets over the feature store, TSN-style clip sampling, and the LightningDataModule.

A training item is ``num_segments`` steps of one video: the video's frames are cut into that many
equal segments and one frame is drawn from each (at random when training, the centre when
evaluating). Grid features ``(C, G, G)`` are flattened to ``C*G*G`` per step.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from pipeline.stores import FeatureStore, IndexRow, StoreError


class Batch(TypedDict):
    """What every temporal task receives."""

    x: torch.Tensor  # (B, T, D) float32
    mask: torch.Tensor  # (B, T) bool, True at real steps
    y: torch.Tensor  # (B,) int64 class index


def segment_indices(length: int | np.ndarray, num_segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN sampling: one index in each of ``num_segments`` equal segments of ``range(length)``.

    With ``rng`` the index is uniform within its segment (training jitter); without, the segment's
    centre (deterministic evaluation). Shorter videos repeat frames, keeping order. ``length`` may be
    an array of B lengths: the result is then ``(B, num_segments)``, in one vectorised pass.
    """
    lengths = np.asarray(length, dtype=np.int64)
    edges = lengths[..., None] * (np.arange(num_segments + 1) / num_segments)  # (..., T + 1)
    width = edges[..., 1:] - edges[..., :-1]
    offsets = 0.5 if rng is None else rng.random(width.shape)
    points = edges[..., :-1] + offsets * width
    return np.minimum(points.astype(np.int64), lengths[..., None] - 1)


class FeatureClips(Dataset):
    """Clips of one split of a feature store, as :class:`Batch` items."""

    def __init__(self, root: str, rows: list[IndexRow], classes: list[str], num_segments: int, train: bool, seed: int = 0,
                 noise: float = 0.0, drop: float = 0.0):
        self.root, self.rows, self.num_segments, self.train, self.seed = root, rows, num_segments, train, seed
        self.noise, self.drop = noise, drop  # feature-level augmentation, training only
        self.class_index = {c: i for i, c in enumerate(classes)}
        self._store: FeatureStore | None = None  # opened lazily: one memmap per worker process
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore(self.root)
            # Seeded per process: torch gives each DataLoader worker its own seed (seed_everything(workers=True)).
            self._rng = np.random.default_rng([self.seed, torch.initial_seed() % 2**32])
        return self._store

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {"x": batch["x"][0], "mask": batch["mask"][0], "y": int(batch["y"][0])}

    def __getitems__(self, items: list[int]) -> Batch:
        """A whole batch: one fancy-index read per shard instead of one per clip (DataLoader calls this)."""
        store = self._open()
        rows = [self.rows[i] for i in items]
        lengths = np.array([row.length for row in rows])
        starts = np.array([row.offset for row in rows])[:, None] + segment_indices(
            lengths, self.num_segments, self._rng if self.train else None)
        shards = np.array([row.shard for row in rows])
        x = np.empty((len(rows), self.num_segments, int(np.prod(store.feature_shape))), np.float32)
        for shard in np.unique(shards):
            chosen = shards == shard
            data = store.shard(int(shard))
            if starts[chosen].max() >= len(data):
                raise StoreError(f"{store.root}/features-{int(shard):05d}.npy: holds {len(data)} rows, index needs more")
            x[chosen] = data[starts[chosen].ravel()].reshape(int(chosen.sum()), self.num_segments, -1)
        if self.train and (self.noise or self.drop):
            x *= 1 + self.noise * self._rng.standard_normal(x.shape, dtype=np.float32)
            if self.drop:
                x *= (self._rng.random(x.shape, dtype=np.float32) >= self.drop) / (1 - self.drop)
        return {"x": torch.from_numpy(x), "mask": torch.ones(len(rows), self.num_segments, dtype=torch.bool),
                "y": torch.tensor([self.class_index[row.label] for row in rows], dtype=torch.int64)}


def already_batched(batch: Batch) -> Batch:
    """The DataLoader's collate_fn: :meth:`FeatureClips.__getitems__` returns whole batches."""
    return batch


class FeatureDataModule(pl.LightningDataModule):
    """Cached features of one dataset, for classification.

    Args:
        features: the feature store folder (output of ``vpipe features``).
        num_segments: steps per clip (TSN segments).
        batch_size: clips per batch, per device.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (worth it when training on a GPU).
        seed: seeds the training jitter.
        feature_noise: training only: multiply features by ``1 + feature_noise * N(0, 1)``.
        feature_dropout: training only: zero this fraction of feature values (rescaling the rest).
    """

    def __init__(self, features: str, num_segments: int = 8, batch_size: int = 32, num_workers: int = 0,
                 pin_memory: bool = False, seed: int = 0, feature_noise: float = 0.0, feature_dropout: float = 0.0):
        super().__init__()
        if not 0 <= feature_dropout < 1:
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        self.feature_noise, self.feature_dropout = feature_noise, feature_dropout
        self.features, self.num_segments, self.batch_size = features, num_segments, batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        store = FeatureStore(features)  # reads index and meta only
        self.cache_key = store.cache_key
        self.classes = sorted({r.label for r in store.split("train")})
        if not self.classes:
            raise ValueError(f"{store.root / 'index.csv'}: no training videos")
        self.input_dim = int(np.prod(store.feature_shape))
        self._splits = {s: [r for r in store.split(s) if r.label in self.classes] for s in ("train", "val", "test")}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _loader(self, split: str) -> DataLoader:
        dataset = FeatureClips(self.features, self._splits[split], self.classes, self.num_segments, split == "train", self.seed,
                               self.feature_noise, self.feature_dropout)
        sampler = None
        if split != "train" and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads by repeating samples; evaluation must count each once.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=split == "train", sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, collate_fn=already_batched,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
