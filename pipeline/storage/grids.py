"""Grid stores: series of float grids (city traffic flows) and their TaxiBJ importer; the windows the
grid forecaster reads are :mod:`pipeline.datasets.flows`'s.

A grid store is a folder (``vpipe grids``, replaced atomically as the frame and feature stores are):

- ``grids.npy``: float32 ``(T, C, H, W)``, every slot of the series in time order (channel 0 inflow,
  1 outflow for TaxiBJ-style flows);
- ``slots.csv``: one row per slot: ``row`` (into ``grids.npy``), ``date`` (``YYYYMMDDSS`` as in the
  TaxiBJ files, ``SS`` the slot of the day from 01), ``time`` (ISO start of the slot), ``slot`` (slots
  since the first day's midnight: consecutive slots differ by 1, a missing slot leaves a gap) and
  ``split`` (whole days: the last ``test_days`` are test, the ``val_days`` before them val);
- ``meta.json``: ``kind: "grids"``, ``channels``, ``shape`` ``[C, H, W]``, ``slots_per_day``,
  ``slot_minutes``, the per-split slot counts, the source files with their fingerprints, and
  ``content_hash``.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.storage.atomic import replace_dir
from pipeline.storage.store import StoreError, check_finished, file_sha256, fingerprint
from pipeline.storage.writer import write_csv

SLOT_FIELDS = ["row", "date", "time", "slot", "split"]


def read_taxibj(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """``data`` ``(T, C, H, W)`` and ``date`` (``YYYYMMDDSS`` strings) of a TaxiBJ-style HDF5 file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("data", "date") if k not in f]
            if missing:
                raise StoreError(
                    f"{path}: no {' or '.join(repr(k) for k in missing)} dataset (has: {', '.join(f) or 'nothing'}); "
                    "a TaxiBJ file holds data (T, 2, H, W) and date (T,)"
                )
            data, dates = f["data"][()], f["date"][()]
    except OSError as err:
        raise StoreError(f"{path}: not a readable HDF5 file ({err})") from err
    if data.ndim != 4 or len(dates) != len(data):
        raise StoreError(
            f"{path}: data must be (T, C, H, W) with one date per slot, got data {data.shape} and {len(dates)} dates"
        )
    dates = [d.decode() if isinstance(d, bytes) else str(d) for d in dates]
    if not np.isfinite(data).all():
        raise StoreError(f"{path}: data holds NaN or infinite values")
    return data.astype(np.float32), dates


def parse_date(text: str, slots_per_day: int, source: Path) -> tuple[dt.date, int]:
    """``YYYYMMDDSS`` → (day, slot of the day from 0)."""
    try:
        day, slot = dt.datetime.strptime(text[:8], "%Y%m%d").date(), int(text[8:]) - 1
    except ValueError:
        slot, day = -1, None
    if day is None or not 0 <= slot < slots_per_day:
        raise StoreError(
            f"{source}: date {text!r} is not YYYYMMDDSS with a slot from 01 to {slots_per_day:02d}"
        )
    return day, slot


