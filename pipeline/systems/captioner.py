"""Video captioning over cached features: the encoder-decoder head and the LightningModule (the data
module is in :mod:`pipeline.datasets.caption_clips`).

S2VT-style: a recurrent encoder reads the clip's per-frame features, an LSTM or GRU decoder writes the
caption word by word from the encoder's summary, attending over the encoder's steps (Luong's global
attention). :class:`CaptionModel` is the plain ``nn.Module`` head; :class:`Captioner` owns the loss
(teacher forcing), decoding (greedy for validation, beam search for test and inference), the scores
(:mod:`pipeline.systems.caption_scores`) and logging; ``vpipe caption`` is :mod:`pipeline.inference.describe`. The vocabulary is built from the training captions only and
saved with the model's hyperparameters, so a checkpoint decodes on its own.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from pipeline.datasets.caption_clips import CaptionDataModule
from pipeline.models.caption_decoder import CaptionModel
from pipeline.storage.captions import Vocabulary
from pipeline.systems.caption_scores import nearest_captions, order_accuracy, scores
from pipeline.systems.optim import WarmupCosineAdamW


class Captioner(WarmupCosineAdamW, pl.LightningModule):
    """Video captioning: a :class:`CaptionModel` trained with teacher forcing (cross-entropy per word).

    Validation decodes greedily and reports CIDEr-D (``val/cider``, which selects the checkpoint),
    BLEU-4 and the order metric; test decodes with beam search and also scores two nearest-neighbour
    baselines on the same clips: the caption of the training clip nearest by mean feature
    (``test/nn_mean/...``) and by its ordered steps (``test/nn_seq/...``).

    Args:
        input_dim: features per step (linked from the data module).
        vocabulary: the words (linked from the data module; saved in the checkpoint).
        encoder, decoder, hidden_size, embed_dim, attention, dropout: see :class:`CaptionModel`.
        lr, weight_decay, warmup_epochs: AdamW with warm-up and cosine decay.
        label_smoothing: cross-entropy label smoothing.
        beam_size: beam width for test and ``vpipe caption`` (1: greedy).
        max_length: most words generated.
        length_penalty: beam scores are log-probability / length ** this.
        num_classes: the clips' classes (linked from the data module).
        class_weight: weight of an auxiliary loss, the clip's class predicted from the encoder's
            summary (0: none). It makes the summary the decoder starts from carry what the class
            is about (the motion), not only what the references' other words need.
    """

    def __init__(
        self,
        input_dim: int | None = None,
        vocabulary: list[str] | None = None,
        encoder: Literal["gru", "lstm", "transformer", "meanpool"] = "gru",
        decoder: Literal["gru", "lstm"] = "gru",
        hidden_size: int = 256,
        embed_dim: int = 128,
        attention: bool = True,
        dropout: float = 0.2,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_epochs: int = 1,
        label_smoothing: float = 0.0,
        beam_size: int = 3,
        max_length: int = 20,
        length_penalty: float = 0.7,
        num_classes: int | None = None,
        class_weight: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not input_dim or not vocabulary:
            raise ValueError(
                "input_dim and vocabulary come from the data module (pipeline.datasets.caption_clips.CaptionDataModule)"
            )
        self.vocab = Vocabulary(vocabulary)
        self.model = CaptionModel(
            input_dim, len(self.vocab), encoder, decoder, hidden_size, embed_dim, attention, dropout
        )
        if class_weight < 0 or (class_weight and not num_classes):
            raise ValueError(f"class_weight {class_weight} needs num_classes from the data module and >= 0")
        self.classes = nn.Linear(hidden_size, num_classes) if class_weight else None
        self.losses = nn.ModuleDict(
            {f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("train", "val", "test")}
        )
        self.generated: dict[str, str] = {}  # video id → caption, this rank's, during validation and test
        self.samples: list[
            dict
        ] = []  # the last test's captions: video id, label, references, generated, baseline

    def generate(self, x: torch.Tensor, beam_size: int | None = None) -> list[str]:
        """Captions of a batch of clips ``(B, T, D)``; beam search unless ``beam_size`` is 1."""
        beam = self.hparams.beam_size if beam_size is None else beam_size
        if beam < 1:
            raise ValueError(f"beam size must be at least 1, got {beam}")
        ids = (
            self.model.greedy(x, self.hparams.max_length)
            if beam == 1
            else self.model.beam_search(x, beam, self.hparams.max_length, self.hparams.length_penalty)
        )
        return [self.vocab.decode(i) for i in ids]

    def _loss(self, batch: dict, stage: str) -> torch.Tensor:
        tokens = batch["tokens"]
        memory, state = self.model.encode(batch["x"])
        logits = self.model.step(tokens[:, :-1], state, memory)[0]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            tokens[:, 1:].flatten(),
            ignore_index=Vocabulary.PAD,
            label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0,
        )
        if self.classes is not None and stage == "train":
            summary = state[1]
            loss = loss + self.hparams.class_weight * F.cross_entropy(
                self.classes(summary).float(), batch["y"]
            )
        self.losses[f"{stage}_loss"].update(loss.detach(), len(tokens))
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("train/loss", self.losses["train_loss"], on_step=False, on_epoch=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def _evaluate(self, batch: dict, stage: str) -> None:
        self._loss(batch, stage)
        beam = 1 if stage == "val" else None
        self.generated.update(zip(batch["video_id"], self.generate(batch["x"], beam), strict=True))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.generated = {}

    on_test_epoch_start = on_validation_epoch_start

    def _all_generated(self) -> dict[str, str]:
        """Every rank's captions (each clip is evaluated on one rank: an unrepeated sampler)."""
        if self.trainer.world_size == 1:
            return self.generated
        parts: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, self.generated)
        return {k: v for part in parts for k, v in part.items()}

    def _scores(self, generated: dict[str, str], dm: CaptionDataModule) -> dict[str, float]:
        values = scores(dm.references, generated)
        if dm.keywords:
            values["order"] = order_accuracy(generated, dm.labels, dm.keywords)
        return values

    def _log_epoch(self, stage: str) -> dict[str, str]:
        dm = self.trainer.datamodule
        generated = self._all_generated()
        values = {f"{stage}/loss": self.losses[f"{stage}_loss"].compute()}
        self.losses[f"{stage}_loss"].reset()
        if generated:  # empty in the sanity check
            values.update({f"{stage}/{k}": v for k, v in self._scores(generated, dm).items()})
        # Every rank computed the same scores from the same gathered captions: no sync needed.
        self.log_dict(values, prog_bar=True, sync_dist=False)
        return generated

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        generated = self._log_epoch("test")
        if not generated:
            return
        dm = self.trainer.datamodule
        train_ids, train_x = dm.clip_features("train")
        test_ids, test_x = dm.clip_features("test")
        test_ids, test_x = zip(
            *[(v, x) for v, x in zip(test_ids, test_x, strict=True) if v in generated], strict=True
        )
        test_x = np.stack(test_x)
        # Two nearest-neighbour baselines: by the clip's mean feature (the usual video-level retrieval
        # descriptor, blind to order) and by its ordered steps.
        nearest = {
            "nn_mean": nearest_captions(
                train_x.mean(1), train_ids, dm.references, test_x.mean(1), list(test_ids)
            ),
            "nn_seq": nearest_captions(train_x, train_ids, dm.references, test_x, list(test_ids)),
        }
        for name, captions in nearest.items():
            self.log_dict(
                {f"test/{name}/{k}": v for k, v in self._scores(captions, dm).items()}, sync_dist=False
            )
        self.samples = [
            {
                "video_id": v,
                "label": dm.labels[v],
                "generated": generated[v],
                **{name: captions[v] for name, captions in nearest.items()},
                "references": " | ".join(dm.references[v]),
            }
            for v in sorted(generated)
        ]
