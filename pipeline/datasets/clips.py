"""Classification data: clips of the frame and feature stores with TSN-style sampling, and their
LightningDataModules (forecasting windows are in :mod:`pipeline.datasets.sequences`).

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
from torch.utils.data import DataLoader, Dataset

from pipeline.datasets.loaders import SplitLoaders, batch_loader, process_generator, read_rows
from pipeline.storage.store import FeatureStore, FrameStore, IndexRow


class Batch(TypedDict):
    """What every temporal task receives."""

    x: torch.Tensor  # (B, T, D) float32 features, or (B, T, H, W, 3) uint8 frames (end-to-end)
    y: torch.Tensor  # (B,) int64 class index


class PredictBatch(Batch):
    """What ``predict_step`` receives: a :class:`Batch` that also names its videos."""

    video_id: list[str]  # (B,) the store's video ids


def segment_indices(
    length: int | np.ndarray, num_segments: int, rng: np.random.Generator | None
) -> np.ndarray:
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
    """Clips of one split of a feature store, as :class:`Batch` items: float32 ``(T, D)`` each."""

    def __init__(
        self,
        store: FeatureStore | FrameStore,
        rows: list[IndexRow],
        classes: list[str],
        num_segments: int,
        train: bool,
        seed: int = 0,
        noise: float = 0.0,
        drop: float = 0.0,
    ):
        # The store's shards are memory-mapped on first use, in each DataLoader worker on its own.
        self.store, self.rows, self.num_segments, self.train, self.seed = (
            store,
            rows,
            num_segments,
            train,
            seed,
        )
        self.noise, self.drop = noise, drop  # feature-level augmentation, training only
        self.class_index = {c: i for i, c in enumerate(classes)}
        self._rng: np.random.Generator | None = None  # made on first use, in the process that uses it

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {"x": batch["x"][0], "y": int(batch["y"][0])}

    def __getitems__(self, items: list[int]) -> Batch:
        """A whole batch in one read per shard instead of one per clip (DataLoader calls this)."""
        if self._rng is None:
            self._rng = process_generator(self.seed)
        rows = [self.rows[i] for i in items]
        lengths = np.array([row.length for row in rows])
        steps = segment_indices(lengths, self.num_segments, self._rng if self.train else None)
        return {
            "x": self._clips(rows, steps),
            "y": torch.tensor([self.class_index[row.label] for row in rows], dtype=torch.int64),
        }

    def _clips(self, rows: list[IndexRow], steps: np.ndarray) -> torch.Tensor:
        """``(B, T, D)`` float32 features of the sampled steps."""
        x = (
            torch.from_numpy(read_rows(self.store, rows, steps)).flatten(2).float()
        )  # torch converts float16 ~10x faster
        if self.train and (self.noise or self.drop):
            x *= torch.from_numpy(1 + self.noise * self._rng.standard_normal(x.shape, dtype=np.float32))
            if self.drop:
                x *= torch.from_numpy(
                    (self._rng.random(x.shape, dtype=np.float32) >= self.drop) / np.float32(1 - self.drop)
                )
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


def clip_frames(
    frames: np.ndarray, num_segments: int, modality: Literal["rgb", "rgb_diff"] = "rgb"
) -> np.ndarray:
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


class FeatureDataModule(SplitLoaders, pl.LightningDataModule):
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
    clips_type: type[FeatureClips] = FeatureClips

    def __init__(
        self,
        features: str,
        num_segments: int = 8,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        feature_noise: float = 0.0,
        feature_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0 <= feature_dropout < 1:
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        self.clip_options: dict = {
            "noise": feature_noise,
            "drop": feature_dropout,
        }  # the clips' own arguments
        self.inputs = {self.store_type.prefix: str(features)}  # {"features": path}, or {"frames": path}
        self.num_segments, self.batch_size = num_segments, batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.store = store = self.store_type(features)  # reads index and meta; shards are mapped on first use
        self.classes = sorted({r.label for r in store.split("train")})
        if not self.classes:
            raise ValueError(f"{store.root / 'index.csv'}: no training videos")
        self.cache_key, self.input_dim = self._describe(store)
        self._splits = {
            s: [r for r in store.split(s) if r.label in self.classes] for s in ("train", "val", "test")
        }

    def _describe(self, store: FeatureStore) -> tuple[str, int | None]:
        """The store's cache key and the features per step (None: the model's backbone decides)."""
        return store.cache_key, int(np.prod(store.feature_shape))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def store_meta(self) -> dict:
        return self.store.meta

    def _clips(self, split: str) -> FeatureClips:
        """The clips of ``split``: jittered (and augmented) when it is the training split."""
        train = split == "train"
        args = (self.store, self._splits[split], self.classes, self.num_segments, train, self.seed)
        return self.clips_type(*args, **self.clip_options)

    def _dataset(self, split: str) -> FeatureClips:
        return self._clips(split)

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
    clips_type = FrameClips

    def __init__(
        self,
        frames: str,
        num_segments: int = 8,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        modality: Literal["rgb", "rgb_diff"] = "rgb",
    ):
        check_modality(modality)  # before the store is read: a config error first
        self.modality = modality
        super().__init__(frames, num_segments, batch_size, num_workers, pin_memory, seed)
        self.clip_options = {"modality": modality}

    def _describe(self, store: FrameStore) -> tuple[str, int | None]:
        sizes = {(r.width, r.height) for r in store.index}
        if len(sizes) > 1:
            raise ValueError(
                f"{store.root}: frames of {len(sizes)} different sizes; extract with a fixed --size "
                "for end-to-end training"
            )
        return store.meta.get("content_hash", ""), None  # frames: the model's backbone makes the features
