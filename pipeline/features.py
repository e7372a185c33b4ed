"""The features stage: a Lightning ``predict`` job from a frame store to a feature store.

Feature shards mirror the frame shards row for row (``features-0000k.npy`` row ``i`` holds the
features of ``frames-0000k.npy`` row ``i``), so ``index.csv`` carries over unchanged. Batches are
contiguous slices of one shard (:class:`pipeline.frame_slices.FrameSlices`, no per-frame items); only
uint8 crosses to the device, where frames are resized and normalised.

Under DDP (``--devices N``, ``--num-nodes M``, torchrun or SLURM) the predict sampler gives every
slice to exactly one rank; each rank streams its features into a part file through
:class:`PartWriter`, and global rank 0 assembles the parts into the store, checking that every frame
was computed exactly once. One process is the same code path with one part.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader

from pipeline import backbone
from pipeline.atomic import clean_stale
from pipeline.data import check_modality
from pipeline.frame_slices import FrameSlices
from pipeline.store_writer import NpyAppender, finalize
from pipeline.stores import FeatureStore, FrameStore


class FeatureCacheError(RuntimeError):
    pass


class Encoder(pl.LightningModule):
    def __init__(self, encoder: backbone.FrameEncoder):
        super().__init__()
        self.encoder = encoder.to(memory_format=torch.channels_last)

    def predict_step(self, batch, batch_idx: int):
        shard, start, frames = batch
        return int(shard), int(start), self.encoder(frames).half()


class FramesPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar (batches, ETA) with frames/s beside it: a batch is a slice of frames."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.frames = getattr(self, "frames", 0) + len(batch[2])
        elapsed = self.predict_progress_bar.format_dict.get("elapsed") or 0
        if elapsed:
            self.predict_progress_bar.set_postfix(
                frames_s=f"{self.frames * trainer.world_size / elapsed:.0f}"
            )


class PartWriter(BasePredictionWriter):
    """Streams one rank's features into ``part-RANK.npy``; ``part-RANK.json`` says where each batch belongs."""

    def __init__(self, folder: Path):
        super().__init__(write_interval="batch")
        self.folder = folder
        self.part: NpyAppender | None = None
        self.batches: list[tuple[int, int, int]] = []  # (shard, start row, rows)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        shard, start, feats = prediction
        array = (
            feats.float().cpu().numpy().astype(np.float16)
            if feats.dtype == torch.bfloat16
            else feats.cpu().numpy()
        )
        if self.part is None:
            self.part = NpyAppender(
                self.folder / f"part-{trainer.global_rank:05d}.npy", np.float16, array.shape[1:]
            )
        self.part.append(array)
        self.batches.append((shard, start, len(array)))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.part is not None:
            self.part.close()
        (self.folder / f"part-{trainer.global_rank:05d}.json").write_text(json.dumps(self.batches))


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
    for meta in sorted(folder.glob("part-*.json")):
        batches = json.loads(meta.read_text())
        part = np.load(meta.with_suffix(".npy"), mmap_mode="r") if batches else None
        row = 0
        for shard, start, rows in batches:
            outputs[shard][start : start + rows] = part[row : row + rows]
            covered[shard][start : start + rows] += 1
            row += rows
        del part
        meta.unlink()
        meta.with_suffix(".npy").unlink(missing_ok=True)
    for k, counts in covered.items():
        if (counts != 1).any():
            raise FeatureCacheError(
                f"shard {k}: {int((counts == 0).sum())} frames computed by no rank, "
                f"{int((counts > 1).sum())} by several"
            )
        outputs[k].flush()


def default_precision(accelerator: str) -> str:
    """bf16 autocast on CUDA GPUs that support it, full precision elsewhere."""
    if (
        accelerator in ("gpu", "cuda", "auto")
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    ):
        return "bf16-mixed"
    return "32-true"


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
    card = backbone.read_card(weights) if weights and Path(weights).is_file() else None
    if card:
        for option, given, trained in (
            ("--backbone", name, card.get("backbone")),
            ("--input-size", input_size, card.get("input_size")),
            ("--modality", modality, card.get("modality")),
        ):
            if given is not None and trained is not None and given != trained:
                raise FeatureCacheError(
                    f"{weights}: trained as {option} {trained} ({backbone.card_path(weights)}), "
                    f"this run asks for {given}"
                )
        name = name or card.get("backbone")
        input_size = input_size or card.get("input_size")
        modality = modality or card.get("modality")
    if not name:
        raise FeatureCacheError(
            "which backbone? give --backbone NAME, or --weights FILE with its card (backbone.json) beside it"
        )
    modality = modality or "rgb"
    check_modality(modality)
    model, identity = backbone.create(name, weights=weights, pretrained=pretrained, seed=seed)
    prep = backbone.preprocessing(model, input_size)
    trainer_precision = precision or default_precision(accelerator)
    key, key_parts = backbone.cache_key(
        name,
        identity,
        prep,
        pool,
        grid,
        store.meta["content_hash"],
        modality=modality,
        precision=trainer_precision,
    )
    if (out / "meta.json").is_file():
        previous = FeatureStore(out).meta.get("cache_key")
        if previous == key and not overwrite:
            print(f"features: {out} is up to date (key {key})", file=sys.stderr)
            return FeatureStore(out).meta
        if previous != key and not overwrite:
            raise FeatureCacheError(
                f"{out / 'meta.json'}: holds features with cache key {previous}, this run's key is {key} "
                f"({name}, {identity}, pool={pool}); pass --overwrite to replace them"
            )
    encoder = backbone.FrameEncoder(model, prep, pool, grid)
    with torch.inference_mode():
        shape = tuple(encoder(torch.zeros(1, *store.shard(0).shape[1:], dtype=torch.uint8)).shape[1:])

    tmp = out.parent / f".{out.name}.partial"
    writer = PartWriter(tmp)
    tty = sys.stderr.isatty()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=trainer_precision,
        logger=False,
        callbacks=[writer, *([FramesPerSecondBar()] if tty else [])],
        enable_progress_bar=tty,
        enable_model_summary=False,
    )
    on_gpu = trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
    if trainer.global_rank == 0:  # the other ranks start writing only after joining rank 0 in predict()
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    workers = num_workers if num_workers is not None else (min(4, os.cpu_count() or 1) if on_gpu else 0)
    loader = DataLoader(
        FrameSlices(store, batch_size, modality),
        batch_size=None,
        num_workers=workers,
        pin_memory=on_gpu,
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
        meta = {
            "kind": "features",
            "cache_key": key,
            **key_parts,
            "feature_shape": list(shape),
            "dtype": "float16",
            "frames": str(frames_root),
            "world_size": trainer.world_size,
            **({"weights_path": str(weights), "backbone_card": card} if weights else {}),
        }
        finalize(tmp, out, store.index, store.errors, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(len(store.shard(s)) for s in {r.shard for r in store.index})
    print(
        f"features: {n} frames in {seconds:.1f} s ({n / seconds:.0f} frames/s) on {trainer.world_size} process(es), "
        f"shape {shape}, key {key}",
        file=sys.stderr,
    )
    return FeatureStore(out).meta
