"""Frame and feature stores: sharded ``.npy`` arrays, ``index.csv``, ``errors.csv`` and ``meta.json``.

A store is a folder. Rows of all videos are concatenated into a few large shards
(``frames-00000.npy`` / ``features-00000.npy``); ``index.csv`` says where each video's rows are.
Stores are written atomically: :class:`StoreWriter` builds the folder under a temporary name beside
the destination, flushes it to disk, and only then puts it in place, so a reader never sees a
half-written store under the final name. An existing store is replaced by one atomic exchange of the
two folders (Linux ``renameat2``), so a kill at any moment leaves the complete old store or the
complete new one under the final name; where the exchange is not available, two renames are used and
:func:`clean_stale` finishes an interrupted replacement instead of deleting its halves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.atomic import clean_stale, replace_dir

INDEX_FIELDS = [
    "video_id",
    "label",
    "split",
    "shard",
    "offset",
    "length",
    "src_fps",
    "fps",
    "width",
    "height",
    "duration_sec",
]
ERROR_FIELDS = ["video_id", "path", "error"]


class StoreError(RuntimeError):
    """A store is missing, incomplete or inconsistent; the message names the file."""


@dataclass
class IndexRow:
    video_id: str
    label: str
    split: str
    shard: int
    offset: int
    length: int
    src_fps: float
    fps: float
    width: int
    height: int
    duration_sec: float

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> IndexRow:
        kw = {}
        for f in fields(cls):
            kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]
            kw[f.name] = kind(row[f.name])
        return cls(**kw)


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# A file's fingerprint reads this many bytes at its start, middle and end.
FINGERPRINT_SAMPLE = 64 << 10


def fingerprint(path: str | os.PathLike) -> str:
    """A file's identity without reading it whole: SHA-256 of its size and of 64 KiB at its start,
    middle and end (a small file is read whole). For a folder of images, of every image's name and
    fingerprint. Decoding reads a container out of order, so it cannot hash the file on the way;
    this costs three small reads per video where a full hash costs a second pass over the dataset."""
    path, digest = Path(path), hashlib.sha256()
    if path.is_dir():
        from pipeline.video import IMAGE_SUFFIXES

        for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            digest.update(f"{image.name}\0{fingerprint(image)}\0".encode())
        return digest.hexdigest()[:32]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= 3 * FINGERPRINT_SAMPLE:
            digest.update(fh.read())
        else:
            for offset in (0, (size - FINGERPRINT_SAMPLE) // 2, size - FINGERPRINT_SAMPLE):
                fh.seek(offset)
                digest.update(fh.read(FINGERPRINT_SAMPLE))
    return digest.hexdigest()[:32]


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
    current one holds ``shard_bytes`` bytes (a video never spans two shards). Use as a context
    manager: on success the temporary folder replaces ``out``; on an exception it is removed and
    ``out`` (if it existed) is left untouched. Temporary folders of killed runs are removed on entry.
    """

    def __init__(self, out: str | os.PathLike, prefix: str, shard_bytes: int = 256 << 20):
        self.out = Path(out)
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.index: list[IndexRow] = []
        self.errors: list[dict] = []
        self._shard: NpyAppender | None = None
        self._shards = 0
        self.tmp: Path | None = None

    def __enter__(self) -> StoreWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        return self

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
            self._shard = NpyAppender(self.tmp / f"{self.prefix}-{self._shards:05d}.npy", dtype, row_shape)
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

    def add_error(self, video_id: str, path: str, error: str) -> None:
        self.errors.append({"video_id": video_id, "path": path, "error": " ".join(str(error).split())})

    def finish(self, meta: dict) -> Path:
        if self._shard is not None:
            self._shard.close()
        finalize(self.tmp, self.out, self.index, self.errors, meta)
        self.tmp = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._shard is not None:
            self._shard.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
    for path in sorted(folder.glob("*.npy")) + [folder / "index.csv"]:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


class Store:
    """Reads a frame or feature store; shards are memory-mapped on first use."""

    prefix = ""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for name in ("index.csv", "meta.json"):
            if not (self.root / name).is_file():
                raise StoreError(
                    f"{self.root / name}: missing; is {self.root} a finished {self.prefix} store?"
                )
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{self.root / 'meta.json'}: not valid JSON ({err})") from err
        with open(self.root / "index.csv", newline="") as fh:
            try:
                self.index = [IndexRow.from_csv(r) for r in csv.DictReader(fh)]
            except (KeyError, ValueError, TypeError) as err:
                raise StoreError(f"{self.root / 'index.csv'}: malformed row ({err})") from err
        self.errors: list[dict] = []
        if (self.root / "errors.csv").is_file():
            with open(self.root / "errors.csv", newline="") as fh:
                self.errors = list(csv.DictReader(fh))
        self._by_id = {r.video_id: r for r in self.index}
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        # Pickled (into DataLoader workers) without its memory maps: each process maps the shards itself.
        return {**self.__dict__, "_shards": {}}

    def shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            path = self.root / f"{self.prefix}-{k:05d}.npy"
            try:
                self._shards[k] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise StoreError(f"{path}: cannot be read ({err})") from err
        return self._shards[k]

    def rows(self, video_id: str) -> np.ndarray:
        """All rows of one video, a view into the memory-mapped shard."""
        r = self._by_id[video_id]
        data = self.shard(r.shard)
        if r.offset + r.length > len(data):
            raise StoreError(
                f"{self.root}/{self.prefix}-{r.shard:05d}.npy: holds {len(data)} rows, index says {video_id} ends at {r.offset + r.length}"
            )
        return data[r.offset : r.offset + r.length]

    def split(self, split: str) -> list[IndexRow]:
        return [r for r in self.index if r.split == split]

    def __len__(self) -> int:
        return len(self.index)


class FrameStore(Store):
    """uint8 ``(N, H, W, 3)`` RGB frames."""

    prefix = "frames"


class FeatureStore(Store):
    """float16 ``(N, D)`` or ``(N, C, G, G)`` features; ``meta.json`` holds the cache key."""

    prefix = "features"

    @property
    def cache_key(self) -> str:
        return self.meta["cache_key"]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["feature_shape"])
