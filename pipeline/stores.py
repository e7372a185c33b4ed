"""Frame and feature stores: sharded ``.npy`` arrays, ``index.csv``, ``errors.csv`` and ``meta.json``.

A store is a folder. Rows of all videos are concatenated into a few large shards
(``frames-00000.npy`` / ``features-00000.npy``); ``index.csv`` says where each video's rows are.
Stores are written atomically: :class:`StoreWriter` builds the folder under a temporary name beside
the destination and renames it into place only when everything is written, so a reader never sees a
half-written store under the final name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

INDEX_FIELDS = ["video_id", "label", "split", "shard", "offset", "length", "src_fps", "fps", "width", "height", "duration_sec"]
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


class StoreWriter:
    """Writes a store atomically into ``out``.

    Rows are appended per video; a shard is flushed to disk once it holds ``shard_bytes`` bytes.
    Use as a context manager: on success the temporary folder replaces ``out``; on an exception it is
    removed and ``out`` (if it existed) is left untouched.
    """

    def __init__(self, out: str | os.PathLike, prefix: str, shard_bytes: int = 256 << 20):
        self.out = Path(out)
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.index: list[IndexRow] = []
        self.errors: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._shard = 0
        self.tmp: Path | None = None

    def __enter__(self) -> StoreWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self

    def add(self, rows: np.ndarray, **info) -> IndexRow:
        """Append one video's rows (``(N, ...)``); ``info`` fills the other index columns."""
        if self._pending and (self._pending[0].shape[1:] != rows.shape[1:] or self._pending[0].dtype != rows.dtype):
            self._flush()  # a shard holds one shape and dtype
        row = IndexRow(shard=self._shard, offset=self._pending_rows, length=len(rows), **info)
        self._pending.append(rows)
        self._pending_rows += len(rows)
        self._pending_bytes += rows.nbytes
        self.index.append(row)
        if self._pending_bytes >= self.shard_bytes:
            self._flush()
        return row

    def add_error(self, video_id: str, path: str, error: str) -> None:
        self.errors.append({"video_id": video_id, "path": path, "error": " ".join(str(error).split())})

    def _flush(self) -> None:
        if not self._pending:
            return
        np.save(self.tmp / f"{self.prefix}-{self._shard:05d}.npy", np.concatenate(self._pending))
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        self._shard += 1

    def finish(self, meta: dict) -> Path:
        self._flush()
        finalize(self.tmp, self.out, self.index, self.errors, meta)
        self.tmp = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
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


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst`` with two renames."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
                raise StoreError(f"{self.root / name}: missing; is {self.root} a finished {self.kind} store?")
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

    @property
    def kind(self) -> str:
        return self.prefix

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
            raise StoreError(f"{self.root}/{self.prefix}-{r.shard:05d}.npy: holds {len(data)} rows, index says {video_id} ends at {r.offset + r.length}")
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
