"""The manifest: a CSV of ``video_id,path,label,split[,start_sec,end_sec]``.

``path`` is relative to the manifest's folder (absolute paths are allowed); ``video_id`` is unique;
``split`` is ``train``, ``val`` or ``test``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ["video_id", "path", "label", "split"]
OPTIONAL = ["start_sec", "end_sec"]
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file and every problem found."""


@dataclass(frozen=True)
class Entry:
    video_id: str
    path: Path  # resolved against the manifest's folder
    label: str
    split: str
    start_sec: float | None = None
    end_sec: float | None = None


def _optional_float(value: str | None, where: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError as err:
        raise ManifestError(f"{where}: not a number: {value!r}") from err


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """Read and validate a manifest.

    Raises:
        ManifestError: missing columns, duplicate ids, unknown splits, empty fields or bad times;
            the message lists the offending lines.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.parent
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        entries, problems, seen = [], [], {}
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            empty = [c for c in REQUIRED if not (row.get(c) or "").strip()]
            if empty:
                problems.append(f"{where}: empty {', '.join(empty)}")
                continue
            vid = row["video_id"].strip()
            if vid in seen:
                problems.append(f"{where}: duplicate video_id {vid!r} (first on line {seen[vid]})")
                continue
            seen[vid] = line
            if row["split"] not in SPLITS:
                problems.append(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
                continue
            try:
                start = _optional_float(row.get("start_sec"), where)
                end = _optional_float(row.get("end_sec"), where)
            except ManifestError as err:
                problems.append(str(err))
                continue
            if start is not None and end is not None and end <= start:
                problems.append(f"{where}: end_sec {end} is not after start_sec {start}")
                continue
            video = Path(row["path"])
            entries.append(Entry(vid, video if video.is_absolute() else base / video, row["label"].strip(), row["split"], start, end))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"{path}: {len(problems)} problem(s):\n  {shown}{more}")
    if not entries:
        raise ManifestError(f"{path}: no rows")
    return entries


def write_manifest(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write manifest rows (dicts with the required columns, paths relative to the manifest)."""
    header = REQUIRED + [c for c in OPTIONAL if any(c in r for r in rows)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
