"""The extract stage: decode every video of a manifest into a frame store.

Videos are decoded by worker processes (spawned, one video at a time each). A worker streams the
frames of its video into a spill file, so neither it nor the parent ever holds a whole video; the
parent appends finished videos to the store in manifest order, so the store's contents do not
depend on the number of workers. A video that fails (unreadable, no video stream, no decodable
frame, a decoder that hangs past ``timeout`` or crashes) lands in ``errors.csv`` with a one-line
reason and the others are extracted (``on_error="skip"``), or the run stops with an error naming
the file (``on_error="fail"``).

A worker that dies (a crash, an out-of-memory kill, any signal) costs only its video: the row in
``errors.csv`` names the signal, a fresh worker takes the next video.

Re-running with the same parameters onto an existing store is incremental: a video whose path,
clip bounds and file fingerprint (its source, :mod:`pipeline.storage.sources`) match a row of that store is
copied from it, not decoded, and the result is byte for byte what a run from scratch writes.

Several machines split one manifest with ``part=(I, N)`` (``vpipe extract --part I/N``; by default
from a SLURM job array's ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``, else torchrun's
``RANK``/``WORLD_SIZE``): part ``I`` extracts the ``I``-th contiguous block of the manifest into the
part store ``OUT.part-I-of-N`` beside ``OUT``, and :func:`pipeline.stages.parts.merge` joins the ``N`` parts
into ``OUT`` (:mod:`pipeline.stages.parts`).

Frames are kept as JPEG images by default (``codec="jpeg"``, encoded in the workers) or raw
(``codec="raw"``); see :mod:`pipeline.media.codecs`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.media.codecs import DEFAULT_CODEC, DEFAULT_QUALITY, JpegShard, check_codec
from pipeline.media.errors import UserError
from pipeline.media.images import DEFAULT_IMAGE_FPS
from pipeline.media.manifest import read_manifest, validate
from pipeline.media.resample import parse_size, uniform_indices
from pipeline.stages.parts import default_part, part_of, part_path
from pipeline.stages.workers import DECODE_TIMEOUT_SEC, Job, pool_results, remove_spill
from pipeline.storage.sources import inputs_hash, reusable, source_key, source_row, write_sources
from pipeline.storage.store import fingerprint
from pipeline.storage.writer import StoreWriter, copy_row


class ExtractError(RuntimeError, UserError):
    pass


class _Progress:
    """A progress bar on a terminal (videos/s, frames/s, ETA, failures); silent otherwise."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="video", file=sys.stderr, dynamic_ncols=True)
        self.frames = self.failed = 0
        self.started = time.perf_counter()

    def update(self, frames: int, failed: bool) -> None:
        self.frames += frames
        self.failed += failed
        if self.bar is not None:
            self.bar.set_postfix(
                frames_s=f"{self.frames / (time.perf_counter() - self.started):.0f}", failed=self.failed
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def extract(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fps: float = 0.0,
    size: str | None = None,
    max_frames: int | None = None,
    workers: int | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    timeout: float | None = DECODE_TIMEOUT_SEC,
    shard_mb: int = 256,
    part: tuple[int, int] | None = None,
    image_fps: float = DEFAULT_IMAGE_FPS,
    root: str | os.PathLike | None = None,
    codec: str = DEFAULT_CODEC,
    quality: int = DEFAULT_QUALITY,
) -> dict:
    """Extract the frames of every video in ``manifest`` into the frame store ``out``.

    With ``part=(I, N)``, ``N`` > 1 (default: :func:`default_part`), only part ``I`` of the manifest
    is extracted, into the part store :func:`pipeline.stages.parts.part_path` ``(out, I, N)``; :func:`pipeline.stages.parts.merge` joins them.
    ``codec`` is ``jpeg`` (JPEG images at ``quality``) or ``raw`` (uint8 arrays). A "video" may be a folder of images (natural
    order) at the manifest's ``fps`` column or ``image_fps``. A video whose decoding takes longer than
    ``timeout`` seconds (0 or None: no limit) is killed and fails. The manifest is validated first
    (:func:`pipeline.media.manifest.validate`, with ``root`` as the dataset root): dataset-level errors stop
    the run before any work; missing or unreadable files follow ``on_error``.

    With the same parameters, videos already in the store at ``out`` (same path, clip bounds and
    fingerprint) are copied from it instead of decoded; the store is replaced as a whole, as always.

    Returns ``{"extracted": N, "decoded": D, "reused": R, "failed": M, "frames": F, "seconds": S, "out": path}``.

    Raises:
        ExtractError: ``on_error="fail"`` and a video failed, or no video at all could be extracted.
    """
    from pipeline.media import video

    manifest, out = Path(manifest), Path(out)
    check_codec(codec)
    if not 1 <= quality <= 100:
        raise ExtractError(f"--quality {quality}: a JPEG quality is 1 to 100 (90 by default)")
    shard_index, num_shards = part or default_part()
    entries = read_manifest(manifest)
    report = validate(entries, manifest, root=root)
    report.raise_or_warn(file_errors_fatal=on_error == "fail")
    if num_shards > 1:
        part, out = part_of(entries, num_shards, shard_index), part_path(out, shard_index, num_shards)
    else:
        part = entries
    wh = parse_size(size)
    workers = max(1, min(workers or os.cpu_count() or 1, len(part) or 1))
    params = {"fps": fps, "size": list(wh) if wh else None, "max_frames": max_frames, "image_fps": image_fps}
    if codec == "jpeg":  # raw stores keep the parameters they always had: their hashes stay valid
        params.update(codec=codec, quality=quality)
    started = time.perf_counter()
    fingerprints = {e.video_id: fingerprint(e.path) for e in part}
    sources = [source_row(e, fingerprints) for e in part]
    meta = {
        "kind": "frames",
        "codec": codec,
        "manifest": str(manifest),
        "params": params,
        **video.versions(),
        "inputs_hash": inputs_hash(manifest, sources, params),
        "part": [shard_index, num_shards],
    }
    progress = _Progress(len(part))
    try:
        with (
            StoreWriter(out, "frames", shard_bytes=shard_mb << 20, codec=codec, quality=quality) as writer,
            ExitStack() as stack,
        ):
            previous, by_source = reusable(out, meta)
            reuse = {
                i: by_source[key]
                for i, source in enumerate(sources)
                if (key := source_key(source)) in by_source
            }
            spills = writer.tmp / "spill"
            spills.mkdir()
            todo = [e for i, e in enumerate(part) if i not in reuse]
            suffix = ".mjpeg" if codec == "jpeg" else ".npy"
            jobs = [Job(k, e, spills / f"{k:08d}{suffix}") for k, e in enumerate(todo)]
            args = (fps, wh, image_fps, codec, quality)
            results = stack.enter_context(closing(pool_results(jobs, workers, args, timeout)))
            kept = []
            for i, e in enumerate(part):
                if i in reuse:
                    old = previous._by_id[reuse[i]]
                    row = copy_row(writer, previous, old, video_id=e.video_id, label=e.label, split=e.split)
                    kept.append(sources[i])
                    progress.update(row.length, False)
                    continue
                job, info, error = next(results)
                if error is not None:
                    if on_error == "fail":
                        raise ExtractError(error)
                    writer.add_error(e.video_id, str(e.path), error)
                    progress.update(0, True)
                    continue
                frames = JpegShard(job.spill) if codec == "jpeg" else np.load(job.spill, mmap_mode="r")
                keep = uniform_indices(len(frames), max_frames) if max_frames else None
                add = writer.add_encoded if codec == "jpeg" else writer.add
                row = add(frames, keep=keep, video_id=e.video_id, label=e.label, split=e.split, **info)
                del frames
                remove_spill(job)
                kept.append(sources[i])
                progress.update(row.length, False)
            stack.close()  # the workers exit
            shutil.rmtree(spills, ignore_errors=True)
            if not writer.index:
                first = writer.errors[0]["error"] if writer.errors else "the manifest part is empty"
                raise ExtractError(f"{manifest}: no video could be extracted; first error: {first}")
            write_sources(writer.tmp, kept)
            previous = None  # its memory maps are closed before the old store is replaced
            writer.finish(meta)
    finally:
        progress.close()
    seconds = round(time.perf_counter() - started, 2)
    summary = {
        "extracted": len(writer.index),
        "decoded": len(writer.index) - len(reuse),
        "reused": len(reuse),
        "failed": len(writer.errors),
        "frames": progress.frames,
        "seconds": seconds,
        "out": str(out),
    }
    reused = f" ({len(reuse)} reused from the previous store)" if reuse else ""
    print(
        f"extracted {summary['extracted']}{reused}, failed {summary['failed']}, see {out / 'errors.csv'} "
        f"({progress.frames} frames in {seconds} s, {progress.frames / max(seconds, 1e-9):.0f} frames/s)",
        file=sys.stderr,
    )
    return summary
