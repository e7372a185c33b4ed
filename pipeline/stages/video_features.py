"""Features straight from videos: ``vpipe features --manifest``, with no frame store on disk.

The decoding of ``vpipe extract`` (:func:`pipeline.stages.workers.pool_results`: worker processes, a wall-clock
limit per video, a crash or a hang costs only its video) runs in a thread of the predict process, a
few videos ahead of the model: while the backbone works on one batch, the workers decode the next
videos. :class:`DecodedBatches`, an ``IterableDataset`` consumed in the main process, cuts the decoded
frames of consecutive videos into batches of ``batch_size`` frames (a batch may span videos; only
uint8 goes to the device, as in :mod:`pipeline.stages.features`).

Under DDP (``--devices N``, ``--num-nodes M``, torchrun or SLURM) each rank takes a contiguous block of
the manifest (:func:`pipeline.stages.parts.part_of`) and streams its features into a part file
(:class:`pipeline.stages.encoding.PartWriter`) and the list of its videos into ``videos-RANK.json``; global
rank 0 then writes the store, in manifest order, through :class:`pipeline.storage.writer.StoreWriter`
(written under a temporary name, put in place atomically). The result has the contract of a feature
store computed from a frame store: the same ``index.csv`` rows (ids, labels, rates, sizes, durations),
``errors.csv`` (a video that fails lands there with a one-line reason), float16 shards. Its
``frames_hash`` is a hash of what the frames would be (manifest, every input's fingerprint, decoding
parameters, PyAV and FFmpeg versions), and ``meta.json`` keeps the frame-store meta the frames would
have had under ``frames_meta``, so models trained on these features know how to decode new videos.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import closing
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.datasets.clips import rgb_difference
from pipeline.media.images import DEFAULT_IMAGE_FPS
from pipeline.media.manifest import Entry, read_manifest, validate
from pipeline.media.resample import parse_size, uniform_indices
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
from pipeline.stages.parts import part_of
from pipeline.stages.workers import DECODE_TIMEOUT_SEC, Job, ahead, pool_results
from pipeline.storage.sources import inputs_hash, source_row
from pipeline.storage.store import FeatureStore, fingerprint
from pipeline.storage.writer import StoreWriter

INFO_FIELDS = ("src_fps", "fps", "width", "height", "duration_sec")


def _rank() -> tuple[int, int]:
    """(global rank, world size) of this process in the predict job (known once Lightning set it up)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DecodedBatches(IterableDataset):
    """This rank's videos, decoded by worker processes, as ``(rank, start, frames)`` batches: ``frames``
    uint8 ``(B, H, W, 3)`` are rows ``start … start+B-1`` of the rank's videos laid end to end.

    A batch is cut short where the frame size changes (videos kept at their own size). After the
    last batch, ``videos-RANK.json`` in ``folder`` lists each video of the rank in manifest order:
    its number, and its index columns and length, or its error.
    """

    def __init__(
        self,
        entries: list[Entry],
        folder: Path,
        batch: int,
        *,
        modality: Literal["rgb", "rgb_diff"] = "rgb",
        decode: tuple = (0.0, None, 12.0),  # fps, (width, height) or None, image_fps
        max_frames: int | None = None,
        workers: int = 1,
        timeout: float | None = None,
        on_error: Literal["skip", "fail"] = "skip",
    ):
        self.entries, self.folder, self.batch, self.modality = entries, folder, batch, modality
        self.decode, self.max_frames, self.workers, self.timeout = decode, max_frames, workers, timeout
        self.on_error = on_error

    def _videos(self, numbers: list[int], spills: Path, listed: list[dict]):
        """The frames of each video ``numbers`` (manifest rows) that decodes; ``listed`` gets a row
        per video."""
        jobs = [Job(k, self.entries[n], spills / f"{k:08d}.npy") for k, n in enumerate(numbers)]
        workers = max(1, min(self.workers, len(jobs)))
        with closing(ahead(pool_results(jobs, workers, self.decode, self.timeout), workers + 1)) as results:
            for job, info, error in results:
                number = numbers[job.number]
                if error is not None:
                    if self.on_error == "fail":
                        raise FeatureCacheError(error)
                    listed.append({"number": number, "error": error})
                    continue
                frames = np.load(job.spill, mmap_mode="r")  # read batch by batch; the file goes once unmapped
                job.spill.unlink()
                if self.max_frames:
                    frames = frames[uniform_indices(len(frames), self.max_frames)]
                if self.modality == "rgb_diff":  # each frame against the next of its video; the last, itself
                    frames = rgb_difference(
                        frames, frames[np.minimum(np.arange(1, len(frames) + 1), len(frames) - 1)]
                    )
                listed.append({"number": number, "length": len(frames), **info})
                yield frames

    def __iter__(self):
        rank, world = _rank()
        numbers = part_of(list(range(len(self.entries))), world, rank)
        spills = self.folder / f"spill-{rank:05d}"
        spills.mkdir(exist_ok=True)
        listed: list[dict] = []
        pending: list[np.ndarray] = []  # views of decoded videos, not yet batched
        held = start = 0
        try:
            for frames in self._videos(numbers, spills, listed):
                if pending and pending[0].shape[1:] != frames.shape[1:]:
                    yield rank, start, torch.from_numpy(np.concatenate(pending))
                    start, pending, held = start + held, [], 0
                pending.append(frames)
                held += len(frames)
                while held >= self.batch:
                    rows, need = [], self.batch
                    while need:
                        rows.append(pending[0][:need])
                        need -= len(rows[-1])
                        pending[0] = pending[0][len(rows[-1]) :]
                        if not len(pending[0]):
                            pending.pop(0)
                    yield rank, start, torch.from_numpy(np.concatenate(rows))
                    start, held = start + self.batch, held - self.batch
            if held:
                yield rank, start, torch.from_numpy(np.concatenate(pending))
            (self.folder / f"videos-{rank:05d}.json").write_text(json.dumps(listed))
        finally:
            shutil.rmtree(spills, ignore_errors=True)


