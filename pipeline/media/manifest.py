"""The manifest: a CSV of ``video_id,path,label,split[,start_sec,end_sec,fps]``.

``path`` is relative to the manifest's folder (absolute paths are allowed); ``video_id`` is unique;
``split`` is ``train``, ``val`` or ``test``. A path may name a folder of images (an image sequence,
as Jester ships), whose frame rate is the optional ``fps`` column. ``start_sec`` and ``end_sec`` cut a
clip out of the video: finite, ``0 <= start_sec < end_sec``, and inside the video; ``fps`` is finite
and positive.

:func:`read_manifest` rejects what makes the file unusable (columns, duplicate ids, bad values);
:func:`validate` then checks the dataset it describes before any work is done (clip times against
each video's duration among them). Every message names the manifest, the line and the field.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.media.errors import UserError

REQUIRED = ["video_id", "path", "label", "split"]
OPTIONAL = ["start_sec", "end_sec", "fps"]
# The optional numbers: the lowest value each may take, and whether that value itself is allowed.
MINIMUM = {"start_sec": (0.0, True), "end_sec": (0.0, False), "fps": (0.0, False)}
# How far past a video's declared duration end_sec may reach (rounded annotations, container durations).
END_SLACK_SEC = 0.1
SPLITS = ("train", "val", "test")


class ManifestError(ValueError, UserError):
    """The manifest cannot be used; the message names the file and every problem found."""


@dataclass(frozen=True)
class Entry:
    video_id: str
    path: Path  # resolved against the manifest's folder
    label: str
    split: str
    start_sec: float | None = None
    end_sec: float | None = None
    fps: float | None = None  # frame rate of an image sequence
    raw_path: str = ""  # the path as written in the manifest
    line: int = field(default=0, compare=False)  # the manifest line (header: 1)


def _optional_float(row: dict[str, str], name: str, where: str) -> float | None:
    """The number in column ``name`` of ``row`` (None when empty): finite and in its range (:data:`MINIMUM`)."""
    value = row.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError as err:
        raise ManifestError(f"{where}: {name}: not a number: {value!r}") from err
    if not math.isfinite(number):
        raise ManifestError(f"{where}: {name}: not a finite number: {value!r}")
    lowest, allowed = MINIMUM[name]
    if number < lowest or (number == lowest and not allowed):
        bound = f"at least {lowest:g}" if allowed else f"above {lowest:g}"
        raise ManifestError(f"{where}: {name} {number:g} must be {bound}")
    return number


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
            raise ManifestError(
                f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})"
            )
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
                start, end, fps = (_optional_float(row, name, where) for name in OPTIONAL)
            except ManifestError as err:
                problems.append(str(err))
                continue
            if start is not None and end is not None and end <= start:
                problems.append(f"{where}: end_sec {end} is not after start_sec {start}")
                continue
            video = Path(row["path"])
            entries.append(
                Entry(
                    vid,
                    video if video.is_absolute() else base / video,
                    row["label"].strip(),
                    row["split"],
                    start,
                    end,
                    fps,
                    row["path"],
                    line,
                )
            )
    if len(problems) == 1:
        raise ManifestError(problems[0])
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


@dataclass
class Report:
    """What :func:`validate` found: per problem, the offenders (all of them) and a one-line title."""

    source: Path
    errors: dict[str, list[str]]
    warnings: dict[str, list[str]]
    file_errors: dict[str, list[str]]  # missing or unreadable files: fatal or recorded, by --on-error
    show: int = 5

    def lines(self) -> list[str]:
        out = []
        for kind, problems in (
            ("error", self.errors),
            ("error", self.file_errors),
            ("warning", self.warnings),
        ):
            for title, offenders in problems.items():
                shown = ", ".join(offenders[: self.show]) + (
                    f", ... ({len(offenders) - self.show} more)" if len(offenders) > self.show else ""
                )
                out.append(f"{kind}: {len(offenders)} {title}: {shown}")
        return out

    def __str__(self) -> str:
        n_err = sum(len(v) > 0 for v in (*self.errors.values(), *self.file_errors.values()))
        head = f"{self.source}: {n_err} error(s), {len(self.warnings)} warning(s)"
        return "\n  ".join([head, *self.lines()])

    @property
    def ok(self) -> bool:
        return not self.errors and not self.file_errors

    def raise_or_warn(self, file_errors_fatal: bool = True) -> None:
        """Raise :class:`ManifestError` on errors; print warnings (and recorded file errors) to stderr."""
        if self.errors or (file_errors_fatal and self.file_errors):
            raise ManifestError(str(self))
        if self.warnings or self.file_errors:
            print(str(self), file=sys.stderr)


def clip_outside(e: Entry, duration: float | None) -> str | None:
    """``start_sec ...`` / ``end_sec ...`` when entry ``e``'s clip times fall outside ``duration``, the
    duration its video declares (None when inside, when it cuts no clip, or when the file declares no
    duration: decoding then reports it). The decoding workers check it once they have opened a video
    (:attr:`pipeline.media.video.Decoder.declared_duration`), in parallel: checking a Kinetics-size
    manifest here, before any work, would read 300k headers in one process."""
    if duration is None or (e.start_sec is None and e.end_sec is None):
        return None
    if e.start_sec is not None and e.start_sec >= duration:
        return f"start_sec {e.start_sec:g} is not before the end of {e.path.name} ({duration:.3f} s)"
    if e.end_sec is not None and e.end_sec > duration + END_SLACK_SEC:
        return f"end_sec {e.end_sec:g} is past the end of {e.path.name} ({duration:.3f} s)"
    return None


def validate(
    entries: list[Entry],
    manifest: str | os.PathLike,
    root: str | os.PathLike | None = None,
    min_per_class: int = 2,
    show: int = 5,
) -> Report:
    """Check a dataset before any work.

    Errors: paths that escape the dataset root (``root``, default the manifest's folder; absolute
    paths are checked only against an explicit ``root``), an empty train split, labels in val/test
    that never occur in train; and, by file, missing and unreadable paths (clip times outside their
    video are a per-file error of the decoding workers: :func:`clip_outside`). Warnings: an empty val or
    test split, classes with fewer than ``min_per_class`` training examples.
    """
    manifest = Path(manifest)
    base = Path(root).resolve() if root else manifest.parent.resolve()
    errors: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}
    for e in entries:
        if (root or not Path(e.raw_path).is_absolute()) and not Path(
            os.path.normpath(e.path.absolute())
        ).is_relative_to(base):
            errors.setdefault(f"path(s) escape the dataset root {base}", []).append(
                f"{e.video_id} ({e.raw_path or e.path})"
            )
        elif not e.path.exists():
            files.setdefault("file(s) missing", []).append(str(e.path))
        elif not os.access(e.path, os.R_OK | (os.X_OK if e.path.is_dir() else 0)):
            files.setdefault("file(s) unreadable", []).append(str(e.path))
    by_split = {s: [e for e in entries if e.split == s] for s in SPLITS}
    train_labels = Counter(e.label for e in by_split["train"])
    if not by_split["train"]:
        errors["empty split(s)"] = ["train"]
    for split in ("val", "test"):
        if not by_split[split]:
            warnings.setdefault("empty split(s)", []).append(split)
    unseen = Counter(
        (e.label, e.split) for s in ("val", "test") for e in by_split[s] if e.label not in train_labels
    )
    if unseen and by_split["train"]:
        errors["label(s) in val/test never occur in train"] = [
            f"{label} ({split}: {n})" for (label, split), n in sorted(unseen.items())
        ]
    few = sorted((n, label) for label, n in train_labels.items() if n < min_per_class)
    if few:
        warnings[f"class(es) with fewer than {min_per_class} training examples"] = [
            f"{label} ({n})" for n, label in few
        ]
    return Report(manifest, errors, warnings, files, show)
