"""The features stage: a Lightning ``predict`` job from a frame store to a feature store.

Feature shards mirror the frame shards row for row (``features-0000k.npy`` row ``i`` holds the
features of ``frames-0000k.npy`` row ``i``), so ``index.csv`` carries over unchanged. Batches are
contiguous slices of one shard (:class:`pipeline.datasets.frame_slices.FrameSlices`, no per-frame items); only
uint8 crosses to the device, where frames are resized and normalised.

Under DDP (``--devices N``, ``--num-nodes M``, torchrun or SLURM) the predict sampler gives every
slice to exactly one rank; each rank streams its features into a part file through
:class:`PartWriter`, and global rank 0 assembles the parts into the store, checking that every frame
was computed exactly once. One process is the same code path with one part.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.datasets.frame_slices import FrameSlices
from pipeline.stages.encoding import (
    Encoder,
    FeatureCacheError,
    PartWriter,
    default_precision,
    on_gpu,
    part_files,
    predict_trainer,
    report,
    resolve_backbone,
    store_meta,
    up_to_date,
)
from pipeline.storage.store import FeatureStore, FrameStore
from pipeline.storage.writer import finalize

__all__ = ["FeatureCacheError", "assemble", "compute"]


def assemble(folder: Path, store: FrameStore, shape: tuple[int, ...]) -> None:
    """Rank 0: write ``features-0000k.npy`` from every rank's part; every frame exactly once."""
    shards = {k: len(store.shard(k)) for k in sorted({r.shard for r in store.index})}
    outputs = {
        k: np.lib.format.open_memmap(
            folder / f"features-{k:05d}.npy", mode="w+", dtype=np.float16, shape=(n, *shape)
        )
        for k, n in shards.items()
    }
    covered = {k: np.zeros(n, np.int32) for k, n in shards.items()}
    for batches, part in part_files(folder):
        row = 0
        for shard, start, rows in batches:
            outputs[shard][start : start + rows] = part[row : row + rows]
            covered[shard][start : start + rows] += 1
            row += rows
    for k, counts in covered.items():
        if (counts != 1).any():
            raise FeatureCacheError(
                f"shard {k}: {int((counts == 0).sum())} frames computed by no rank, "
                f"{int((counts > 1).sum())} by several"
            )
        outputs[k].flush()


def compute(
    frames: str,
    out: str,
    *,
    name: str | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    pool: str = "avg",
    grid: int = 4,
    input_size: int | None = None,
    modality: Literal["rgb", "rgb_diff"] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict | None:
    """Compute features of every frame of the store ``frames`` into the feature store ``out``.

    Weights from the backbone stage come with a card beside them (``backbone.json``): its input size
    and modality are the defaults here, and a name, size or modality that contradicts it is refused.
    Without a card the defaults are the model's own input size and ``rgb``.

    Returns the store's meta on global rank 0 (None on other ranks).

    Raises:
        FeatureCacheError: ``out`` holds features with another cache key and ``overwrite`` is False.
        StoreError: the frame store is missing, damaged or shorter than its index says.
        backbone.BackboneError: unknown backbone, unreadable weights, unreachable hub.
    """
    frames_root, out = Path(frames), Path(out)
    store = FrameStore(frames_root)
    net = resolve_backbone(name, weights, pretrained, input_size, modality, seed)
    trainer_precision = precision or default_precision(accelerator)
    key, key_parts = net.key(pool, grid, store.meta["content_hash"], trainer_precision)
    done = up_to_date(out, key, f"{net.name}, {net.identity}, pool={pool}", overwrite)
    if done is not None:
        return done
    encoder = net.encoder(pool, grid)
    with torch.inference_mode():
        shape = tuple(encoder(torch.zeros(1, *store.shard(0).shape[1:], dtype=torch.uint8)).shape[1:])

    tmp = out.parent / f".{out.name}.partial"
    trainer = predict_trainer(
        out, PartWriter(tmp), accelerator, devices, num_nodes, strategy, trainer_precision
    )
    gpu = on_gpu(trainer)
    workers = num_workers if num_workers is not None else (min(4, os.cpu_count() or 1) if gpu else 0)
    loader = DataLoader(
        FrameSlices(store, batch_size, net.modality),
        batch_size=None,
        num_workers=workers,
        pin_memory=gpu,
        persistent_workers=False,
    )
    started = time.perf_counter()
    trainer.predict(Encoder(encoder), loader, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    try:
        assemble(tmp, store, shape)
        seconds = time.perf_counter() - started
        meta = store_meta(net, key, key_parts, shape, trainer.world_size, frames=str(frames_root))
        finalize(tmp, out, store.index, store.errors, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(len(store.shard(s)) for s in {r.shard for r in store.index})
    report(n, seconds, trainer.world_size, shape, key)
    return FeatureStore(out).meta
