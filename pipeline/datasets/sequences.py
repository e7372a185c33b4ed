"""Forecasting data: windows of consecutive frames (or their cached features) of a frame or feature
store, no labels (:class:`SequenceDataModule`). The grid forecaster's windows are in
:mod:`pipeline.datasets.flows`."""

from __future__ import annotations

from typing import Literal, TypedDict

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import rgb_to_grayscale

from pipeline.datasets.loaders import SplitLoaders, process_generator, read_rows
from pipeline.storage.store import FeatureStore, FrameStore, IndexRow


class SequenceBatch(TypedDict):
    """What the forecasting tasks receive: ``context`` steps followed by ``horizon`` steps."""

    x: (
        torch.Tensor
    )  # (B, T, C, H, W) float32 frames in [0, 1], or (B, T, D) float32 features; T = context + horizon


def window_start(length: int, window: int, rng: np.random.Generator | None) -> int:
    """First frame of a ``window``-frame window of a ``length``-frame video: uniform when training,
    the centred window when evaluating."""
    spare = length - window
    return int(rng.integers(0, spare + 1)) if rng is not None else spare // 2


def pooled(features: np.ndarray, pool: Literal["mean", "flatten"]) -> np.ndarray:
    """``(..., T, C, G, G)`` grid features → ``(..., T, C)`` (grid mean) or ``(..., T, C*G*G)``; ``(..., T, D)`` as is."""
    if features.ndim < 4:
        return features
    lead = features.shape[:-3]
    return (
        features.reshape(*lead, features.shape[-3], -1).mean(-1)
        if pool == "mean"
        else features.reshape(*lead, -1)
    )


class Sequences(Dataset):
    """Windows of ``window`` consecutive rows of one split of a frame or feature store, as
    :class:`SequenceBatch` items (videos shorter than the window are left out by the data module).

    Frames become float32 in [0, 1], channels first, scaled to ``size`` × ``size`` (area averaging) when
    given, grayscale (ITU-R BT.601 luma) when ``grayscale``;
    training windows are augmented with ``augment``: ``True`` draws one of the 16 flips, transposes of
    square frames and time directions (a reversed or mirrored bouncing motion is as plausible as the
    original), ``"mirror"`` only mirrors left and right (scenes with gravity and an arrow of time). Feature
    grids ``(C, G, G)`` are averaged over the grid (``pool="mean"``) or flattened (``"flatten"``),
    then standardised with ``stats`` (per-dimension mean and standard deviation) when given.
    """

    def __init__(
        self,
        store: FrameStore | FeatureStore,
        rows: list[IndexRow],
        window: int,
        train: bool,
        seed: int = 0,
        grayscale: bool = True,
        augment: bool | Literal["mirror"] = False,
        pool: Literal["mean", "flatten"] = "mean",
        stats: tuple[np.ndarray, np.ndarray] | None = None,
        size: int | None = None,
    ):
        # The store's shards are memory-mapped on first use, in each DataLoader worker on its own.
        self.store, self.rows, self.window, self.train, self.seed = store, rows, window, train, seed
        if augment not in (True, False, "mirror"):
            raise ValueError(f"augment must be true, false or 'mirror', got {augment!r}")
        self.grayscale, self.augment, self.pool, self.stats = (
            grayscale,
            augment if train else False,
            pool,
            stats,
        )
        self.size = size
        self._rng: np.random.Generator | None = None  # made on first use, in the process that uses it

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.__getitems__([i])["x"][0]}

    def __getitems__(self, items: list[int]) -> SequenceBatch:
        if self._rng is None:
            self._rng = process_generator(self.seed)
        rows = [self.rows[i] for i in items]
        starts = [window_start(row.length, self.window, self._rng if self.train else None) for row in rows]
        x = read_rows(self.store, rows, np.array(starts)[:, None] + np.arange(self.window))
        # x: (B, T, H, W, 3) uint8 or (B, T, *feature_shape) float16
        if isinstance(self.store, FeatureStore):
            x = pooled(x.astype(np.float32), self.pool)
            if self.stats is not None:
                x = (x - self.stats[0]) / self.stats[1]
            return {"x": torch.from_numpy(x)}
        if self.augment:
            x = np.stack([self._augmented(v) for v in x])
        frames = (
            torch.from_numpy(np.ascontiguousarray(x)).permute(0, 1, 4, 2, 3).float().div_(255)
        )  # (B, T, 3, H, W)
        if self.size and frames.shape[-2:] != (self.size, self.size):
            frames = F.interpolate(frames.flatten(0, 1), size=(self.size, self.size), mode="area").unflatten(
                0, frames.shape[:2]
            )
        if self.grayscale:
            frames = rgb_to_grayscale(frames)
        return {"x": frames}

    def _augmented(self, video: np.ndarray) -> np.ndarray:
        """One of the 16 flips, transposes and time directions of a ``(T, H, W, 3)`` window (of the two
        mirror images for ``augment="mirror"``)."""
        flips = self._rng.random(4) < 0.5
        if self.augment == "mirror":
            return video[:, :, ::-1] if flips[1] else video
        if flips[0]:
            video = video[:, ::-1]
        if flips[1]:
            video = video[:, :, ::-1]
        if flips[2] and video.shape[1] == video.shape[2]:
            video = video.transpose(0, 2, 1, 3)
        if flips[3]:
            video = video[::-1]
        return video


