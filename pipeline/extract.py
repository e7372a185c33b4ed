"""The extract stage: decode every video of a manifest into a frame store.

Videos are decoded in parallel worker processes and written in manifest order, so the store's
contents do not depend on the number of workers. A video that fails lands in ``errors.csv`` with a
one-line reason and the others are extracted (``on_error="skip"``), or the run stops with an error
naming the file (``on_error="fail"``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal

from pipeline.manifest import Entry, read_manifest
from pipeline.stores import StoreWriter, file_sha256


class ExtractError(RuntimeError):
    pass


def _decode_entry(entry: Entry, fps: float, size: tuple[int, int] | None, threads: int):
    """Runs in a worker: returns (entry, DecodedVideo | None, error message | None)."""
    from pipeline import video

    try:
        if not entry.path.is_file():
            raise FileNotFoundError(f"{entry.path}: no such file")
        return entry, video.decode(entry.path, fps=fps, size=size, start_sec=entry.start_sec, end_sec=entry.end_sec, threads=threads), None
    except Exception as err:  # noqa: BLE001 - any decoder failure becomes a row of errors.csv
        message = str(err) if str(entry.path) in str(err) else f"{entry.path}: {err}"
        return entry, None, f"{type(err).__name__}: {message}"


def inputs_hash(manifest: Path, entries: list[Entry], params: dict) -> str:
    """Hash of the manifest, the parameters and every input file's bytes."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(file_sha256(manifest).encode())
    for e in entries:
        digest.update(e.video_id.encode())
        digest.update(file_sha256(e.path).encode() if e.path.is_file() else b"missing")
    return digest.hexdigest()


def extract(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fps: float = 0.0,
    size: str | None = None,
    workers: int | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    shard_mb: int = 256,
) -> dict:
    """Extract the frames of every video in ``manifest`` into the frame store ``out``.

    Returns a summary ``{"extracted": N, "failed": M, "frames": F, "seconds": S}``.

    Raises:
        ExtractError: ``on_error="fail"`` and a video failed, or no video at all could be extracted.
    """
    from pipeline import video

    manifest = Path(manifest)
    entries = read_manifest(manifest)
    wh = video.parse_size(size)
    workers = workers or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    params = {"fps": fps, "size": list(wh) if wh else None}
    started = time.perf_counter()
    frames = 0
    ctx = mp.get_context("spawn")
    with StoreWriter(out, "frames", shard_bytes=shard_mb << 20) as writer, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for entry, decoded, error in pool.map(partial(_decode_entry, fps=fps, size=wh, threads=threads), entries):
            if error is not None:
                if on_error == "fail":
                    raise ExtractError(error)
                writer.add_error(entry.video_id, str(entry.path), error)
                continue
            h, w = decoded.frames.shape[1:3]
            writer.add(
                decoded.frames, video_id=entry.video_id, label=entry.label, split=entry.split, src_fps=round(decoded.src_fps, 4),
                fps=round(decoded.fps, 4), width=w, height=h, duration_sec=decoded.duration_sec,
            )
            frames += len(decoded.frames)
        if not writer.index:
            raise ExtractError(f"{manifest}: no video could be extracted; first error: {writer.errors[0]['error']}")
        meta = {"kind": "frames", "manifest": str(manifest), "params": params, **video.versions(), "inputs_hash": inputs_hash(manifest, entries, params)}
        writer.finish(meta)
        summary = {"extracted": len(writer.index), "failed": len(writer.errors), "frames": frames, "seconds": round(time.perf_counter() - started, 2)}
    print(f"extracted {summary['extracted']}, failed {summary['failed']}, see {Path(out) / 'errors.csv'} "
          f"({frames} frames in {summary['seconds']} s)", file=sys.stderr)
    return summary
