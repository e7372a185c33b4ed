"""A frame store's ``sources.csv``: where each of its videos came from (path, clip bounds, image
sequence frame rate and the file's fingerprint, :func:`pipeline.storage.store.fingerprint`).

Sources are the key of incremental extract re-runs: a video whose source matches a row of the store
already at the destination, made with the same parameters and decoder versions, is copied from that
store instead of decoded. They also make up the store's ``inputs_hash``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from pipeline.media.manifest import Entry
from pipeline.storage.store import FrameStore, StoreError, file_sha256
from pipeline.storage.writer import write_csv

# Frame stores also list where each video came from: the key of incremental re-runs.
SOURCE_FIELDS = ["video_id", "path", "start_sec", "end_sec", "fps", "fingerprint"]


def source_row(e: Entry, fingerprints: dict[str, str]) -> dict:
    """The ``sources.csv`` row of a manifest entry (numbers as written by ``:g``, blank when unset)."""
    blank = lambda v: "" if v is None else f"{float(v):g}"  # noqa: E731
    return {
        "video_id": e.video_id,
        "path": str(e.path),
        "start_sec": blank(e.start_sec),
        "end_sec": blank(e.end_sec),
        "fps": blank(e.fps),
        "fingerprint": fingerprints[e.video_id],
    }


def source_key(source: dict) -> tuple:
    """What must match for a video to be reused: every column of its source row."""
    return tuple(source[k] for k in SOURCE_FIELDS)


def inputs_hash(manifest: Path, sources: list[dict], params: dict) -> str:
    """Hash of the manifest, the parameters and every input's fingerprint."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(file_sha256(manifest).encode())
    for source in sources:
        digest.update(f"{source['video_id']}\0{source['fingerprint']}\0".encode())
    return digest.hexdigest()


def reusable(out: Path, meta: dict) -> tuple[FrameStore | None, dict[tuple, str]]:
    """The store already at ``out`` and its video ids by source key, when it was made with the same
    parameters and decoder versions (else nothing is reused)."""
    try:
        store = FrameStore(out)
        sources = read_sources(out)
    except StoreError:
        return None, {}
    if any(store.meta.get(k) != meta[k] for k in ("params", "pyav", "ffmpeg")):
        return None, {}
    indexed = {r.video_id for r in store.index}
    return store, {source_key(s): s["video_id"] for s in sources if s["video_id"] in indexed}


def read_sources(store: Path) -> list[dict]:
    """The ``sources.csv`` rows of a frame store."""
    try:
        with open(Path(store) / "sources.csv", newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError as err:
        raise StoreError(f"{Path(store) / 'sources.csv'}: cannot be read ({err.strerror})") from err


def write_sources(folder: Path, rows: list[dict]) -> None:
    """Write ``sources.csv`` (rows from :func:`source_row`) into a store folder being built."""
    write_csv(folder / "sources.csv", SOURCE_FIELDS, rows)
