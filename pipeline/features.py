"""The features stage: a Lightning ``predict`` job from a frame store to a feature store.

Feature shards mirror the frame shards row for row (``features-0000k.npy`` row ``i`` is the
features of ``frames-0000k.npy`` row ``i``), so ``index.csv`` carries over unchanged. Batches are
contiguous slices of one shard (no per-frame items); a writer callback puts each batch's output
into its rows of a pre-allocated memory-mapped shard.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from pipeline import backbone
from pipeline.stores import FrameStore, StoreError, finalize


class FrameSlices(Dataset):
    """Item ``i``: ``(shard, start, frames[start:stop])`` for the ``i``-th slice of at most ``batch`` rows."""

    def __init__(self, root: Path, batch: int):
        self.root = root
        store = FrameStore(root)
        self.slices = []
        for shard in sorted({r.shard for r in store.index}):
            rows = len(store.shard(shard))
            expected = max(r.offset + r.length for r in store.index if r.shard == shard)
            if rows < expected:
                raise StoreError(f"{root}/frames-{shard:05d}.npy: holds {rows} frames, index.csv needs {expected}")
            self.slices += [(shard, s, min(s + batch, rows)) for s in range(0, rows, batch)]
        self._store: FrameStore | None = None

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int):
        if self._store is None:
            self._store = FrameStore(self.root)
        shard, start, stop = self.slices[i]
        return shard, start, torch.from_numpy(np.array(self._store.shard(shard)[start:stop]))  # a copy: memmaps are read-only


class Encoder(pl.LightningModule):
    def __init__(self, encoder: backbone.FrameEncoder):
        super().__init__()
        self.encoder = encoder

    def predict_step(self, batch, batch_idx: int):
        shard, start, frames = batch
        return shard, start, self.encoder(frames).half()


class ShardWriter(BasePredictionWriter):
    """Writes each batch's features into its rows of the memory-mapped output shards."""

    def __init__(self, folder: Path):
        super().__init__(write_interval="batch")
        self.folder = folder
        self._open: dict[int, np.ndarray] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        shard, start, feats = prediction
        if shard not in self._open:
            self._open[shard] = np.load(self.folder / f"features-{shard:05d}.npy", mmap_mode="r+")
        self._open[shard][start : start + len(feats)] = feats.cpu().numpy()

    def close(self) -> None:
        for array in self._open.values():
            array.flush()
        self._open.clear()


def compute(
    frames: str,
    out: str,
    *,
    name: str,
    weights: str | None = None,
    pretrained: bool = False,
    pool: str = "avg",
    grid: int = 4,
    input_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    accelerator: str = "auto",
    devices: int | str = 1,
    precision: str = "32-true",
    seed: int = 0,
) -> dict:
    """Compute features of every frame of the store ``frames`` into the feature store ``out``."""
    frames_root, out = Path(frames), Path(out)
    store = FrameStore(frames_root)
    model, identity = backbone.create(name, weights=weights, pretrained=pretrained, seed=seed)
    prep = backbone.preprocessing(model, input_size)
    encoder = backbone.FrameEncoder(model, prep, pool, grid)
    key, key_parts = backbone.cache_key(name, identity, prep, pool, grid, store.meta["content_hash"])
    with torch.inference_mode():
        shape = tuple(encoder(torch.zeros(1, *store.shard(0).shape[1:], dtype=torch.uint8)).shape[1:])

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for shard in sorted({r.shard for r in store.index}):
            np.lib.format.open_memmap(tmp / f"features-{shard:05d}.npy", mode="w+", dtype=np.float16,
                                      shape=(len(store.shard(shard)), *shape)).flush()
        writer = ShardWriter(tmp)
        trainer = pl.Trainer(accelerator=accelerator, devices=devices, precision=precision, logger=False,
                             callbacks=[writer], enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
        loader = DataLoader(FrameSlices(frames_root, batch_size), batch_size=None, num_workers=num_workers,
                            pin_memory=trainer.accelerator.__class__.__name__ == "CUDAAccelerator")
        started = time.perf_counter()
        trainer.predict(Encoder(encoder), loader, return_predictions=False)
        writer.close()
        seconds = time.perf_counter() - started
        n = sum(len(store.shard(s)) for s in {r.shard for r in store.index})
        meta = {"kind": "features", "cache_key": key, **key_parts, "feature_shape": list(shape), "dtype": "float16",
                "frames": str(frames_root)}
        finalize(tmp, out, store.index, store.errors, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"features: {n} frames in {seconds:.1f} s ({n / seconds:.0f} frames/s), shape {shape}, key {key}", file=sys.stderr)
    return json.loads((out / "meta.json").read_text())