def assemble_videos(folder: Path, out: Path, entries: list[Entry], meta: dict, shard_bytes: int) -> dict:
    """Rank 0: the store ``out`` from every rank's part and video list, in manifest order; every frame
    exactly once. Returns the meta written (with the feature shape)."""
    parts = list(part_files(folder))
    listed = [json.loads(p.read_text()) for p in sorted(folder.glob("videos-*.json"))]
    if len(listed) != len(parts):
        raise FeatureCacheError(f"{folder}: {len(parts)} ranks wrote features, {len(listed)} a video list")
    shape = None
    with StoreWriter(out, "features", shard_bytes=shard_bytes) as writer:
        for videos, (batches, features) in zip(listed, parts, strict=True):
            rows = sum(v.get("length", 0) for v in videos)
            starts = np.cumsum([0] + [b[2] for b in batches])
            if rows != starts[-1] or any(b[1] != s for b, s in zip(batches, starts, strict=False)):
                raise FeatureCacheError(
                    f"{folder}: a rank computed {starts[-1]} frames in {len(batches)} batches, "
                    f"its videos have {rows}"
                )
            row = 0
            for v in videos:
                e = entries[v["number"]]
                if "error" in v:
                    writer.add_error(e.video_id, str(e.path), v["error"])
                    continue
                info = {k: v[k] for k in INFO_FIELDS}
                writer.add(
                    features[row : row + v["length"]],
                    video_id=e.video_id,
                    label=e.label,
                    split=e.split,
                    **info,
                )
                row += v["length"]
                shape = tuple(features.shape[1:])
            del features
        if not writer.index:
            first = writer.errors[0]["error"] if writer.errors else "the manifest is empty"
            raise FeatureCacheError(f"no video could be decoded; first error: {first}")
        meta = dict(meta, feature_shape=list(shape))
        writer.finish(meta)
    return meta


def decoding(manifest: Path, entries: list[Entry], params: dict) -> dict:
    """The ``meta.json`` a frame store of ``entries`` extracted with ``params`` would hold (less its
    content hash): what the features are computed from, and how to decode new videos like them."""
    from pipeline.media import video

    fingerprints = {e.video_id: fingerprint(e.path) for e in entries}
    sources = [source_row(e, fingerprints) for e in entries]
    return {
        "kind": "frames",
        "codec": "raw",
        "manifest": str(manifest),
        "params": params,
        **video.versions(),
        "inputs_hash": inputs_hash(manifest, sources, params),
    }


