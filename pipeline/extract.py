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
clip bounds and file fingerprint (its source, :mod:`pipeline.sources`) match a row of that store is
copied from it, not decoded, and the result is byte for byte what a run from scratch writes.

Several machines split one manifest with ``num_shards``/``shard_index`` (defaults: torchrun's
``WORLD_SIZE``/``RANK``): each writes a part store, and :func:`merge` joins the parts by hard-linking
their shard files (frame data is not copied).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.manifest import Entry, read_manifest, validate
from pipeline.resample import parse_size, uniform_indices
from pipeline.sources import inputs_hash, reusable, source_key, source_row, write_sources
from pipeline.store_writer import StoreWriter, finalize
from pipeline.stores import FrameStore, StoreError, fingerprint
from pipeline.workers import Job, pool_results


class ExtractError(RuntimeError):
    pass


def part_of(entries: list[Entry], num_shards: int, shard_index: int) -> list[Entry]:
    """The contiguous block of ``entries`` that part ``shard_index`` of ``num_shards`` extracts."""
    if not 0 <= shard_index < num_shards:
        raise ExtractError(f"shard index {shard_index} is not in [0, {num_shards})")
    n = len(entries)
    return entries[shard_index * n // num_shards : (shard_index + 1) * n // num_shards]


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
    timeout: float | None = None,
    shard_mb: int = 256,
    num_shards: int | None = None,
    shard_index: int | None = None,
    image_fps: float = 12.0,
    root: str | os.PathLike | None = None,
) -> dict:
    """Extract the frames of every video in ``manifest`` into the frame store ``out``.

    With ``num_shards`` > 1 only part ``shard_index`` of the manifest is extracted, into ``out``
    (a part store; join the parts with :func:`merge`). A "video" may be a folder of images (natural
    order) at the manifest's ``fps`` column or ``image_fps``. The manifest is validated first
    (:func:`pipeline.manifest.validate`, with ``root`` as the dataset root): dataset-level errors stop
    the run before any work; missing or unreadable files follow ``on_error``.

    With the same parameters, videos already in the store at ``out`` (same path, clip bounds and
    fingerprint) are copied from it instead of decoded; the store is replaced as a whole, as always.

    Returns ``{"extracted": N, "decoded": D, "reused": R, "failed": M, "frames": F, "seconds": S, "out": path}``.

    Raises:
        ExtractError: ``on_error="fail"`` and a video failed, or no video at all could be extracted.
    """
    from pipeline import video

    manifest, out = Path(manifest), Path(out)
    entries = read_manifest(manifest)
    report = validate(entries, manifest, root=root)
    report.raise_or_warn(file_errors_fatal=on_error == "fail")
    num_shards = int(num_shards or os.environ.get("WORLD_SIZE", 1))
    shard_index = int(shard_index if shard_index is not None else os.environ.get("RANK", 0))
    part = part_of(entries, num_shards, shard_index) if num_shards > 1 else entries
    wh = parse_size(size)
    workers = max(1, min(workers or os.cpu_count() or 1, len(part) or 1))
    params = {"fps": fps, "size": list(wh) if wh else None, "max_frames": max_frames, "image_fps": image_fps}
    started = time.perf_counter()
    fingerprints = {e.video_id: fingerprint(e.path) for e in part}
    sources = [source_row(e, fingerprints) for e in part]
    meta = {
        "kind": "frames",
        "manifest": str(manifest),
        "params": params,
        **video.versions(),
        "inputs_hash": inputs_hash(manifest, sources, params),
        "part": [shard_index, num_shards],
    }
    progress = _Progress(len(part))
    try:
        with StoreWriter(out, "frames", shard_bytes=shard_mb << 20) as writer, ExitStack() as stack:
            previous, by_source = reusable(out, meta)
            reuse = {
                i: by_source[key]
                for i, source in enumerate(sources)
                if (key := source_key(source)) in by_source
            }
            spills = writer.tmp / "spill"
            spills.mkdir()
            todo = [e for i, e in enumerate(part) if i not in reuse]
            jobs = [Job(k, e, spills / f"{k:08d}.npy") for k, e in enumerate(todo)]
            results = stack.enter_context(closing(pool_results(jobs, workers, (fps, wh, image_fps), timeout)))
            kept = []
            for i, e in enumerate(part):
                if i in reuse:
                    old = previous._by_id[reuse[i]]
                    info = {k: getattr(old, k) for k in ("src_fps", "fps", "width", "height", "duration_sec")}
                    row = writer.add(
                        previous.rows(old.video_id), video_id=e.video_id, label=e.label, split=e.split, **info
                    )
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
                frames = np.load(job.spill, mmap_mode="r")
                row = writer.add(
                    frames,
                    keep=uniform_indices(len(frames), max_frames) if max_frames else None,
                    video_id=e.video_id,
                    label=e.label,
                    split=e.split,
                    **info,
                )
                del frames
                job.spill.unlink()
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


def merge(parts: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Join part stores (in the order given) into one store at ``out``.

    Shard files are hard-linked (copied only across file systems), so frame data is not duplicated;
    the parts stay valid. All parts must have been extracted with the same parameters.
    """
    stores = [FrameStore(p) for p in parts]
    params = {json.dumps(s.meta.get("params"), sort_keys=True) for s in stores}
    if len(params) > 1:
        raise StoreError(f"parts were extracted with different parameters: {sorted(params)}")
    out = Path(out)
    index, errors, shard_count = [], [], 0
    with StoreWriter(out, "frames") as writer:
        for store in stores:
            mapping = {}
            for shard in sorted({r.shard for r in store.index}):
                source = store.root / f"frames-{shard:05d}.npy"
                target = writer.tmp / f"frames-{shard_count:05d}.npy"
                try:
                    os.link(source, target)
                except OSError:  # another file system
                    shutil.copyfile(source, target)
                mapping[shard], shard_count = shard_count, shard_count + 1
            for row in store.index:
                row.shard = mapping[row.shard]
                index.append(row)
            errors += store.errors
        seen = set()
        for row in index:
            if row.video_id in seen:
                raise StoreError(f"video {row.video_id!r} is in more than one part")
            seen.add(row.video_id)
        meta = dict(
            stores[0].meta,
            parts=[str(s.root) for s in stores],
            part=None,
            inputs_hash=hashlib.sha256(
                "".join(s.meta.get("inputs_hash", "") for s in stores).encode()
            ).hexdigest(),
        )
        meta.pop("content_hash", None)
        finalize(writer.tmp, out, index, errors, meta)
        writer.tmp = None
    print(
        f"merged {len(stores)} parts: {len(index)} videos, {len(errors)} failed, into {out}", file=sys.stderr
    )
    return {"videos": len(index), "failed": len(errors), "out": str(out)}
