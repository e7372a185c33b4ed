"""What every dataset of the pipeline shares: reading rows of a store in one pass per shard, a random
generator per DataLoader process, and DataLoaders over datasets that build whole batches."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.storage.store import FeatureStore, FrameStore, IndexRow, StoreError


def already_batched(batch: dict) -> dict:
    """The DataLoader's collate_fn: the datasets' ``__getitems__`` return whole batches."""
    return batch


class UnpaddedSampler(DistributedSampler):
    """A DistributedSampler for evaluation: rank r takes samples r, r + world size, ..., with no sample
    repeated to even the ranks out (torch's pads), so each sample is counted exactly once."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, shuffle=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


def batch_loader(
    dataset: Dataset, train: bool, batch_size: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader over a dataset whose ``__getitems__`` builds whole batches: shuffled for training;
    for evaluation under DDP, each sample on exactly one rank."""
    sampler = None
    if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning's default DistributedSampler pads by repeating samples; evaluation must count each once.
        sampler = UnpaddedSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=already_batched,
    )


class SplitLoaders:
    """The train, val and test DataLoaders of a LightningDataModule that builds one dataset per split
    (``_dataset(split)``) and has ``batch_size``, ``num_workers`` and ``pin_memory``; ``inputs`` names
    the stores it reads by kind (``{"features": path}``, ``{"frames": path}``, ``{"grids": path}``)."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    inputs: dict[str, str]

    def _dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str) -> DataLoader:
        return batch_loader(
            self._dataset(split), split == "train", self.batch_size, self.num_workers, self.pin_memory
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def process_generator(seed: int) -> np.random.Generator:
    """A generator for this process: torch gives each DataLoader worker its own seed
    (``seed_everything(workers=True)``), so workers draw different numbers, reproducibly."""
    return np.random.default_rng([seed, torch.initial_seed() % 2**32])


def read_rows(store: FeatureStore | FrameStore, rows: list[IndexRow], steps: np.ndarray) -> np.ndarray:
    """Rows ``steps`` ``(B, T)`` (counted from each video's first row) of the videos ``rows``, in the
    store's dtype, ``(B, T, *row_shape)``: one fancy-index read per shard."""
    starts = np.array([row.offset for row in rows])[:, None] + steps
    shards = np.array([row.shard for row in rows])
    x: np.ndarray | None = None
    for shard in np.unique(shards):
        chosen = shards == shard
        data = store.shard(int(shard))
        if starts[chosen].max() >= len(data):
            raise StoreError(f"{store.shard_path(int(shard))}: holds {len(data)} rows, index needs more")
        if x is None:
            x = np.empty((len(rows), steps.shape[1], *data.shape[1:]), data.dtype)
        x[chosen] = data[starts[chosen].ravel()].reshape(int(chosen.sum()), steps.shape[1], *data.shape[1:])
    return x
