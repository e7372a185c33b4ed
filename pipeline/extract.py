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
clip bounds and file fingerprint (:func:`pipeline.stores.fingerprint`) match a row of that store is copied from it,
not decoded, and the result is byte for byte what a run from scratch writes.

Several machines split one manifest with ``num_shards``/``shard_index`` (defaults: torchrun's
``WORLD_SIZE``/``RANK``): each writes a part store, and :func:`merge` joins the parts by hard-linking
their shard files (frame data is not copied).
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.manifest import Entry, read_manifest, validate
from pipeline.stores import (
    FrameStore,
    NpyAppender,
    StoreError,
    StoreWriter,
    fault,
    file_sha256,
    finalize,
    fingerprint,
    write_csv,
)

# Completed videos may wait for an earlier, slower one: at most this many per worker.
REORDER_WINDOW = 4
# A worker writes its frames to the spill file in blocks of about this size.
SPILL_BLOCK_BYTES = 8 << 20
# Frame stores also list where each video came from: the key of incremental re-runs.
SOURCE_FIELDS = ["video_id", "path", "start_sec", "end_sec", "fps", "fingerprint"]


class ExtractError(RuntimeError):
    pass


@dataclass
class Job:
    number: int
    entry: Entry
    spill: Path
    threads: int = 1  # decoder threads, set when the job starts


def _decode_to_spill(job: Job, fps: float, size, image_fps: float) -> dict:
    """Decode one video into ``job.spill`` (an .npy written block by block); returns its index info."""
    from pipeline.video import Decoder

    writer = None
    try:
        with Decoder(job.entry.path, fps=fps, size=size, start_sec=job.entry.start_sec, end_sec=job.entry.end_sec,
                     threads=job.threads, image_fps=job.entry.fps or image_fps) as decoder:
            block: list[np.ndarray] = []
            for n, frame in enumerate(decoder):
                if n == 5:
                    fault(f"decode-{job.entry.video_id}")  # crash tests: die mid-video
                block.append(frame)
                if len(block) * frame.nbytes >= SPILL_BLOCK_BYTES:
                    writer = writer or NpyAppender(job.spill, np.uint8, block[0].shape)
                    writer.append(np.stack(block))
                    block = []
            if block:
                writer = writer or NpyAppender(job.spill, np.uint8, block[0].shape)
                writer.append(np.stack(block))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"{job.entry.path}: no frame between start_sec={job.entry.start_sec} and end_sec={job.entry.end_sec}")
    height, width = writer.row_shape[:2]
    return {"src_fps": round(float(decoder.src_fps), 4), "fps": round(float(fps or decoder.src_fps), 4), "width": width,
            "height": height, "duration_sec": float(decoder.duration_sec)}


def _one_line(err: BaseException, path: Path) -> str:
    message = " ".join(str(err).split()) or "(no message)"
    if str(path) not in message:
        message = f"{path}: {message}"
    return f"{type(err).__name__}: {message}"


def _worker(conn, fps: float, size, image_fps: float) -> None:
    """Worker process: receive jobs until None, answer (number, info, error)."""
    while (job := conn.recv()) is not None:
        try:
            conn.send((job.number, _decode_to_spill(job, fps, size, image_fps), None))
        except Exception as err:  # noqa: BLE001 - every decoder failure becomes a row of errors.csv
            job.spill.unlink(missing_ok=True)
            conn.send((job.number, None, _one_line(err, job.entry.path)))


class _Slot:
    """One worker process and the job it is running."""

    def __init__(self, ctx, args):
        self.ctx, self.args = ctx, args
        self.job: Job | None = None
        self.started = 0.0
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.process = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.process.start()
        child.close()

    def submit(self, job: Job) -> None:
        try:
            self.conn.send(job)
        except OSError:  # the idle worker died since its last job: a fresh one takes this job
            self.restart()
            self.conn.send(job)
        self.job, self.started = job, time.monotonic()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()
        self.job = None

    def restart(self) -> None:
        """Kill the worker (hung or crashed) and start a fresh one."""
        self.kill()
        self._start()

    def stop(self) -> None:
        """Let an idle worker exit; kill a busy one."""
        if self.job is not None:
            self.kill()
            return
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.kill()


def _context():
    """fork starts a worker in milliseconds, spawn in about half a second (it re-imports NumPy and
    PyAV). fork is safe here: the parent never decodes and, checked below, runs no other thread."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _pool_results(jobs: list[Job], workers: int, args: tuple, timeout: float | None):
    """Run ``jobs`` on ``workers`` processes; yield (job, info, error) in job order."""
    ctx = _context()
    slots = [_Slot(ctx, args) for _ in range(min(workers, len(jobs)))]
    cores = os.cpu_count() or 1
    done: dict[int, tuple[dict | None, str | None]] = {}
    queue, next_out = list(reversed(jobs)), 0
    try:
        while next_out < len(jobs):
            for slot in slots:
                if slot.job is None and queue and queue[-1].number < next_out + REORDER_WINDOW * len(slots):
                    # workers × threads ≈ cores; the last jobs get the cores that are about to fall idle.
                    queue[-1].threads = max(1, cores // min(len(slots), len(queue)))
                    slot.submit(queue.pop())
            busy = [s for s in slots if s.job is not None]
            ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout=0.2)
            for slot in busy:
                job = slot.job
                if slot.conn in ready:
                    try:
                        number, info, error = slot.conn.recv()
                        done[number], slot.job = (info, error), None
                        continue
                    except (EOFError, OSError):
                        slot.process.join(timeout=5)  # the process died mid-job
                if not slot.process.is_alive():
                    done[job.number] = (None, f"DecoderCrash: {job.entry.path}: decoder process {_death(slot.process.exitcode)}")
                    slot.restart()
                    job.spill.unlink(missing_ok=True)
                elif timeout and time.monotonic() - slot.started > timeout:
                    done[job.number] = (None, f"Timeout: {job.entry.path}: decoding took longer than {timeout:g} s, killed")
                    slot.restart()
                    job.spill.unlink(missing_ok=True)
            while next_out in done:
                info, error = done.pop(next_out)
                yield jobs[next_out], info, error
                next_out += 1
    finally:
        for slot in slots:
            slot.stop()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name} (signal {-exitcode})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"died (exit code {exitcode})"


def _source(e: Entry, fingerprints: dict[str, str]) -> dict:
    blank = lambda v: "" if v is None else f"{float(v):g}"  # noqa: E731
    return {"video_id": e.video_id, "path": str(e.path), "start_sec": blank(e.start_sec), "end_sec": blank(e.end_sec),
            "fps": blank(e.fps), "fingerprint": fingerprints[e.video_id]}


def inputs_hash(manifest: Path, sources: list[dict], params: dict) -> str:
    """Hash of the manifest, the parameters and every input's fingerprint."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(file_sha256(manifest).encode())
    for source in sources:
        digest.update(f"{source['video_id']}\0{source['fingerprint']}\0".encode())
    return digest.hexdigest()