def compute_from_videos(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fps: float = 0.0,
    size: str | None = None,
    max_frames: int | None = None,
    image_fps: float = DEFAULT_IMAGE_FPS,
    workers: int | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    timeout: float | None = DECODE_TIMEOUT_SEC,
    root: str | os.PathLike | None = None,
    shard_mb: int = 256,
    name: str | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    pool: str = "avg",
    grid: int = 4,
    input_size: int | None = None,
    modality: Literal["rgb", "rgb_diff"] | None = None,
    batch_size: int = 64,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict | None:
    """Compute features of every frame of every video in ``manifest`` into the feature store ``out``.

    Decoding options (``fps``, ``size``, ``max_frames``, ``image_fps``, ``workers`` per device,
    ``on_error``, ``timeout``, ``root``) mean what they mean to :func:`pipeline.stages.extract.extract`
    (``workers`` by default: the device's share of the cores; on the CPU half of it, the model's
    threads taking the rest); the
    backbone options what they mean to :func:`pipeline.stages.features.compute`. Returns the store's meta on
    global rank 0 (None on other ranks).

    Raises:
        FeatureCacheError: ``out`` holds features with another cache key and ``overwrite`` is False; a
            video failed and ``on_error="fail"``; no video could be decoded.
        ManifestError: the manifest is malformed (dataset-level errors stop the run before any work).
    """
    manifest, out = Path(manifest), Path(out)
    entries = read_manifest(manifest)
    validate(entries, manifest, root=root).raise_or_warn(file_errors_fatal=on_error == "fail")
    wh = parse_size(size)
    params = {"fps": fps, "size": list(wh) if wh else None, "max_frames": max_frames, "image_fps": image_fps}
    frames_meta = decoding(manifest, entries, params)
    frames_hash = hashlib.sha256(
        json.dumps({k: v for k, v in frames_meta.items() if k != "manifest"}, sort_keys=True).encode()
    ).hexdigest()
    net = resolve_backbone(name, weights, pretrained, input_size, modality, seed)
    trainer_precision = precision or default_precision(accelerator)
    key, key_parts = net.key(pool, grid, frames_hash, trainer_precision)
    done = up_to_date(out, key, f"{net.name}, {net.identity}, pool={pool}", overwrite)
    if done is not None:
        return done

    tmp = out.parent / f".{out.name}.partial"
    trainer = predict_trainer(
        out, PartWriter(tmp), accelerator, devices, num_nodes, strategy, trainer_precision
    )
    gpu = on_gpu(trainer)
    cores = max(1, (os.cpu_count() or 1) // max(1, trainer.num_devices))  # this rank's share
    # On a GPU the decoders take every core. On the CPU the model's threads and the decoders share them:
    # oversubscribed, OpenMP threads spin while the decoders run and both crawl (6x slower measured).
    workers = workers or (cores if gpu else max(1, cores // 2))
    batches = DecodedBatches(
        entries,
        tmp,
        batch_size,
        modality=net.modality,
        decode=(fps, wh, image_fps),
        max_frames=max_frames,
        workers=workers,
        timeout=timeout,
        on_error=on_error,
    )
    loader = DataLoader(batches, batch_size=None, num_workers=0, pin_memory=gpu)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if not gpu:
            torch.set_num_threads(max(1, cores - workers))
        with warnings.catch_warnings():  # batches of an IterableDataset have no sampler indices: none needed
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            trainer.predict(Encoder(net.encoder(pool, grid)), loader, return_predictions=False)
    finally:
        torch.set_num_threads(threads)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    try:
        meta = store_meta(
            net, key, key_parts, (), trainer.world_size, manifest=str(manifest), frames_meta=frames_meta
        )
        meta = assemble_videos(tmp, out, entries, meta, shard_mb << 20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store = FeatureStore(out)
    report(
        sum(r.length for r in store.index),
        time.perf_counter() - started,
        trainer.world_size,
        tuple(meta["feature_shape"]),
        key,
    )
    return store.meta
