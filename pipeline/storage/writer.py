"""Writing frame and feature stores (the format is in :mod:`pipeline.storage.store`).

:class:`NpyAppender` streams rows into one ``.npy`` file block by block. :class:`StoreWriter` builds a
store folder under a temporary name beside the destination, and :func:`finalize` writes its
``index.csv``, ``errors.csv`` and ``meta.json`` (with the content hash), flushes it to disk and only
then puts it in place, so a reader never sees a half-written store under the final name. An existing
store is replaced by one atomic exchange of the two folders (Linux ``renameat2``), so a kill at any
moment leaves the complete old store or the complete new one under the final name; where the exchange
is not available, two renames are used and :func:`pipeline.storage.atomic.clean_stale` finishes an
interrupted replacement instead of deleting its halves.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.media.codecs import DEFAULT_QUALITY, JpegAppender, JpegShard, check_codec, shard_files
from pipeline.storage.atomic import clean_stale, replace_dir
from pipeline.storage.store import ERROR_FIELDS, INDEX_FIELDS, FrameStore, IndexRow, StoreError, file_sha256


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


class NpyAppender:
    """An ``.npy`` file written block by block (memory stays flat); the header is fixed up on close.

    The header has a fixed size, reserved for the largest row count an ``.npy`` can hold, so rows are
    appended right after it and only the shape in it changes at the end. ``numpy.load`` (with or
    without ``mmap_mode``) reads the result.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(int(n) for n in row_shape)
        self.rows = self.nbytes = 0
        widest = self._header_text(np.iinfo(np.int64).max)
        # Format 1.0 stores the header length in 2 bytes, 2.0 in 4; both pad the whole header to 64.
        self.version = (1, 0) if len(widest) + 11 < 1 << 16 else (2, 0)
        preamble = 10 if self.version == (1, 0) else 12
        self.header_bytes = -(-(preamble + len(widest) + 1) // 64) * 64
        self._fh = open(self.path, "wb")
        self._fh.write(b"\0" * self.header_bytes)

    def _header_text(self, rows: int) -> bytes:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (rows, *self.row_shape),
        }
        return repr(header).encode("latin1")

    def append(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or tuple(block.shape[1:]) != self.row_shape:
            raise ValueError(
                f"{self.path}: rows of {self.row_shape} {self.dtype} expected, got {block.shape[1:]} {block.dtype}"
            )
        self._fh.write(np.ascontiguousarray(block).data)
        self.rows += len(block)
        self.nbytes += block.nbytes

    def header(self) -> bytes:
        """The header for the rows written so far, exactly ``header_bytes`` long."""
        text = self._header_text(self.rows)
        if self.version == (1, 0):
            size = self.header_bytes - 10
            return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + text.ljust(size - 1) + b"\n"
        size = self.header_bytes - 12
        return b"\x93NUMPY\x02\x00" + struct.pack("<I", size) + text.ljust(size - 1) + b"\n"

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.seek(0)
        self._fh.write(self.header())
        self._fh.close()


class StoreWriter:
    """Writes a store atomically into ``out``.

    Rows are appended per video straight to the current shard file; a new shard starts once the
    current one holds ``shard_bytes`` bytes (a video never spans two shards). ``codec="jpeg"`` keeps
    frames as JPEG images (:mod:`pipeline.media.codecs`; ``shard_bytes`` then counts encoded bytes). Use as
    a context manager: on success the temporary folder replaces ``out``; on an exception it is removed
    and ``out`` (if it existed) is left untouched. Temporary folders of killed runs are removed on entry.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        prefix: str,
        shard_bytes: int = 256 << 20,
        codec: str = "raw",
        quality: int = DEFAULT_QUALITY,
    ):
        self.out = Path(out)
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.codec, self.quality = check_codec(codec), quality
        self.index: list[IndexRow] = []
        self.errors: list[dict] = []
        self._shard: NpyAppender | JpegAppender | None = None
        self._shards = 0
        self.tmp: Path | None = None
        self._lock = None

    def __enter__(self) -> StoreWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        clean_stale(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        return self

    def _take_lock(self) -> None:
        """One writer per store: a second one fails at once instead of racing to replace it."""
        path = self.out.parent / f".{self.out.name}.lock"
        self._lock = open(path, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise StoreError(
                f"{self.out}: another process is writing this store (it holds {path}); wait for it to end"
            ) from None

    def _shard_for(self, dtype: np.dtype, row_shape: tuple[int, ...]) -> NpyAppender:
        current = self._shard
        if (
            current is None
            or current.nbytes >= self.shard_bytes
            or current.dtype != dtype
            or current.row_shape != row_shape
        ):
            if current is not None:
                current.close()
            path = self.tmp / shard_files(self.prefix, self._shards, self.codec)[0]
            if self.codec == "jpeg":
                self._shard = JpegAppender(path, row_shape, self.quality)
            else:
                self._shard = NpyAppender(path, dtype, row_shape)
            self._shards += 1
        return self._shard

    def add(self, rows: np.ndarray, keep: np.ndarray | None = None, block: int = 256, **info) -> IndexRow:
        """Append one video's rows ``(N, ...)`` (an array or a memory map), or only rows ``keep``;
        ``info`` fills the other index columns. Rows are copied ``block`` at a time."""
        keep = np.arange(len(rows)) if keep is None else keep
        shard = self._shard_for(rows.dtype, tuple(rows.shape[1:]))
        row = IndexRow(shard=self._shards - 1, offset=shard.rows, length=len(keep), **info)
        contiguous = len(keep) == len(rows)
        for i in range(0, len(keep), block):
            shard.append(rows[i : i + block] if contiguous else rows[keep[i : i + block]])
        self.index.append(row)
        return row

    def add_encoded(
        self, source: JpegShard, start: int = 0, keep: np.ndarray | None = None, **info
    ) -> IndexRow:
        """Append one video's frames from a ``jpeg`` shard or spill, as stored (no re-encoding):
        rows ``start + keep`` of ``source`` (``keep``: all of the rest, by default)."""
        if self.codec != "jpeg":
            raise ValueError(f"{self.out}: encoded frames go into a jpeg store, this one is {self.codec}")
        keep = np.arange(len(source) - start) if keep is None else np.asarray(keep)
        shard = self._shard_for(source.dtype, tuple(source.shape[1:]))
        row = IndexRow(shard=self._shards - 1, offset=shard.rows, length=len(keep), **info)
        if len(keep) and (np.diff(keep) == 1).all():  # one run of frames: one copy
            shard.append_encoded(*source.encoded(start + int(keep[0]), start + int(keep[-1]) + 1))
        else:
            for i in keep:
                shard.append_encoded(*source.encoded(start + int(i), start + int(i) + 1))
        self.index.append(row)
        return row

    def add_error(self, video_id: str, path: str, error: str) -> None:
        self.errors.append({"video_id": video_id, "path": path, "error": " ".join(str(error).split())})

    def close_shard(self) -> None:
        """Finish the shard being written (its header or offsets file)."""
        if self._shard is not None:
            self._shard.close()

    def finish(self, meta: dict) -> Path:
        self.close_shard()
        finalize(self.tmp, self.out, self.index, self.errors, meta)
        self.tmp = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close_shard()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the lock


def copy_row(writer: StoreWriter, store: FrameStore, old: IndexRow, **ids) -> IndexRow:
    """Append one video of ``store`` to ``writer`` as it is stored (JPEG bytes are not re-encoded): an
    incremental extraction's reused videos and a merge's parts."""
    info = {k: getattr(old, k) for k in ("src_fps", "fps", "width", "height", "duration_sec")}
    if writer.codec == "jpeg":
        return writer.add_encoded(
            store.shard(old.shard), start=old.offset, keep=np.arange(old.length), **ids, **info
        )
    return writer.add(store.rows(old.video_id), **ids, **info)


def finalize(tmp: Path, out: Path, index: list[IndexRow], errors: list[dict], meta: dict) -> dict:
    """Write index, errors and meta (with the content hash) into ``tmp``, then move it to ``out``."""
    write_csv(tmp / "index.csv", INDEX_FIELDS, [asdict(r) for r in index])
    write_csv(tmp / "errors.csv", ERROR_FIELDS, errors)
    meta = dict(meta, content_hash=content_hash(tmp))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    replace_dir(tmp, out)
    return meta


def content_hash(folder: Path) -> str:
    """SHA-256 over the index and every shard's bytes: identifies a store's contents."""
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("*.npy"), *folder.glob("*.mjpeg")]) + [folder / "index.csv"]:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
