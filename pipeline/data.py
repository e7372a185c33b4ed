"""Datasets over the frame and feature stores, TSN-style clip sampling, and the LightningDataModules.

A training item is ``num_segments`` steps of one video: the video's frames are cut into that many
equal segments and one frame is drawn from each (at random when training, the centre when
evaluating). Grid features ``(C, G, G)`` are flattened to ``C*G*G`` per step. Frames stay uint8
``(H, W, 3)`` per step: the end-to-end model normalises them on its own device.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.stores import FeatureStore, FrameStore, IndexRow, StoreError


class Batch(TypedDict):
    """What every temporal task receives."""

    x: torch.Tensor  # (B, T, D) float32 features, or (B, T, H, W, 3) uint8 frames (end-to-end)
    mask: torch.Tensor  # (B, T) bool, True at real steps
    y: torch.Tensor  # (B,) int64 class index


class PredictBatch(Batch):
    """What ``predict_step`` receives: a :class:`Batch` that also names its videos."""

    video_id: list[str]  # (B,) the store's video ids


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


def process_generator(seed: int) -> np.random.Generator:
    """A generator for this process: torch gives each DataLoader worker its own seed
    (``seed_everything(workers=True)``), so workers draw different numbers, reproducibly."""
    return np.random.default_rng([seed, torch.initial_seed() % 2**32])


def read_rows(store: FeatureStore | FrameStore, rows: list[IndexRow], steps: np.ndarray) -> np.ndarray:
    """Rows ``steps`` ``(B, T)`` (counted from each video's first row) of the videos ``rows``, in the
    store's dtype, ``(B, T, *row_shape)``: one fancy-index read per shard."""
    starts = np.array([row.offset for row in rows])[:, None] + steps
    shards = np.array([row.shard for row in rows])
    x: np.ndarray | None = None
    for shard in np.unique(shards):
        chosen = shards == shard
        data = store.shard(int(shard))
        if starts[chosen].max() >= len(data):
            raise StoreError(f"{store.root}/{store.prefix}-{int(shard):05d}.npy: holds {len(data)} rows, index needs more")
        if x is None:
            x = np.empty((len(rows), steps.shape[1], *data.shape[1:]), data.dtype)
        x[chosen] = data[starts[chosen].ravel()].reshape(int(chosen.sum()), steps.shape[1], *data.shape[1:])
    return x


class FeatureClips(Dataset):
    """Clips of one split of a feature store, as :class:`Batch` items: float32 ``(T, D)`` each."""

    def __init__(self, store: FeatureStore | FrameStore, rows: list[IndexRow], classes: list[str], num_segments: int,
                 train: bool, seed: int = 0, noise: float = 0.0, drop: float = 0.0):
        # The store's shards are memory-mapped on first use, in each DataLoader worker on its own.
        self.store, self.rows, self.num_segments, self.train, self.seed = store, rows, num_segments, train, seed
        self.noise, self.drop = noise, drop  # feature-level augmentation, training only
        self.class_index = {c: i for i, c in enumerate(classes)}
        self._rng: np.random.Generator | None = None  # made on first use, in the process that uses it

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {"x": batch["x"][0], "mask": batch["mask"][0], "y": int(batch["y"][0])}

    def __getitems__(self, items: list[int]) -> Batch:
        """A whole batch in one read per shard instead of one per clip (DataLoader calls this)."""
        if self._rng is None:
            self._rng = process_generator(self.seed)
        rows = [self.rows[i] for i in items]
        lengths = np.array([row.length for row in rows])
        steps = segment_indices(lengths, self.num_segments, self._rng if self.train else None)
        return {"x": self._clips(rows, steps), "mask": torch.ones(len(rows), self.num_segments, dtype=torch.bool),
                "y": torch.tensor([self.class_index[row.label] for row in rows], dtype=torch.int64)}

    def _clips(self, rows: list[IndexRow], steps: np.ndarray) -> torch.Tensor:
        """``(B, T, D)`` float32 features of the sampled steps."""
        x = torch.from_numpy(read_rows(self.store, rows, steps)).flatten(2).float()  # torch converts float16 ~10x faster
        if self.train and (self.noise or self.drop):
            x *= torch.from_numpy(1 + self.noise * self._rng.standard_normal(x.shape, dtype=np.float32))
            if self.drop:
                x *= torch.from_numpy((self._rng.random(x.shape, dtype=np.float32) >= self.drop) / np.float32(1 - self.drop))
        return x


def rgb_difference(current: np.ndarray, following: np.ndarray) -> np.ndarray:
    """TSN's RGB-difference modality, kept in uint8: ``(following - current) / 2 + 128``.

    What moved between two consecutive frames, with the static background cancelled; grey (128)
    where nothing changed.
    """
    return ((following.astype(np.int16) - current) // 2 + 128).astype(np.uint8)


def following_steps(steps: np.ndarray, lengths: int | np.ndarray) -> np.ndarray:
    """The frame after each of ``steps`` (``(..., T)`` of videos of ``lengths`` frames) that the
    RGB difference pairs it with; a video's last frame pairs with itself."""
    return np.minimum(steps + 1, np.asarray(lengths)[..., None] - 1)


def clip_frames(frames: np.ndarray, num_segments: int, modality: Literal["rgb", "rgb_diff"] = "rgb") -> np.ndarray:
    """The evaluation clip of one video's uint8 frames ``(N, H, W, 3)``: the segment centres,
    ``(num_segments, H, W, 3)``, in the given modality (the rule :class:`FrameClips` applies)."""
    steps = segment_indices(len(frames), num_segments, None)
    if modality == "rgb_diff":
        return rgb_difference(frames[steps], frames[following_steps(steps, len(frames))])
    return frames[steps]


def check_modality(modality: str) -> None:
    if modality not in ("rgb", "rgb_diff"):
        raise ValueError(f"modality must be 'rgb' or 'rgb_diff', got {modality!r}")


class FrameClips(FeatureClips):
    """Clips of one split of a frame store: uint8 ``(T, H, W, 3)`` per item, for end-to-end training.

    ``modality="rgb_diff"`` gives, for each sampled frame, its difference to the next one
    (:func:`rgb_difference`; a video's last frame pairs with itself).
    """

    def __init__(self, *args, modality: Literal["rgb", "rgb_diff"] = "rgb", **kwargs):
        super().__init__(*args, **kwargs)
        check_modality(modality)
        self.modality = modality

    def _clips(self, rows: list[IndexRow], steps: np.ndarray) -> torch.Tensor:
        if self.modality == "rgb":
            return torch.from_numpy(read_rows(self.store, rows, steps))
        following = following_steps(steps, [row.length for row in rows])
        both = read_rows(self.store, rows, np.concatenate([steps, following], 1))  # one read for both
        return torch.from_numpy(rgb_difference(both[:, : self.num_segments], both[:, self.num_segments :]))


class NamedClips(Dataset):
    """The evaluation clips of ``clips`` as :class:`PredictBatch` items: each batch also carries the
    ``video_id`` of its clips, so predictions name their videos whatever rank or order computed them."""

    def __init__(self, clips: FeatureClips):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return {**self.clips[i], "video_id": self.clips.rows[i].video_id}

    def __getitems__(self, items: list[int]) -> PredictBatch:
        return {**self.clips.__getitems__(items), "video_id": [self.clips.rows[i].video_id for i in items]}


def already_batched(batch: Batch) -> Batch:
    """The DataLoader's collate_fn: the datasets' ``__getitems__`` return whole batches."""
    return batch


def batch_loader(dataset: Dataset, train: bool, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over a dataset whose ``__getitems__`` builds whole batches: shuffled for training;
    for evaluation under DDP, each sample on exactly one rank."""
    sampler = None
    if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning's default DistributedSampler pads by repeating samples; evaluation must count each once.
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, collate_fn=already_batched)


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

    store_type: type[FeatureStore] | type[FrameStore] = FeatureStore

    def __init__(self, features: str, num_segments: int = 8, batch_size: int = 32, num_workers: int = 0,
                 pin_memory: bool = False, seed: int = 0, feature_noise: float = 0.0, feature_dropout: float = 0.0):
        super().__init__()
        if not 0 <= feature_dropout < 1:
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        self.feature_noise, self.feature_dropout = feature_noise, feature_dropout
        self.features, self.num_segments, self.batch_size = features, num_segments, batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.store = store = self.store_type(features)  # reads index and meta; shards are mapped on first use
        self.classes = sorted({r.label for r in store.split("train")})
        if not self.classes:
            raise ValueError(f"{store.root / 'index.csv'}: no training videos")
        self.cache_key, self.input_dim = self._describe(store)
        self._splits = {s: [r for r in store.split(s) if r.label in self.classes] for s in ("train", "val", "test")}

    def _describe(self, store: FeatureStore) -> tuple[str, int]:
        """The store's cache key and the features per step."""
        return store.cache_key, int(np.prod(store.feature_shape))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def store_meta(self) -> dict:
        return self.store.meta

    def _dataset(self, split: str) -> FeatureClips:
        return FeatureClips(self.store, self._splits[split], self.classes, self.num_segments, split == "train", self.seed,
                            self.feature_noise, self.feature_dropout)

    def _loader(self, split: str) -> DataLoader:
        return batch_loader(self._dataset(split), split == "train", self.batch_size, self.num_workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # The split `vpipe predict --predict_split` reads: train, val, test or all (the three, in that order).
    predict_split: Literal["train", "val", "test", "all"] = "test"

    def predict_dataloader(self) -> DataLoader:
        """Evaluation clips (segment centres, no augmentation) of ``predict_split``, with their video ids."""
        split = self.predict_split
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"predict_split must be train, val, test or all, got {split!r}")
        rows = [r for s in ("train", "val", "test") if split in (s, "all") for r in self._splits[s]]
        clips = self._dataset("test")  # evaluation clips (train=False), then the rows of the chosen split
        clips.rows = rows
        return batch_loader(NamedClips(clips), False, self.batch_size, self.num_workers, self.pin_memory)


class FrameDataModule(FeatureDataModule):
    """Frames of one dataset, for end-to-end classification: the Classifier's own trainable
    backbone (``backbone: NAME``) encodes them, trained jointly with the temporal head (LRCN).

    Args:
        frames: the frame store folder (output of ``vpipe extract`` with a fixed ``--size``).
        num_segments: steps per clip (TSN segments).
        batch_size: clips per batch, per device.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (worth it when training on a GPU).
        seed: seeds the training jitter.
        modality: ``rgb`` (the frames) or ``rgb_diff`` (TSN's RGB difference: each sampled frame's
            change to the next, the static background cancelled; see :func:`rgb_difference`).
    """

    store_type = FrameStore

    def __init__(self, frames: str, num_segments: int = 8, batch_size: int = 16, num_workers: int = 0,
                 pin_memory: bool = False, seed: int = 0, modality: Literal["rgb", "rgb_diff"] = "rgb"):
        check_modality(modality)  # before the store is read: a config error first
        self.modality = modality
        super().__init__(frames, num_segments, batch_size, num_workers, pin_memory, seed)

    def _dataset(self, split: str) -> FrameClips:
        return FrameClips(self.store, self._splits[split], self.classes, self.num_segments, split == "train", self.seed,
                          modality=self.modality)

    def _describe(self, store: FrameStore) -> tuple[str, int]:
        sizes = {(r.width, r.height) for r in store.index}
        if len(sizes) > 1:
            raise ValueError(f"{store.root}: frames of {len(sizes)} different sizes; extract with a fixed --size "
                             "for end-to-end training")
        # input_dim 0: the model's backbone decides the features per step.
        return store.meta.get("content_hash", ""), 0


# Forecasting: windows of consecutive frames (or their cached features), no labels.


class SequenceBatch(TypedDict):
    """What the forecasting tasks receive: ``context`` steps followed by ``horizon`` steps."""

    x: torch.Tensor  # (B, T, C, H, W) float32 frames in [0, 1], or (B, T, D) float32 features; T = context + horizon


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
    return features.reshape(*lead, features.shape[-3], -1).mean(-1) if pool == "mean" else features.reshape(*lead, -1)


def luma(frames: torch.Tensor) -> torch.Tensor:
    """RGB ``(..., 3, H, W)`` → grayscale ``(..., 1, H, W)``, ITU-R BT.601 weights."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=frames.dtype, device=frames.device).view(3, 1, 1)
    return (frames * weights).sum(-3, keepdim=True)


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

    def __init__(self, store: FrameStore | FeatureStore, rows: list[IndexRow], window: int, train: bool,
                 seed: int = 0, grayscale: bool = True, augment: bool | Literal["mirror"] = False,
                 pool: Literal["mean", "flatten"] = "mean",
                 stats: tuple[np.ndarray, np.ndarray] | None = None, size: int | None = None):
        # The store's shards are memory-mapped on first use, in each DataLoader worker on its own.
        self.store, self.rows, self.window, self.train, self.seed = store, rows, window, train, seed
        if augment not in (True, False, "mirror"):
            raise ValueError(f"augment must be true, false or 'mirror', got {augment!r}")
        self.grayscale, self.augment, self.pool, self.stats = grayscale, augment if train else False, pool, stats
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
        frames = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 1, 4, 2, 3).float().div_(255)  # (B, T, 3, H, W)
        if self.size and frames.shape[-2:] != (self.size, self.size):
            frames = F.interpolate(frames.flatten(0, 1), size=(self.size, self.size), mode="area").unflatten(0, frames.shape[:2])
        if self.grayscale:
            frames = luma(frames)
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


class SequenceDataModule(pl.LightningDataModule):
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

    def __init__(self, frames: str | None = None, features: str | None = None, context: int = 10, horizon: int = 10,
                 grayscale: bool = True, augment: bool | Literal["mirror"] = False, pool: Literal["mean", "flatten"] = "mean",
                 standardize: bool = True, size: int | None = None, batch_size: int = 16, num_workers: int = 0, pin_memory: bool = False, seed: int = 0):
        super().__init__()
        if (frames is None) == (features is None):
            raise ValueError("give either frames (a frame store) or features (a feature store)")
        if context < 1 or horizon < 1:
            raise ValueError(f"context and horizon must be at least 1, got {context} and {horizon}")
        self.frames, self.features = frames, features
        self.context, self.horizon, self.grayscale, self.augment, self.pool = context, horizon, grayscale, augment, pool
        self.size = size
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.store = store = FrameStore(frames) if frames else FeatureStore(features)  # index and meta; shards on first use
        self.cache_key = getattr(store, "cache_key", "") if features else ""
        window = context + horizon
        self._splits = {s: [r for r in store.split(s) if r.length >= window] for s in ("train", "val", "test")}
        for split, rows in self._splits.items():
            if not rows:
                raise ValueError(f"{store.root / 'index.csv'}: no {split} video has the {window} frames "
                                 f"(context {context} + horizon {horizon}) a window needs")
        first = self._splits["train"][0]
        if frames:
            params = store.meta.get("params", {})
            size = [self.size, self.size] if self.size else params.get("size") or [first.width, first.height]
            self.input_dim = 1 if grayscale else 3  # channels per frame
            self.video_format = {"fps": float(params.get("fps", first.fps)), "rate": float(first.fps), "width": int(size[0]),
                                 "height": int(size[1]), "grayscale": bool(grayscale)}
        else:
            shape = store.feature_shape
            self.input_dim = int(shape[0]) if pool == "mean" else int(np.prod(shape))
            self.video_format = {}
            self.stats = self._statistics(store) if standardize else None

    def _statistics(self, store: FeatureStore, limit: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and standard deviation of the training rows (constant dimensions get 1)."""
        rows = np.concatenate([np.arange(r.offset, r.offset + r.length) + (r.shard << 40) for r in self._splits["train"]])
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, min(limit, len(rows))).astype(np.int64))]
        parts = [store.shard(int(k))[rows[rows >> 40 == k] & ((1 << 40) - 1)] for k in np.unique(rows >> 40)]
        x = pooled(np.concatenate(parts).astype(np.float32), self.pool)
        std = x.std(0)
        return x.mean(0), np.where(std > 1e-6, std, 1.0).astype(np.float32)

    @property
    def window(self) -> int:
        return self.context + self.horizon

    def _dataset(self, split: str) -> Sequences:
        return Sequences(self.store, self._splits[split], self.window, split == "train", self.seed,
                         self.grayscale, self.augment, self.pool, getattr(self, "stats", None), self.size)

    def _loader(self, split: str) -> DataLoader:
        return batch_loader(self._dataset(split), split == "train", self.batch_size, self.num_workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def examples(self, count: int) -> SequenceBatch:
        """``count`` test windows spread evenly over the test videos (so over their classes), the same
        every time (for pictures of rollouts)."""
        dataset = self._dataset("test")
        return dataset.__getitems__(sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count).round()}))
