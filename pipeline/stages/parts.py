"""Extraction split across machines: which block of a manifest part ``I`` of ``N`` extracts, where
its part store goes (``OUT.part-I-of-N`` beside ``OUT``), and :func:`merge`, which joins the parts.

``vpipe extract --part I/N`` (or a SLURM job array's ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``,
else torchrun's ``RANK``/``WORLD_SIZE``: :func:`default_part`) extracts one part; ``vpipe merge --out
OUT`` joins all ``N``. Merging re-packs the parts' frames (JPEG images are copied as they are, never
re-encoded) exactly as one process would have written them, so the merged store is byte for byte a
one-process extraction; ``link=True`` hard-links the parts' shard files instead (no copy; the same
frames and index, one shard per part at least). Every reader, and DVC, then sees one store and one
index, and a missing or mismatched part is refused once, at the merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from pipeline.media.codecs import DEFAULT_QUALITY, shard_files
from pipeline.media.errors import UserError
from pipeline.media.manifest import Entry
from pipeline.storage.sources import inputs_hash, read_sources, write_sources
from pipeline.storage.store import FrameStore, IndexRow, StoreError
from pipeline.storage.writer import StoreWriter, copy_row, finalize


class PartError(ValueError, UserError):
    """A ``--part`` that is malformed or out of range."""


def part_of(entries: list[Entry], num_shards: int, shard_index: int) -> list[Entry]:
    """The contiguous block of ``entries`` that part ``shard_index`` of ``num_shards`` extracts."""
    if not 0 <= shard_index < num_shards:
        raise PartError(f"part {shard_index}/{num_shards}: the part must be in 0..{num_shards - 1}")
    n = len(entries)
    return entries[shard_index * n // num_shards : (shard_index + 1) * n // num_shards]


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (``I`` counted from 0) as ``(I, N)``."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise PartError(f"--part {text}: expected I/N, e.g. 0/4 for the first of four parts") from None
    if count < 1 or not 0 <= index < count:
        raise PartError(f"--part {text}: I must be in 0..N-1 and N at least 1")
    return index, count


def default_part() -> tuple[int, int]:
    """This task's part from the launcher: a SLURM job array, else torchrun, else the whole manifest."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


def part_path(out: str | os.PathLike, index: int, count: int) -> Path:
    """Where part ``index`` of ``count`` of the store ``out`` is written: ``OUT.part-I-of-N``."""
    out = Path(out)
    return out.with_name(f"{out.name}.part-{index:04d}-of-{count:04d}")


def find_parts(out: str | os.PathLike) -> list[Path]:
    """The part stores of ``out`` (``OUT.part-I-of-N``), all ``N`` of them, in order.

    Raises:
        StoreError: none found, parts of different ``N``, or a part missing.
    """
    out = Path(out)
    found = sorted(out.parent.glob(f"{out.name}.part-*-of-*"))
    counts = {p.name.rsplit("-of-", 1)[1] for p in found}
    if not found:
        raise StoreError(f"{out}: no part stores {out.name}.part-I-of-N beside it")
    if len(counts) > 1:
        raise StoreError(f"{out}: parts of different splits ({', '.join(sorted(counts))} parts) beside it")
    count = int(counts.pop())
    expected = [part_path(out, i, count) for i in range(count)]
    missing = [p for p in expected if p not in found]
    if missing:
        first = missing[0].name.split(".part-")[1].split("-of-")[0]
        raise StoreError(
            f"{missing[0]}: part {int(first)} of {count} is missing ({len(missing)} missing); "
            f"run vpipe extract --part {int(first)}/{count} with the same options first"
        )
    return expected


def merge(
    parts: list[str | os.PathLike] | None,
    out: str | os.PathLike,
    *,
    link: bool = False,
    remove_parts: bool = False,
) -> dict:
    """Join part stores (in the order given; by default every part of ``out``, :func:`find_parts`)
    into one store at ``out``, atomically.

    The frames are re-packed as one process would have written them, so the result is byte for byte
    a one-process extraction (JPEG images are copied, not re-encoded). ``link=True`` hard-links the
    parts' shard files instead (copied only across file systems): no frame is copied, each part keeps
    its own shards. The parts must come from one manifest with the same parameters, each whole
    (a store a part's run finished); ``remove_parts`` deletes them once the merged store is in place.
    """
    out = Path(out)
    parts = [Path(p) for p in parts] if parts else find_parts(out)
    stores = [FrameStore(p) for p in parts]
    for key in ("params", "codec", "manifest", "pyav", "ffmpeg"):
        values = {json.dumps(s.meta.get(key), sort_keys=True) for s in stores}
        if len(values) > 1:
            raise StoreError(f"{out}: the parts were extracted with different {key}: {sorted(values)}")
    first = stores[0]
    seen: set[str] = set()
    for store in stores:
        for row in store.index:
            if row.video_id in seen:
                raise StoreError(f"{store.root}: video {row.video_id!r} is in more than one part")
            seen.add(row.video_id)
    sources = [row for store in stores for row in read_sources(store.root)]
    errors = [e for store in stores for e in store.errors]
    params = first.meta["params"]
    meta = dict(first.meta, part=[0, 1])
    meta.pop("content_hash", None)
    manifest = Path(first.meta["manifest"])
    if manifest.is_file():  # the hash a one-process run records; else one over the parts' hashes
        meta["inputs_hash"] = inputs_hash(manifest, sources, params)
    else:
        meta["inputs_hash"] = hashlib.sha256(
            "".join(s.meta["inputs_hash"] for s in stores).encode()
        ).hexdigest()
    quality = params.get("quality", DEFAULT_QUALITY)
    with StoreWriter(out, "frames", codec=first.codec, quality=quality) as writer:
        if link:
            index = _link_shards(stores, writer.tmp)
        else:
            for store in stores:
                for row in store.index:
                    copy_row(writer, store, row, video_id=row.video_id, label=row.label, split=row.split)
            writer.close_shard()
            index = writer.index
        write_sources(writer.tmp, sources)
        finalize(writer.tmp, out, index, errors, meta)
        writer.tmp = None
    stores = None  # memory maps closed before the parts go
    if remove_parts:
        for p in parts:
            shutil.rmtree(p)
    print(
        f"merged {len(parts)} parts: {len(index)} videos, {len(errors)} failed, into {out}", file=sys.stderr
    )
    return {"videos": len(index), "failed": len(errors), "out": str(out)}


def _link_shards(stores: list[FrameStore], folder: Path) -> list[IndexRow]:
    """Hard-link every part's shard files into ``folder``, numbered on; the index rows follow."""
    index, count = [], 0
    for store in stores:
        mapping = {}
        for shard in sorted({r.shard for r in store.index}):
            for source, target in zip(
                shard_files("frames", shard, store.codec),
                shard_files("frames", count, store.codec),
                strict=True,
            ):
                try:
                    os.link(store.root / source, folder / target)
                except OSError:  # another file system
                    shutil.copyfile(store.root / source, folder / target)
            mapping[shard], count = count, count + 1
        for row in store.index:
            row.shard = mapping[row.shard]
            index.append(row)
    return index
