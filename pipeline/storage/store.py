"""Frame and feature stores: sharded ``.npy`` arrays, ``index.csv``, ``errors.csv`` and ``meta.json``.

A store is a folder. Rows of all videos are concatenated into a few large shards
(``frames-00000.npy`` / ``features-00000.npy``); ``index.csv`` says where each video's rows are.
This module holds the format and the readers (shards memory-mapped), and the file identities that
stores and cache keys record; stores are written, atomically, by :mod:`pipeline.storage.writer`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.media.codecs import CodecError, JpegShard, check_codec, shard_files
from pipeline.media.errors import UserError
from pipeline.media.images import IMAGE_SUFFIXES

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


class StoreError(RuntimeError, UserError):
    """A store is missing, incomplete or inconsistent; the message names the file."""


# The project's stores (data/KIND/NAME) and the DVC stage that writes each; {name}: NAME.
STAGES = {"frames": "extract@{name}", "features": "features@{name}", "grids": "grids"}
# Elsewhere, the command that writes a store of each kind; {out}: the store's folder.
COMMANDS = {
    "frames": "vpipe extract --manifest MANIFEST --out {out}",
    "features": "vpipe features --frames FRAMES --out {out}",
    "grids": "vpipe grids H5... --out {out}",
}


def what_to_run(root: str | os.PathLike, kind: str) -> str:
    """What writes the store at ``root`` of ``kind`` (frames, features, grids): the DVC stage for the
    project's own stores (``data/frames/NAME`` → ``dvc repro extract@NAME``), else the vpipe command."""
    root = Path(os.path.normpath(root))
    parts = root.absolute().parts
    if len(parts) >= 3 and parts[-3] == "data" and parts[-2] in STAGES:
        return f"dvc repro {STAGES[parts[-2]].format(name=parts[-1])}"
    return COMMANDS.get(kind, "vpipe extract or vpipe features --out {out}").format(out=root)


def check_finished(root: str | os.PathLike, kind: str, files: tuple[str, ...]) -> None:
    """Raise :class:`StoreError` unless ``root`` holds ``files`` (those a finished store of ``kind`` has;
    ``meta.json`` is written last). The message names the store, an interrupted write's leftover
    (``.NAME.tmp-PID-...`` beside it) if any, and what to run first."""
    root = Path(root)
    missing = [name for name in files if not (root / name).is_file()]
    if not missing:
        return
    leftovers = sorted(p.name for p in root.parent.glob(f".{root.name}.tmp-*")) if root.name else []
    if not root.is_dir():
        problem = f"{root}: no {kind} store"
    else:
        problem = f"{root / missing[0]}: missing; {root} is not a finished {kind} store"
    if leftovers:
        problem += f" (an unfinished write beside it, interrupted or still running: {leftovers[0]})"
    raise StoreError(f"{problem}; run `{what_to_run(root, kind)}` first")


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


class Store:
    """Reads a frame or feature store; shards are memory-mapped on first use. A frame store's
    ``codec`` (``meta.json``; ``raw`` when absent) decides how a shard is read
    (:mod:`pipeline.media.codecs`): either way :meth:`shard` gives an array-like of uint8 frames.
    ``keep_decoded=False``: a ``jpeg`` store's decoded frames are not kept (a reader that reads each
    frame once)."""

    prefix = ""

    def __init__(self, root: str | os.PathLike, keep_decoded: bool = True):
        self.root, self.keep_decoded = Path(root), keep_decoded
        check_finished(self.root, self.prefix or "frame or feature", ("index.csv", "meta.json"))
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
        try:
            self.codec = check_codec(self.meta.get("codec", "raw"), self.root / "meta.json")
        except CodecError as err:
            raise StoreError(str(err)) from err
        self._by_id = {r.video_id: r for r in self.index}
        self._shards: dict[int, np.ndarray | JpegShard] = {}

    def __getstate__(self) -> dict:
        # Pickled (into DataLoader workers) without its memory maps: each process maps the shards itself.
        return {**self.__dict__, "_shards": {}}

    def shard_path(self, k: int) -> Path:
        """Shard ``k``'s data file (``.npy``, or ``.mjpeg`` for the ``jpeg`` codec)."""
        return self.root / shard_files(self.prefix, k, self.codec)[0]

    def shard(self, k: int) -> np.ndarray | JpegShard:
        if k not in self._shards:
            path = self.shard_path(k)
            try:
                self._shards[k] = (
                    JpegShard(path, self.keep_decoded)
                    if self.codec == "jpeg"
                    else np.load(path, mmap_mode="r")
                )
            except (OSError, ValueError) as err:
                raise StoreError(f"{path}: cannot be read ({err})") from err
        return self._shards[k]

    def rows(self, video_id: str) -> np.ndarray:
        """All rows of one video, a view into the memory-mapped shard."""
        r = self._by_id[video_id]
        data = self.shard(r.shard)
        if r.offset + r.length > len(data):
            raise StoreError(
                f"{self.shard_path(r.shard)}: holds {len(data)} rows, index says {video_id} ends at {r.offset + r.length}"
            )
        return data[r.offset : r.offset + r.length]

    def split(self, split: str) -> list[IndexRow]:
        return [r for r in self.index if r.split == split]

    def __len__(self) -> int:
        return len(self.index)


class FrameStore(Store):
    """uint8 ``(N, H, W, 3)`` RGB frames, kept raw or as JPEG images (``codec``)."""

    prefix = "frames"

    def encoded(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A ``jpeg`` store's frames of one video as stored: bytes back to back, each frame's length."""
        r = self._by_id[video_id]
        return self.shard(r.shard).encoded(r.offset, r.offset + r.length)


class FeatureStore(Store):
    """float16 ``(N, D)`` or ``(N, C, G, G)`` features; ``meta.json`` holds the cache key."""

    prefix = "features"

    @property
    def cache_key(self) -> str:
        return self.meta["cache_key"]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["feature_shape"])