class SequenceDataModule(SplitLoaders, pl.LightningDataModule):
    """Windows of ``context + horizon`` consecutive frames of a frame store, or feature vectors of a
    feature store, for next-step forecasting (no labels; every split's videos long enough are used).

    Give ``frames`` (a frame store, for pixel-space forecasters) or ``features`` (a feature store),
    not both. The forecasting task reads ``context``, ``horizon``, ``input_dim`` (features per step)
    and ``video_format`` (how the frames were extracted, kept with the model so that
    ``vpipe forecast`` decodes a new video the same way) from here.

    Args:
        frames: frame store folder (output of ``vpipe extract``).
        features: feature store folder (output of ``vpipe features``).
        context: steps given to the model.
        horizon: steps it predicts after them.
        grayscale: frames only: one luma channel instead of RGB.
        augment: frames only: random flips, transposes and time reversal of training windows
            (``mirror``: left-right mirroring only).
        size: frames only: scale frames to ``size`` × ``size`` (area averaging) for the model; None keeps
            the store's size. ``vpipe forecast`` decodes new videos and images straight to this size.
        pool: features only: ``mean`` averages a feature grid ``(C, G, G)`` to ``C`` values per step;
            ``flatten`` keeps all ``C*G*G``.
        standardize: features only: subtract each dimension's mean and divide by its standard
            deviation over the training split (up to 65,536 rows spread evenly), so that losses and
            metrics come in units of the features' spread rather than their arbitrary raw scale.
        batch_size: windows per batch, per device.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (worth it when training on a GPU).
        seed: seeds window positions and augmentation.
    """

    def __init__(
        self,
        frames: str | None = None,
        features: str | None = None,
        context: int = 10,
        horizon: int = 10,
        grayscale: bool = True,
        augment: bool | Literal["mirror"] = False,
        pool: Literal["mean", "flatten"] = "mean",
        standardize: bool = True,
        size: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if (frames is None) == (features is None):
            raise ValueError("give either frames (a frame store) or features (a feature store)")
        if context < 1 or horizon < 1:
            raise ValueError(f"context and horizon must be at least 1, got {context} and {horizon}")
        self.inputs = {"frames": str(frames)} if frames else {"features": str(features)}
        self.context, self.horizon, self.grayscale, self.augment, self.pool = (
            context,
            horizon,
            grayscale,
            augment,
            pool,
        )
        self.size = size
        self.batch_size, self.num_workers, self.pin_memory, self.seed = (
            batch_size,
            num_workers,
            pin_memory,
            seed,
        )
        self.store = store = (
            FrameStore(frames) if frames else FeatureStore(features)
        )  # index and meta; shards on first use
        self.cache_key = getattr(store, "cache_key", "") if features else ""
        window = context + horizon
        self._splits = {
            s: [r for r in store.split(s) if r.length >= window] for s in ("train", "val", "test")
        }
        for split, rows in self._splits.items():
            if not rows:
                raise ValueError(
                    f"{store.root / 'index.csv'}: no {split} video has the {window} frames "
                    f"(context {context} + horizon {horizon}) a window needs"
                )
        first = self._splits["train"][0]
        if frames:
            params = store.meta.get("params", {})
            size = [self.size, self.size] if self.size else params.get("size") or [first.width, first.height]
            self.input_dim = 1 if grayscale else 3  # channels per frame
            self.video_format = {
                "fps": float(params.get("fps", first.fps)),
                "rate": float(first.fps),
                "width": int(size[0]),
                "height": int(size[1]),
                "grayscale": bool(grayscale),
                **{k: params[k] for k in ("codec", "quality") if k in params},  # JPEG-stored frames
            }
        else:
            shape = store.feature_shape
            self.input_dim = int(shape[0]) if pool == "mean" else int(np.prod(shape))
            self.video_format = {}
            self.stats = self._statistics(store) if standardize else None

    def _statistics(self, store: FeatureStore, limit: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and standard deviation of the training rows (constant dimensions get 1)."""
        rows = np.concatenate(
            [np.arange(r.offset, r.offset + r.length) + (r.shard << 40) for r in self._splits["train"]]
        )
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, min(limit, len(rows))).astype(np.int64))]
        parts = [store.shard(int(k))[rows[rows >> 40 == k] & ((1 << 40) - 1)] for k in np.unique(rows >> 40)]
        x = pooled(np.concatenate(parts).astype(np.float32), self.pool)
        std = x.std(0)
        return x.mean(0), np.where(std > 1e-6, std, 1.0).astype(np.float32)

    @property
    def window(self) -> int:
        return self.context + self.horizon

    def _dataset(self, split: str) -> Sequences:
        return Sequences(
            self.store,
            self._splits[split],
            self.window,
            split == "train",
            self.seed,
            self.grayscale,
            self.augment,
            self.pool,
            getattr(self, "stats", None),
            self.size,
        )

    def examples(self, count: int) -> SequenceBatch:
        """``count`` test windows spread evenly over the test videos (so over their classes), the same
        every time (for pictures of rollouts)."""
        dataset = self._dataset("test")
        return dataset.__getitems__(sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count).round()}))