def _reusable(out: Path, meta: dict) -> tuple[FrameStore | None, dict[str, tuple]]:
    """The store already at ``out`` and its videos by source, when it was made with the same
    parameters and decoder versions (else nothing is reused)."""
    try:
        store = FrameStore(out)
        with open(out / "sources.csv", newline="") as fh:
            sources = list(csv.DictReader(fh))
    except (StoreError, OSError):
        return None, {}
    if any(store.meta.get(k) != meta[k] for k in ("params", "pyav", "ffmpeg")):
        return None, {}
    indexed = {r.video_id for r in store.index}
    return store, {tuple(s[k] for k in SOURCE_FIELDS): s["video_id"] for s in sources if s["video_id"] in indexed}


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
            self.bar.set_postfix(frames_s=f"{self.frames / (time.perf_counter() - self.started):.0f}", failed=self.failed)
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
    wh = video.parse_size(size)
    workers = max(1, min(workers or os.cpu_count() or 1, len(part) or 1))
    params = {"fps": fps, "size": list(wh) if wh else None, "max_frames": max_frames, "image_fps": image_fps}
    started = time.perf_counter()
    fingerprints = {e.video_id: fingerprint(e.path) for e in part}
    sources = [_source(e, fingerprints) for e in part]
    meta = {"kind": "frames", "manifest": str(manifest), "params": params, **video.versions(),
            "inputs_hash": inputs_hash(manifest, sources, params), "part": [shard_index, num_shards]}
    progress = _Progress(len(part))
    try:
        with StoreWriter(out, "frames", shard_bytes=shard_mb << 20) as writer, ExitStack() as stack:
            previous, reusable = _reusable(out, meta)
            reuse = {i: reusable[key] for i, source in enumerate(sources) if (key := tuple(source[k] for k in SOURCE_FIELDS)) in reusable}
            spills = writer.tmp / "spill"
            spills.mkdir()
            todo = [e for i, e in enumerate(part) if i not in reuse]
            jobs = [Job(k, e, spills / f"{k:08d}.npy") for k, e in enumerate(todo)]
            results = stack.enter_context(closing(_pool_results(jobs, workers, (fps, wh, image_fps), timeout)))
            kept = []
            for i, e in enumerate(part):
                if i in reuse:
                    old = previous._by_id[reuse[i]]
                    info = {k: getattr(old, k) for k in ("src_fps", "fps", "width", "height", "duration_sec")}
                    row = writer.add(previous.rows(old.video_id), video_id=e.video_id, label=e.label, split=e.split, **info)
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
                row = writer.add(frames, keep=video.uniform_indices(len(frames), max_frames) if max_frames else None,
                                 video_id=e.video_id, label=e.label, split=e.split, **info)
                del frames
                job.spill.unlink()
                kept.append(sources[i])
                progress.update(row.length, False)
            stack.close()  # the workers exit
            shutil.rmtree(spills, ignore_errors=True)
            if not writer.index:
                first = writer.errors[0]["error"] if writer.errors else "the manifest part is empty"
                raise ExtractError(f"{manifest}: no video could be extracted; first error: {first}")
            write_csv(writer.tmp / "sources.csv", SOURCE_FIELDS, kept)
            previous = None  # its memory maps are closed before the old store is replaced
            writer.finish(meta)
    finally:
        progress.close()
    seconds = round(time.perf_counter() - started, 2)
    summary = {"extracted": len(writer.index), "decoded": len(writer.index) - len(reuse), "reused": len(reuse),
               "failed": len(writer.errors), "frames": progress.frames, "seconds": seconds, "out": str(out)}
    reused = f" ({len(reuse)} reused from the previous store)" if reuse else ""
    print(f"extracted {summary['extracted']}{reused}, failed {summary['failed']}, see {out / 'errors.csv'} "
          f"({progress.frames} frames in {seconds} s, {progress.frames / max(seconds, 1e-9):.0f} frames/s)", file=sys.stderr)
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
        meta = dict(stores[0].meta, parts=[str(s.root) for s in stores], part=None, inputs_hash=hashlib.sha256(
            "".join(s.meta.get("inputs_hash", "") for s in stores).encode()).hexdigest())
        meta.pop("content_hash", None)
        finalize(writer.tmp, out, index, errors, meta)
        writer.tmp = None
    print(f"merged {len(stores)} parts: {len(index)} videos, {len(errors)} failed, into {out}", file=sys.stderr)
    return {"videos": len(index), "failed": len(errors), "out": str(out)}
