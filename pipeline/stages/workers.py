"""The extract stage's decoding workers: one process per worker decodes a video (:mod:`pipeline.media.video`)
into a spill file and reports back over a pipe; the pool (:func:`pool_results`) hands out jobs, keeps
results in manifest order within a small reorder window, kills a worker that exceeds its time limit,
and replaces a worker that died, so a crash costs that one video (its error names the signal)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from pipeline.media.codecs import DEFAULT_QUALITY, JpegAppender, offsets_path
from pipeline.media.manifest import Entry, clip_outside
from pipeline.storage.atomic import fault
from pipeline.storage.writer import NpyAppender

# Completed videos may wait for an earlier, slower one: at most this many per worker.
REORDER_WINDOW = 4
# A worker writes its frames to the spill file in blocks of about this size.
SPILL_BLOCK_BYTES = 8 << 20
# Seconds one video may take to decode before its worker is killed (the default of extract and
# compute_from_videos; there 0 or None: no limit).
DECODE_TIMEOUT_SEC = 600.0


@dataclass
class Job:
    number: int
    entry: Entry
    spill: Path
    threads: int = 1  # decoder threads, set when the job starts


def _spill_writer(job: Job, codec: str, quality: int, row_shape: tuple[int, ...]):
    """The spill file of a job: raw frames (``.npy``) or, for the ``jpeg`` codec, the frames already
    encoded (``.mjpeg`` + offsets), so encoding runs in the workers, in parallel, not in the parent."""
    if codec == "jpeg":
        return JpegAppender(job.spill, row_shape, quality)
    return NpyAppender(job.spill, np.uint8, row_shape)


def remove_spill(job: Job) -> None:
    job.spill.unlink(missing_ok=True)
    if job.spill.suffix == ".mjpeg":
        offsets_path(job.spill).unlink(missing_ok=True)


def _decode_to_spill(
    job: Job, fps: float, size, image_fps: float, codec: str = "raw", quality: int = DEFAULT_QUALITY
) -> dict:
    """Decode one video into ``job.spill`` (written block by block); returns its index info."""
    from pipeline.media.video import Decoder

    writer = None
    try:
        with Decoder(
            job.entry.path,
            fps=fps,
            size=size,
            start_sec=job.entry.start_sec,
            end_sec=job.entry.end_sec,
            threads=job.threads,
            image_fps=job.entry.fps or image_fps,
        ) as decoder:
            if outside := clip_outside(job.entry, decoder.declared_duration):
                line = f" (manifest line {job.entry.line})" if job.entry.line else ""
                raise ValueError(f"{job.entry.path}: {outside}{line}")
            block: list[np.ndarray] = []
            for n, frame in enumerate(decoder):
                if n == 5:
                    fault(f"decode-{job.entry.video_id}")  # crash tests: die mid-video
                block.append(frame)
                if len(block) * frame.nbytes >= SPILL_BLOCK_BYTES:
                    writer = writer or _spill_writer(job, codec, quality, block[0].shape)
                    writer.append(np.stack(block))
                    block = []
            if block:
                writer = writer or _spill_writer(job, codec, quality, block[0].shape)
                writer.append(np.stack(block))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(
            f"{job.entry.path}: no frame between start_sec={job.entry.start_sec} and end_sec={job.entry.end_sec}"
        )
    height, width = writer.row_shape[:2]
    return {
        "src_fps": round(float(decoder.src_fps), 4),
        "fps": round(float(fps or decoder.src_fps), 4),
        "width": width,
        "height": height,
        "duration_sec": float(decoder.duration_sec),
    }


def _one_line(err: BaseException, path: Path) -> str:
    message = " ".join(str(err).split()) or "(no message)"
    if str(path) not in message:
        message = f"{path}: {message}"
    return f"{type(err).__name__}: {message}"


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the extract process dies, even by SIGKILL (a forked
    worker holds a copy of the parent's end of its pipe, so it would never see the pipe close)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _worker(conn, *args) -> None:
    """Worker process: receive jobs until None, answer (number, info, error). ``args``: those of
    :func:`_decode_to_spill` after the job (fps, size, image_fps[, codec, quality])."""
    _die_with_parent()
    while (job := conn.recv()) is not None:
        try:
            conn.send((job.number, _decode_to_spill(job, *args), None))
        except Exception as err:  # noqa: BLE001 - every decoder failure becomes a row of errors.csv
            remove_spill(job)
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


def pool_results(jobs: list[Job], workers: int, args: tuple, timeout: float | None):
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
                    done[job.number] = (
                        None,
                        f"DecoderCrash: {job.entry.path}: decoder process {_death(slot.process.exitcode)}",
                    )
                    slot.restart()
                    remove_spill(job)
                elif timeout and time.monotonic() - slot.started > timeout:
                    done[job.number] = (
                        None,
                        f"Timeout: {job.entry.path}: decoding took longer than {timeout:g} s, killed",
                    )
                    slot.restart()
                    remove_spill(job)
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


def ahead(results, depth: int):
    """Iterate ``results`` (of :func:`pool_results`) in a thread, at most ``depth`` items ahead of the
    consumer: decoding goes on while the consumer works (``vpipe features --manifest`` runs the model).

    The worker pool lives in that thread (it starts, restarts and stops the decoders there: a
    worker's parent-death signal follows the thread that started it), so the pool hands out the next
    videos while the consumer runs the model. An exception in the pool is raised in the consumer."""
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in results:
                put(("item", item))
                if stop.is_set():
                    break
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", err))
        finally:
            results.close()  # stops the workers
            put(("end", None))

    thread = threading.Thread(target=produce, name="decode-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)