def import_grids(
    files: list[str | os.PathLike],
    out: str | os.PathLike,
    val_days: int = 14,
    test_days: int = 14,
    slots_per_day: int = 48,
    channels: tuple[str, ...] = ("inflow", "outflow"),
) -> dict:
    """Join TaxiBJ-style HDF5 ``files`` (e.g. ``BJ13_M32x32_T30_InOut.h5`` ... ``BJ16_...``) into a grid
    store at ``out``; returns its ``meta.json``. A slot given twice, grids of different shapes, or a
    series too short for the splits is an error naming the file."""
    if val_days < 1 or test_days < 1:
        raise StoreError(f"--val-days and --test-days must be at least 1, got {val_days} and {test_days}")
    slots: dict[int, tuple[np.ndarray, str, Path]] = {}
    shape = first = None
    for file in map(Path, files):
        data, dates = read_taxibj(file)
        if shape is not None and data.shape[1:] != shape:
            raise StoreError(f"{file}: grids of shape {data.shape[1:]}, but {files[0]} has {shape}")
        shape = data.shape[1:]
        if len(channels) != shape[0]:
            raise StoreError(
                f"{file}: {shape[0]} channels per grid, but {len(channels)} channel names ({', '.join(channels)})"
            )
        for grid, text in zip(data, dates, strict=True):
            day, slot = parse_date(text, slots_per_day, file)
            first = first or day
            key = (day - dt.date(1970, 1, 1)).days * slots_per_day + slot
            if key in slots:
                raise StoreError(f"{file}: slot {text} is also in {slots[key][2]}")
            slots[key] = (grid, text, file)
    if not slots:
        raise StoreError("no slots: give at least one HDF5 file with data")
    keys = sorted(slots)
    origin = keys[0] - keys[0] % slots_per_day
    days = sorted({(k - origin) // slots_per_day for k in keys})
    if len(days) <= val_days + test_days:
        raise StoreError(
            f"{files[0]}: {len(days)} days of data, too few for {val_days} val and {test_days} test days plus training days"
        )
    split_of = {
        d: "test"
        if i >= len(days) - test_days
        else "val"
        if i >= len(days) - test_days - val_days
        else "train"
        for i, d in enumerate(days)
    }
    grids = np.stack([slots[k][0] for k in keys])
    minutes = 24 * 60 // slots_per_day
    rows = []
    for i, k in enumerate(keys):
        day, slot = parse_date(slots[k][1], slots_per_day, slots[k][2])
        start = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=slot * minutes)
        rows.append(
            {
                "row": i,
                "date": slots[k][1],
                "time": start.isoformat(timespec="minutes"),
                "slot": k - origin,
                "split": split_of[(k - origin) // slots_per_day],
            }
        )
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    meta = {
        "kind": "grids",
        "channels": list(channels),
        "shape": list(shape),
        "slots_per_day": slots_per_day,
        "slot_minutes": minutes,
        "slots": counts,
        "sources": [{"path": str(f), "fingerprint": fingerprint(f)} for f in files],
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        np.save(tmp / "grids.npy", grids)
        write_csv(tmp / "slots.csv", SLOT_FIELDS, rows)
        digest = hashlib.sha256()
        for name in ("grids.npy", "slots.csv"):
            digest.update(f"{name}:{file_sha256(tmp / name)}".encode())
        meta["content_hash"] = digest.hexdigest()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


class GridStore:
    """Reads a grid store; ``grids.npy`` is memory-mapped on first use."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        check_finished(self.root, "grids", ("grids.npy", "slots.csv", "meta.json"))
        self.meta = json.loads((self.root / "meta.json").read_text())
        with open(self.root / "slots.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.slot = np.array([int(r["slot"]) for r in rows], dtype=np.int64)
        self.split = np.array([r["split"] for r in rows])
        self.times = [r["time"] for r in rows]
        self._grids: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_grids": None}  # each DataLoader worker maps the file itself

    @property
    def grids(self) -> np.ndarray:
        if self._grids is None:
            self._grids = np.load(self.root / "grids.npy", mmap_mode="r")
            if len(self._grids) != len(self.slot):
                raise StoreError(
                    f"{self.root / 'grids.npy'}: {len(self._grids)} grids, slots.csv lists {len(self.slot)}"
                )
        return self._grids

    def covariates(self) -> np.ndarray:
        """``(T, 3)`` float32 known in advance for every slot: time of day as a point on a circle (sin,
        cos) and a weekend flag."""
        per_day = self.meta["slots_per_day"]
        angle = 2 * np.pi * ((self.slot % per_day) + 0.5) / per_day
        weekend = np.array(
            [dt.date.fromisoformat(t[:10]).weekday() >= 5 for t in self.times], dtype=np.float32
        )
        return np.stack([np.sin(angle), np.cos(angle), weekend], 1).astype(np.float32)
