"""Grid stores: series of float grids (city traffic flows), their TaxiBJ importer, and the data module
the grid forecaster reads.

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
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data import batch_loader
from pipeline.stores import StoreError, file_sha256, fingerprint, replace_dir, write_csv

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
                raise StoreError(f"{path}: no {' or '.join(repr(k) for k in missing)} dataset (has: {', '.join(f) or 'nothing'}); "
                                 "a TaxiBJ file holds data (T, 2, H, W) and date (T,)")
            data, dates = f["data"][()], f["date"][()]
    except OSError as err:
        raise StoreError(f"{path}: not a readable HDF5 file ({err})") from err
    if data.ndim != 4 or len(dates) != len(data):
        raise StoreError(f"{path}: data must be (T, C, H, W) with one date per slot, got data {data.shape} and {len(dates)} dates")
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
        raise StoreError(f"{source}: date {text!r} is not YYYYMMDDSS with a slot from 01 to {slots_per_day:02d}")
    return day, slot


def import_grids(files: list[str | os.PathLike], out: str | os.PathLike, val_days: int = 14, test_days: int = 14,
                 slots_per_day: int = 48, channels: tuple[str, ...] = ("inflow", "outflow")) -> dict:
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
            raise StoreError(f"{file}: {shape[0]} channels per grid, but {len(channels)} channel names ({', '.join(channels)})")
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
        raise StoreError(f"{files[0]}: {len(days)} days of data, too few for {val_days} val and {test_days} test days plus training days")
    split_of = {d: "test" if i >= len(days) - test_days else "val" if i >= len(days) - test_days - val_days else "train"
                for i, d in enumerate(days)}
    grids = np.stack([slots[k][0] for k in keys])
    minutes = 24 * 60 // slots_per_day
    rows = []
    for i, k in enumerate(keys):
        day, slot = parse_date(slots[k][1], slots_per_day, slots[k][2])
        start = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=slot * minutes)
        rows.append({"row": i, "date": slots[k][1], "time": start.isoformat(timespec="minutes"), "slot": k - origin,
                     "split": split_of[(k - origin) // slots_per_day]})
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    meta = {"kind": "grids", "channels": list(channels), "shape": list(shape), "slots_per_day": slots_per_day,
            "slot_minutes": minutes, "slots": counts,
            "sources": [{"path": str(f), "fingerprint": fingerprint(f)} for f in files]}
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
        for name in ("grids.npy", "slots.csv", "meta.json"):
            if not (self.root / name).is_file():
                raise StoreError(f"{self.root / name}: missing; is {self.root} a grid store (vpipe grids)?")
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
                raise StoreError(f"{self.root / 'grids.npy'}: {len(self._grids)} grids, slots.csv lists {len(self.slot)}")
        return self._grids

    def covariates(self) -> np.ndarray:
        """``(T, 3)`` float32 known in advance for every slot: time of day as a point on a circle (sin,
        cos) and a weekend flag."""
        per_day = self.meta["slots_per_day"]
        angle = 2 * np.pi * ((self.slot % per_day) + 0.5) / per_day
        weekend = np.array([dt.date.fromisoformat(t[:10]).weekday() >= 5 for t in self.times], dtype=np.float32)
        return np.stack([np.sin(angle), np.cos(angle), weekend], 1).astype(np.float32)


class GridWindows(Dataset):
    """Windows of ``context + horizon`` consecutive slots starting at rows ``starts``, as batches of
    ``x`` ``(B, T, C, H, W)`` (the grids divided by ``scale``), ``history`` (the same shape: each slot's
    historical average, see :class:`GridDataModule`) and ``cond`` ``(B, T - 1, E + 2C, H, W)``: what
    is known in advance when slot t is read to predict slot t + 1, i.e. slot t + 1's known values
    ``(E,)`` spread over the grid, then the historical averages of slots t and t + 1."""

    def __init__(self, grids: np.ndarray, average: np.ndarray, known: np.ndarray, starts: np.ndarray, window: int):
        self.grids, self.average, self.known, self.starts, self.window = grids, average, known, starts, window

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, items: list[int]) -> dict:
        steps = self.starts[items][:, None] + np.arange(self.window)
        x, history = torch.from_numpy(self.grids[steps]), torch.from_numpy(self.average[steps])
        known = torch.from_numpy(self.known[steps[:, 1:]])[..., None, None].expand(-1, -1, -1, *x.shape[-2:])
        return {"x": x, "history": history, "cond": torch.cat([known, history[:, :-1], history[:, 1:]], 2)}


class GridDataModule(pl.LightningDataModule):
    """Windows of a grid store for multi-step forecasting: the last ``context`` slots, the next
    ``horizon``. A window belongs to the split of its target slots (all in one split; the context may
    reach into the days before); windows across a gap in the series are left out.

    Every slot's historical average is the mean of the same slot of the day on the same weekday of
    the previous ``history_weeks`` weeks (those the series has; windows with a slot that has none are
    left out). It is the historical-average baseline of the target slots, and, being known in advance,
    the forecaster reads it for every slot, with the time of day and the day type
    (:meth:`GridStore.covariates`), as ST-ResNet reads its period and trend inputs.

    The forecaster reads ``input_dim`` (channels), ``covariates`` (known channels per slot), ``scale``
    (the standard deviation of the training split's values: grids are divided by it), ``context`` and
    ``horizon`` from here.

    Args:
        grids: grid store folder (output of ``vpipe grids``).
        context: slots given to the model.
        horizon: slots it predicts.
        history_weeks: weeks the historical average looks back.
        batch_size: windows per batch, per device.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (worth it when training on a GPU).
    """

    def __init__(self, grids: str, context: int = 4, horizon: int = 4, history_weeks: int = 4, batch_size: int = 32,
                 num_workers: int = 0, pin_memory: bool = False):
        super().__init__()
        if context < 1 or horizon < 1 or history_weeks < 1:
            raise ValueError(f"context, horizon and history_weeks must be at least 1, got {context}, {horizon}, {history_weeks}")
        self.grids, self.context, self.horizon, self.history_weeks = grids, context, horizon, history_weeks
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.store = store = GridStore(grids)
        values = np.asarray(store.grids, dtype=np.float32)
        self.scale = float(max(values[store.split == "train"].std(dtype=np.float64), 1e-6))
        self.values = values / self.scale
        self.known = store.covariates()
        self.input_dim = int(self.values.shape[1])
        self.covariates = self.known.shape[1] + 2 * self.input_dim
        self.average, has_history = self._historical_average()
        window, n = context + horizon, len(store.slot)
        starts = np.arange(max(0, n - window + 1))
        steps = starts[:, None] + np.arange(window)
        usable = (store.slot[steps[:, -1]] - store.slot[starts] == window - 1) & has_history[steps].all(1)
        self._starts = {}
        for split in ("train", "val", "test"):
            chosen = starts[usable & (store.split[steps[:, context:]] == split).all(1)]
            if not len(chosen):
                raise ValueError(f"{store.root / 'slots.csv'}: no {split} window of {window} consecutive slots "
                                 f"with the same slot up to {history_weeks} week(s) before")
            self._starts[split] = chosen

    def _historical_average(self) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's mean over the same slot 1..``history_weeks`` weeks before, and whether it had any."""
        slot, week = self.store.slot, 7 * int(self.store.meta["slots_per_day"])
        total, count = np.zeros_like(self.values), np.zeros(len(slot), np.int64)
        for w in range(1, self.history_weeks + 1):
            rows = np.minimum(np.searchsorted(slot, slot - w * week), len(slot) - 1)
            found = slot[rows] == slot - w * week
            total[found] += self.values[rows[found]]
            count += found
        return (total / np.maximum(count, 1)[:, None, None, None]).astype(np.float32), count > 0

    def _dataset(self, split: str) -> GridWindows:
        return GridWindows(self.values, self.average, self.known, self._starts[split], self.context + self.horizon)

    def _loader(self, split: str) -> DataLoader:
        return batch_loader(self._dataset(split), split == "train", self.batch_size, self.num_workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def examples(self, count: int) -> dict:
        """Test windows for pictures, the same every time: on the first ``count`` test days, the
        window whose first predicted slot starts at 07:00 (the morning rush on a weekday)."""
        dataset = self._dataset("test")
        per_day = int(self.store.meta["slots_per_day"])
        minute = (self.store.slot[dataset.starts + self.context] % per_day) * (24 * 60 // per_day)
        items = [int(i) for i in np.flatnonzero(minute == 7 * 60)[:count]] or list(range(min(count, len(dataset))))
        return dataset.__getitems__(items)
