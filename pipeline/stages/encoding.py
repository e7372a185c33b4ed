"""What both ways of computing features share (:mod:`pipeline.stages.features` from a frame store,
:mod:`pipeline.stages.video_features` straight from videos): the backbone resolved from the options and its
card, the cache-key check, the Lightning ``predict`` job (the module, its progress bar, the writer that
streams each rank's features into a part file) and the store's ``meta.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar

from pipeline.datasets.clips import check_modality
from pipeline.media.errors import UserError
from pipeline.models import backbone
from pipeline.storage.atomic import clean_stale
from pipeline.storage.store import FeatureStore
from pipeline.storage.writer import NpyAppender


class FeatureCacheError(RuntimeError, UserError):
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


def part_files(folder: Path):
    """Rank 0, once every rank has finished: ``(batches, features)`` of each rank's part in rank
    order (``batches``: ``(shard, start, rows)`` in the order written; ``features``: memory-mapped rows,
    None when the rank wrote none), each part's files deleted once the caller has moved on."""
    for meta in sorted(folder.glob("part-*.json")):
        batches = [tuple(b) for b in json.loads(meta.read_text())]
        part = np.load(meta.with_suffix(".npy"), mmap_mode="r") if batches else None
        yield batches, part
        del part
        meta.unlink()
        meta.with_suffix(".npy").unlink(missing_ok=True)


def default_precision(accelerator: str) -> str:
    """bf16 autocast on CUDA GPUs that support it, full precision elsewhere."""
    if (
        accelerator in ("gpu", "cuda", "auto")
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    ):
        return "bf16-mixed"
    return "32-true"


@dataclass
class Backbone:
    """The CNN a features run uses, resolved from the options and the weights' card."""

    name: str
    model: torch.nn.Module
    identity: dict  # weights file hash, pretrained tag or random-init seed
    prep: backbone.Preprocessing
    modality: str
    weights: str | None
    card: dict | None  # backbone.json beside the weights, when there is one

    def encoder(self, pool: str, grid: int) -> backbone.FrameEncoder:
        return backbone.FrameEncoder(self.model, self.prep, pool, grid)

    def key(self, pool: str, grid: int, frames_hash: str, precision: str) -> tuple[str, dict]:
        return backbone.cache_key(
            self.name,
            self.identity,
            self.prep,
            pool,
            grid,
            frames_hash,
            modality=self.modality,
            precision=precision,
        )


def resolve_backbone(
    name: str | None,
    weights: str | None,
    pretrained: bool,
    input_size: int | None,
    modality: str | None,
    seed: int,
) -> Backbone:
    """The backbone of a features run: the card beside ``weights`` (``backbone.json``) gives the name,
    input size and modality unless given, and a name, size or modality that contradicts it is refused.
    Without a card the defaults are the model's own input size and ``rgb``."""
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
    return Backbone(name, model, identity, prep, modality, weights, card)


def up_to_date(out: Path, key: str, what: str, overwrite: bool) -> dict | None:
    """The meta of the store at ``out`` when it holds features with cache key ``key`` (nothing to do).

    Raises:
        FeatureCacheError: ``out`` holds features of another key and ``overwrite`` is False.
    """
    if not (out / "meta.json").is_file():
        return None
    previous = FeatureStore(out).meta.get("cache_key")
    if previous == key and not overwrite:
        print(f"features: {out} is up to date (key {key})", file=sys.stderr)
        return FeatureStore(out).meta
    if previous != key and not overwrite:
        raise FeatureCacheError(
            f"{out / 'meta.json'}: holds features with cache key {previous}, this run's key is {key} "
            f"({what}); pass --overwrite to replace them"
        )
    return None


def predict_trainer(
    out: Path, writer: PartWriter, accelerator: str, devices, num_nodes: int, strategy: str, precision: str
) -> pl.Trainer:
    """The Lightning trainer of a features job, writing through ``writer``; on global rank 0 the part
    folder ``writer.folder`` is made fresh (the other ranks write into it only after joining rank 0)."""
    tty = sys.stderr.isatty()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        logger=False,
        callbacks=[writer, *([FramesPerSecondBar()] if tty else [])],
        enable_progress_bar=tty,
        enable_model_summary=False,
    )
    if trainer.global_rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        shutil.rmtree(writer.folder, ignore_errors=True)
        writer.folder.mkdir()
    return trainer


def on_gpu(trainer: pl.Trainer) -> bool:
    return trainer.accelerator.__class__.__name__ == "CUDAAccelerator"


def store_meta(
    net: Backbone, key: str, key_parts: dict, shape: tuple[int, ...], world_size: int, **source
) -> dict:
    """``meta.json`` of a feature store (less its content hash): the cache key and its parts, the
    feature shape, and where the frames came from (``source``)."""
    return {
        "kind": "features",
        "cache_key": key,
        **key_parts,
        "feature_shape": list(shape),
        "dtype": "float16",
        **source,
        "world_size": world_size,
        **({"weights_path": str(net.weights), "backbone_card": net.card} if net.weights else {}),
    }


def report(frames: int, seconds: float, world_size: int, shape: tuple[int, ...], key: str) -> None:
    print(
        f"features: {frames} frames in {seconds:.1f} s ({frames / seconds:.0f} frames/s) on {world_size} "
        f"process(es), shape {shape}, key {key}",
        file=sys.stderr,
    )
