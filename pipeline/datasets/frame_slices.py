"""The features stage's input: a frame store read as contiguous slices of its shards.

A slice (at most ``batch`` rows of one ``frames-0000k.npy``) is one predict batch: no per-frame items,
and only uint8 leaves the loader, to be resized and normalised on the device. Slices follow the
shards, so features can be written back row for row. With ``modality="rgb_diff"`` each frame comes
as its RGB difference to the next frame of its video.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.datasets.clips import check_modality, rgb_difference
from pipeline.storage.store import FrameStore, StoreError


class FrameSlices(Dataset):
    """Item ``i``: ``(shard, start, frames[start:stop])``, the ``i``-th slice of at most ``batch`` rows.

    ``modality="rgb_diff"`` gives each frame's RGB difference to the next frame of its video
    (:func:`pipeline.datasets.clips.rgb_difference`; a video's last frame pairs with itself), the input that
    end-to-end ``rgb_diff`` models and :func:`pipeline.datasets.clips.clip_frames` use.
    """

    def __init__(self, store: FrameStore, batch: int, modality: Literal["rgb", "rgb_diff"] = "rgb"):
        check_modality(modality)
        self.root, self.modality = store.root, modality
        self.slices = []
        self.following: dict[int, np.ndarray] = {}  # per shard: the row each row is differenced with
        for shard in sorted({r.shard for r in store.index}):
            rows = len(store.shard(shard))
            expected = max(r.offset + r.length for r in store.index if r.shard == shard)
            if rows < expected:
                raise StoreError(
                    f"{store.shard_path(shard)}: holds {rows} frames, index.csv needs {expected}"
                )
            self.slices += [(shard, s, min(s + batch, rows)) for s in range(0, rows, batch)]
            following = np.arange(1, rows + 1)
            for r in store.index:
                if r.shard == shard and r.length:
                    following[r.offset + r.length - 1] = r.offset + r.length - 1
            self.following[shard] = np.minimum(following, rows - 1)
        self._store: FrameStore | None = None  # opened lazily: one memory map per worker process

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int):
        if self._store is None:
            self._store = FrameStore(self.root, keep_decoded=False)  # each frame is read once
        shard, start, stop = self.slices[i]
        if self.modality == "rgb":
            return (
                shard,
                start,
                torch.from_numpy(np.array(self._store.shard(shard)[start:stop])),
            )  # a copy: memmaps are read-only
        following = self.following[shard][start:stop]
        frames = np.asarray(
            self._store.shard(shard)[start : int(following.max()) + 1]
        )  # the slice and one row more
        return (
            shard,
            start,
            torch.from_numpy(rgb_difference(frames[: stop - start], frames[following - start])),
        )
