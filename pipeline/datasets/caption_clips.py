"""Captioning data: clips of a feature store with their reference captions (:class:`CaptionDataModule`,
the vocabulary built from the training captions only). The captioner is in :mod:`pipeline.systems.captioner`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.datasets.clips import FeatureClips, FeatureDataModule
from pipeline.datasets.loaders import read_rows
from pipeline.storage.captions import KEYWORDS, Vocabulary, read_captions, read_keywords
from pipeline.storage.store import FeatureStore, IndexRow


class StackedClips(FeatureClips):
    """:class:`FeatureClips` of several feature stores of the same frames: the same steps of each video,
    their features concatenated per step (``others``: ``(store, {video_id: row})`` pairs)."""

    def __init__(self, *args, others: list[tuple[FeatureStore, dict[str, IndexRow]]] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.others = list(others)

    def _clips(self, rows: list[IndexRow], steps: np.ndarray) -> torch.Tensor:
        parts = [super()._clips(rows, steps)]
        for store, index in self.others:
            matched = [index[r.video_id] for r in rows]
            parts.append(torch.from_numpy(read_rows(store, matched, steps)).flatten(2).float())
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


class CaptionClips(Dataset):
    """Clips of one split with their encoded captions: ``repeats`` passes over the clips per epoch, each
    item a random reference when training, the first one when evaluating."""

    def __init__(self, clips: FeatureClips, tokens: list[list[list[int]]], repeats: int = 1):
        self.clips, self.tokens, self.repeats = clips, tokens, repeats

    def __len__(self) -> int:
        return len(self.clips) * self.repeats

    def __getitems__(self, items: list[int]) -> dict:
        rows = [i % len(self.clips) for i in items]
        batch = self.clips.__getitems__(rows)  # features (B, T, D), y; creates the clips' generator
        rng = self.clips._rng
        chosen = [
            refs[rng.integers(len(refs))] if self.clips.train else refs[0]
            for refs in (self.tokens[r] for r in rows)
        ]
        tokens = torch.zeros(len(rows), max(map(len, chosen)), dtype=torch.int64)  # Vocabulary.PAD is 0
        for i, ids in enumerate(chosen):
            tokens[i, : len(ids)] = torch.tensor(ids)
        return {**batch, "tokens": tokens, "video_id": [self.clips.rows[r].video_id for r in rows]}


class CaptionDataModule(FeatureDataModule):
    """Cached features of one dataset with reference captions (see :mod:`pipeline.storage.captions`).

    Args:
        features: the feature store folder (output of ``vpipe features``).
        appearance: another feature store of the same frames (e.g. a frozen ImageNet CNN, whose features keep
            colours and shapes that a backbone trained on motion discards), concatenated per step.
        captions: ``captions.csv`` of the same videos (``video_id,caption``, many rows per video).
        keywords: ``caption_keywords.json`` for the order metric (default: the one beside ``captions``, if any).
        num_segments: steps per clip (TSN segments).
        batch_size: captions per batch, per device.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (worth it when training on a GPU).
        seed: seeds the training jitter and the choice of reference.
        feature_noise: training only: multiply features by ``1 + feature_noise * N(0, 1)``.
        feature_dropout: training only: zero this fraction of feature values (rescaling the rest).
        max_length: words kept per caption.
        min_count: words seen fewer times in the training captions are unknown (``<unk>``).
        repeats: passes over the training clips per epoch (each with a fresh reference and jitter).
    """

    clips_type = StackedClips

    def __init__(
        self,
        features: str,
        captions: str,
        appearance: str | None = None,
        keywords: str | None = None,
        num_segments: int = 8,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        feature_noise: float = 0.0,
        feature_dropout: float = 0.0,
        max_length: int = 20,
        min_count: int = 1,
        repeats: int = 4,
    ):
        super().__init__(
            features, num_segments, batch_size, num_workers, pin_memory, seed, feature_noise, feature_dropout
        )
        self.captions_path, self.max_length, self.repeats = Path(captions), max_length, repeats
        self.appearance = appearance
        self.others: list[tuple[FeatureStore, dict[str, IndexRow]]] = []
        self.clip_options["others"] = self.others
        if appearance:
            other = FeatureStore(appearance)
            if other.meta.get("frames_hash") != self.store.meta.get("frames_hash"):
                raise ValueError(
                    f"{appearance}: computed from other frames than {features} (frames_hash differs)"
                )
            self.others.append((other, {r.video_id: r for r in other.index}))
            self.input_dim += int(np.prod(other.feature_shape))
        self.references = read_captions(captions)
        self._splits = {
            s: [r for r in rows if r.video_id in self.references] for s, rows in self._splits.items()
        }
        if not self._splits["train"]:
            raise ValueError(f"{captions}: no captions for the training videos of {features}")
        default = self.captions_path.with_name(KEYWORDS)
        path = Path(keywords) if keywords else default if default.is_file() else None
        self.keywords = read_keywords(path) if path else None
        self.vocab = Vocabulary.build(
            (c for r in self._splits["train"] for c in self.references[r.video_id]), min_count
        )
        self.labels = {r.video_id: r.label for rows in self._splits.values() for r in rows}

    @property
    def vocabulary(self) -> list[str]:
        """Linked to the model's ``vocabulary``: the training captions' words."""
        return self.vocab.words

    def _dataset(self, split: str) -> CaptionClips:
        rows = self._splits[split]
        tokens = [[self.vocab.encode(c, self.max_length) for c in self.references[r.video_id]] for r in rows]
        return CaptionClips(self._clips(split), tokens, self.repeats if split == "train" else 1)

    def clip_features(self, split: str) -> tuple[list[str], np.ndarray]:
        """Video ids and evaluation clips ``(N, T, D)`` (segment centres) of ``split``: what the baseline compares."""
        clips = self._clips(split)
        clips.train = False
        x = (
            clips.__getitems__(list(range(len(clips))))["x"].numpy()
            if len(clips)
            else np.zeros((0, self.num_segments, self.input_dim))
        )
        return [r.video_id for r in self._splits[split]], x

    def predict_dataloader(self) -> DataLoader:
        raise NotImplementedError("captions are written by `vpipe caption`; vpipe predict is for classifiers")
