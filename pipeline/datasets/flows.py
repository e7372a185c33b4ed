"""Grid forecasting data: windows of a grid store (:mod:`pipeline.storage.grids`) with what is known in advance
of every slot, and the historical-average baseline (:class:`GridDataModule`)."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from pipeline.datasets.loaders import SplitLoaders
from pipeline.storage.grids import GridStore


class GridWindows(Dataset):
    """Windows of ``context + horizon`` consecutive slots starting at rows ``starts``, as batches of
    ``x`` ``(B, T, C, H, W)`` (the grids divided by ``scale``), ``history`` (the same shape: each slot's
    historical average, see :class:`GridDataModule`) and ``cond`` ``(B, T - 1, E + 2C, H, W)``: what
    is known in advance when slot t is read to predict slot t + 1, i.e. slot t + 1's known values
    ``(E,)`` spread over the grid, then the historical averages of slots t and t + 1."""

    def __init__(
        self, grids: np.ndarray, average: np.ndarray, known: np.ndarray, starts: np.ndarray, window: int
    ):
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


class GridDataModule(SplitLoaders, pl.LightningDataModule):
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

    def __init__(
        self,
        grids: str,
        context: int = 4,
        horizon: int = 4,
        history_weeks: int = 4,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        if context < 1 or horizon < 1 or history_weeks < 1:
            raise ValueError(
                f"context, horizon and history_weeks must be at least 1, got {context}, {horizon}, {history_weeks}"
            )
        self.inputs = {"grids": str(grids)}
        self.context, self.horizon, self.history_weeks = context, horizon, history_weeks
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
                raise ValueError(
                    f"{store.root / 'slots.csv'}: no {split} window of {window} consecutive slots "
                    f"with the same slot up to {history_weeks} week(s) before"
                )
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
        return GridWindows(
            self.values, self.average, self.known, self._starts[split], self.context + self.horizon
        )

    def examples(self, count: int) -> dict:
        """Test windows for pictures, the same every time: on the first ``count`` test days, the
        window whose first predicted slot starts at 07:00 (the morning rush on a weekday)."""
        dataset = self._dataset("test")
        per_day = int(self.store.meta["slots_per_day"])
        minute = (self.store.slot[dataset.starts + self.context] % per_day) * (24 * 60 // per_day)
        items = [int(i) for i in np.flatnonzero(minute == 7 * 60)[:count]] or list(
            range(min(count, len(dataset)))
        )
        return dataset.__getitems__(items)
