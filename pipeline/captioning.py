"""Video captioning over cached features: the data module, the encoder-decoder head and the LightningModule.

S2VT-style: a recurrent encoder reads the clip's per-frame features, an LSTM or GRU decoder writes the
caption word by word from the encoder's summary, attending over the encoder's steps (Luong's global
attention). :class:`CaptionModel` is the plain ``nn.Module`` head; :class:`Captioner` owns the loss
(teacher forcing), decoding (greedy for validation, beam search for test and inference), the scores
(:mod:`pipeline.captions`) and logging. The vocabulary is built from the training captions only and
saved with the model's hyperparameters, so a checkpoint decodes on its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.captions import (
    KEYWORDS,
    Vocabulary,
    nearest_captions,
    order_accuracy,
    read_captions,
    read_keywords,
    scores,
)
from pipeline.data import FeatureClips, FeatureDataModule, read_rows
from pipeline.heads import last_valid, masked_mean
from pipeline.stores import FeatureStore, IndexRow
from pipeline.tasks import adamw_warmup_cosine


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
        batch = self.clips.__getitems__(rows)  # features (B, T, D), mask, y; creates the clips' generator
        rng = self.clips._rng
        chosen = [refs[rng.integers(len(refs))] if self.clips.train else refs[0] for refs in (self.tokens[r] for r in rows)]
        tokens = torch.zeros(len(rows), max(map(len, chosen)), dtype=torch.int64)  # Vocabulary.PAD is 0
        for i, ids in enumerate(chosen):
            tokens[i, :len(ids)] = torch.tensor(ids)
        return {**batch, "tokens": tokens, "video_id": [self.clips.rows[r].video_id for r in rows]}


class CaptionDataModule(FeatureDataModule):
    """Cached features of one dataset with reference captions (see :mod:`pipeline.captions`).

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

    def __init__(self, features: str, captions: str, appearance: str | None = None, keywords: str | None = None, num_segments: int = 8, batch_size: int = 64,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 0, feature_noise: float = 0.0,
                 feature_dropout: float = 0.0, max_length: int = 20, min_count: int = 1, repeats: int = 4):
        super().__init__(features, num_segments, batch_size, num_workers, pin_memory, seed, feature_noise, feature_dropout)
        self.captions_path, self.max_length, self.repeats = Path(captions), max_length, repeats
        self.appearance = appearance
        self.others: list[tuple[FeatureStore, dict[str, IndexRow]]] = []
        if appearance:
            other = FeatureStore(appearance)
            if other.meta.get("frames_hash") != self.store.meta.get("frames_hash"):
                raise ValueError(f"{appearance}: computed from other frames than {features} (frames_hash differs)")
            self.others.append((other, {r.video_id: r for r in other.index}))
            self.input_dim += int(np.prod(other.feature_shape))
        self.references = read_captions(captions)
        self._splits = {s: [r for r in rows if r.video_id in self.references] for s, rows in self._splits.items()}
        if not self._splits["train"]:
            raise ValueError(f"{captions}: no captions for the training videos of {features}")
        default = self.captions_path.with_name(KEYWORDS)
        path = Path(keywords) if keywords else default if default.is_file() else None
        self.keywords = read_keywords(path) if path else None
        self.vocab = Vocabulary.build((c for r in self._splits["train"] for c in self.references[r.video_id]), min_count)
        self.labels = {r.video_id: r.label for rows in self._splits.values() for r in rows}

    @property
    def vocabulary(self) -> list[str]:
        """Linked to the model's ``vocabulary``: the training captions' words."""
        return self.vocab.words

    def _dataset(self, split: str) -> CaptionClips:
        rows = self._splits[split]
        tokens = [[self.vocab.encode(c, self.max_length) for c in self.references[r.video_id]] for r in rows]
        return CaptionClips(self._clips(split), tokens, self.repeats if split == "train" else 1)

    def _clips(self, split: str) -> StackedClips:
        return StackedClips(self.store, self._splits[split], self.classes, self.num_segments, split == "train", self.seed,
                            self.feature_noise, self.feature_dropout, others=self.others)

    def clip_features(self, split: str) -> tuple[list[str], np.ndarray]:
        """Video ids and evaluation clips ``(N, T, D)`` (segment centres) of ``split``: what the baseline compares."""
        clips = self._clips(split)
        clips.train = False
        x = clips.__getitems__(list(range(len(clips))))["x"].numpy() if len(clips) else np.zeros((0, self.num_segments, self.input_dim))
        return [r.video_id for r in self._splits[split]], x

    def predict_dataloader(self) -> DataLoader:
        raise NotImplementedError("captions are written by `vpipe caption`; vpipe predict is for classifiers")


def _rnn(cell: str, input_size: int, hidden_size: int) -> nn.RNNBase:
    if cell not in ("gru", "lstm"):
        raise ValueError(f"cell must be gru or lstm, got {cell!r}")
    return (nn.GRU if cell == "gru" else nn.LSTM)(input_size, hidden_size, batch_first=True)


class CaptionModel(nn.Module):
    """Encoder-decoder captioning head over per-frame features ``(B, T, D)``.

    Args:
        input_dim: features per step.
        vocab_size: words, with the four specials of :class:`~pipeline.captions.Vocabulary`.
        encoder: ``gru`` or ``lstm`` (reads the steps in order), or ``meanpool`` (the order-blind
            baseline: one vector, the mean of the steps).
        decoder: ``gru`` or ``lstm``.
        hidden_size: encoder and decoder width.
        embed_dim: word embedding size.
        attention: attend over the encoder's steps at every word (Luong's global attention).
        dropout: on the projected features and before the output layer.
    """

    def __init__(self, input_dim: int, vocab_size: int, encoder: Literal["gru", "lstm", "meanpool"] = "gru",
                 decoder: Literal["gru", "lstm"] = "gru", hidden_size: int = 256, embed_dim: int = 128,
                 attention: bool = True, dropout: float = 0.2):
        super().__init__()
        self.encoder_type, self.decoder_type, self.attention = encoder, decoder, attention
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(input_dim, hidden_size), nn.GELU())
        self.encoder = None if encoder == "meanpool" else _rnn(encoder, hidden_size, hidden_size)
        self.init_state = nn.Linear(hidden_size, hidden_size)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.PAD)
        self.decoder = _rnn(decoder, embed_dim + hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden_size if attention else hidden_size, vocab_size)

    def encode(self, x: torch.Tensor, mask: torch.Tensor):
        """``(memory (B, S, H), memory mask (B, S), (decoder state, clip summary (B, H)))`` of features ``(B, T, D)``."""
        h = self.project(x)
        if self.encoder is None:
            summary = masked_mean(h, mask)
            memory, memory_mask = summary[:, None], torch.ones_like(mask[:, :1])
        else:
            memory, _ = self.encoder(h)
            summary, memory_mask = last_valid(memory, mask), mask
        h0 = torch.tanh(self.init_state(summary))[None]
        state = (h0, torch.zeros_like(h0)) if self.decoder_type == "lstm" else h0
        return memory, memory_mask, (state, summary)

    def step(self, tokens: torch.Tensor, state, memory: torch.Tensor, memory_mask: torch.Tensor):
        """Logits ``(B, L, V)`` of the words after ``tokens`` ``(B, L)``, and the decoder's new state. The clip's
        summary is an input at every word, beside the previous word (as in S2VT's second layer)."""
        state, summary = state
        words = self.embed(tokens)
        y, state = self.decoder(torch.cat([words, summary[:, None].expand(-1, words.shape[1], -1)], -1), state)
        if self.attention:
            weights = (y @ memory.transpose(1, 2)) / math.sqrt(y.shape[-1])  # (B, L, S)
            weights = weights.masked_fill(~memory_mask[:, None, :], float("-inf")).softmax(-1)
            y = torch.cat([y, weights @ memory], -1)
        return self.out(self.dropout(y)), (state, summary)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``(B, L, V)`` of each next word of ``tokens`` ``(B, L)`` (which start with BOS)."""
        memory, memory_mask, state = self.encode(x, mask)
        return self.step(tokens, state, memory, memory_mask)[0]

    @torch.no_grad()
    def greedy(self, x: torch.Tensor, mask: torch.Tensor, max_length: int) -> list[list[int]]:
        """The most likely word at every step, for a batch; at most ``max_length`` words each, without BOS/EOS."""
        memory, memory_mask, state = self.encode(x, mask)
        token = torch.full((len(x), 1), Vocabulary.BOS, dtype=torch.int64, device=x.device)
        words, done = [], torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(max_length + 1):
            logits, state = self.step(token, state, memory, memory_mask)
            token = logits[:, -1].argmax(-1, keepdim=True)
            done |= token[:, 0] == Vocabulary.EOS
            words.append(token[:, 0])
            if done.all():
                break
        out = []
        for row in torch.stack(words, 1).tolist():
            out.append(row[:row.index(Vocabulary.EOS)] if Vocabulary.EOS in row else row[:max_length])
        return out

    @torch.no_grad()
    def beam_search(self, x: torch.Tensor, mask: torch.Tensor, beam_size: int, max_length: int,
                    length_penalty: float = 0.7) -> list[list[int]]:
        """Beam search per clip: ``beam_size`` partial captions kept at every step; a caption ends when one of
        the ``beam_size`` best candidates is EOS; the search ends when ``beam_size`` have ended (or at
        ``max_length`` words). The best by log-probability / length ** ``length_penalty`` wins. Width 1
        is greedy decoding."""
        out = []
        for i in range(len(x)):
            memory, memory_mask, state = self.encode(x[i:i + 1], mask[i:i + 1])
            beams, scores_ = [[]], torch.zeros(1, device=x.device)
            last = torch.full((1, 1), Vocabulary.BOS, dtype=torch.int64, device=x.device)
            finished: list[tuple[float, list[int]]] = []
            for length in range(max_length + 1):
                k = len(beams)
                logits, state = self.step(last, state, memory.expand(k, -1, -1), memory_mask.expand(k, -1))
                total = (scores_[:, None] + logits[:, -1].float().log_softmax(-1)).flatten()
                if length == max_length:  # out of words: every beam ends here
                    finished += [(float(s) / max(1, len(b)) ** length_penalty, b) for s, b in zip(scores_.tolist(), beams, strict=True)]
                    break
                top = total.topk(min(2 * beam_size, len(total)))
                keep = []
                for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                    beam, word = divmod(index, logits.shape[-1])
                    if word == Vocabulary.EOS:
                        if rank < beam_size:
                            finished.append((score / max(1, len(beams[beam])) ** length_penalty, beams[beam]))
                    elif len(keep) < beam_size:
                        keep.append((beam, word, score))
                if len(finished) >= beam_size or not keep:
                    break
                index = torch.tensor([b for b, _, _ in keep], device=x.device)
                rnn_state, summary = state
                rnn_state = tuple(s[:, index] for s in rnn_state) if isinstance(rnn_state, tuple) else rnn_state[:, index]
                state = (rnn_state, summary[index])
                beams = [beams[b] + [w] for b, w, _ in keep]
                scores_ = torch.tensor([s for _, _, s in keep], device=x.device)
                last = torch.tensor([[w] for _, w, _ in keep], device=x.device)
            out.append(max(finished, key=lambda f: f[0])[1])
        return out


class Captioner(pl.LightningModule):
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
    """

    def __init__(self, input_dim: int = 0, vocabulary: list[str] | None = None, encoder: Literal["gru", "lstm", "meanpool"] = "gru",
                 decoder: Literal["gru", "lstm"] = "gru", hidden_size: int = 256, embed_dim: int = 128, attention: bool = True,
                 dropout: float = 0.2, lr: float = 2e-3, weight_decay: float = 0.01, warmup_epochs: int = 1,
                 label_smoothing: float = 0.0, beam_size: int = 3, max_length: int = 20, length_penalty: float = 0.7):
        super().__init__()
        self.save_hyperparameters()
        if input_dim <= 0 or not vocabulary:
            raise ValueError("input_dim and vocabulary come from the data module (pipeline.captioning.CaptionDataModule)")
        self.vocab = Vocabulary(vocabulary)
        self.model = CaptionModel(input_dim, len(self.vocab), encoder, decoder, hidden_size, embed_dim, attention, dropout)
        self.losses = nn.ModuleDict({f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("train", "val", "test")})
        self.generated: dict[str, str] = {}  # video id → caption, this rank's, during validation and test
        self.samples: list[dict] = []  # the last test's captions: video id, label, references, generated, baseline

    def generate(self, x: torch.Tensor, mask: torch.Tensor, beam_size: int | None = None) -> list[str]:
        """Captions of a batch of clips ``(B, T, D)``; beam search unless ``beam_size`` is 1."""
        beam = self.hparams.beam_size if beam_size is None else beam_size
        if beam < 1:
            raise ValueError(f"beam size must be at least 1, got {beam}")
        ids = (self.model.greedy(x, mask, self.hparams.max_length) if beam == 1 else
               self.model.beam_search(x, mask, beam, self.hparams.max_length, self.hparams.length_penalty))
        return [self.vocab.decode(i) for i in ids]

    def _loss(self, batch: dict, stage: str) -> torch.Tensor:
        tokens = batch["tokens"]
        logits = self.model(batch["x"], batch["mask"], tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=Vocabulary.PAD,
                               label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        self.losses[f"{stage}_loss"].update(loss.detach(), len(tokens))
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("train/loss", self.losses["train_loss"], on_step=False, on_epoch=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def _evaluate(self, batch: dict, stage: str) -> None:
        self._loss(batch, stage)
        beam = 1 if stage == "val" else None
        self.generated.update(zip(batch["video_id"], self.generate(batch["x"], batch["mask"], beam), strict=True))

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
        test_ids, test_x = zip(*[(v, x) for v, x in zip(test_ids, test_x, strict=True) if v in generated], strict=True)
        test_x = np.stack(test_x)
        # Two nearest-neighbour baselines: by the clip's mean feature (the usual video-level retrieval
        # descriptor, blind to order) and by its ordered steps.
        nearest = {"nn_mean": nearest_captions(train_x.mean(1), train_ids, dm.references, test_x.mean(1), list(test_ids)),
                   "nn_seq": nearest_captions(train_x, train_ids, dm.references, test_x, list(test_ids))}
        for name, captions in nearest.items():
            self.log_dict({f"test/{name}/{k}": v for k, v in self._scores(captions, dm).items()}, sync_dist=False)
        self.samples = [{"video_id": v, "label": dm.labels[v], "generated": generated[v],
                         **{name: captions[v] for name, captions in nearest.items()},
                         "references": " | ".join(dm.references[v])} for v in sorted(generated)]

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_epochs)


class CaptionReport(pl.Callback):
    """After a captioner's test: ``folder/captions.csv`` (video id, label, generated, the nearest-neighbour
    baselines' captions, references), also an MLflow table artifact ``captions.json`` the run page shows."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(pl_module, "samples", None)
        if not isinstance(pl_module, Captioner) or not samples or not trainer.is_global_zero:
            return
        import csv

        from pytorch_lightning.loggers import MLFlowLogger

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "captions.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(samples[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(samples)
        table = {key: [s[key] for s in samples] for key in samples[0]}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_table(logger.run_id, data=table, artifact_file="captions.json")


def run(paths: list[str], *, ckpt: str | None = None, model_uri: str | None = None, beam: int | None = None,
        as_json: bool = False, weights: str | None = None, device: str = "cpu", out=print, err=None) -> int:
    """``vpipe caption``: one caption per video or still image (a one-frame video), decoded and featurised
    as the model's stores were (see :mod:`pipeline.classify`); returns the exit status.

    The model and the files' existence are checked first (a :class:`~pipeline.classify.ClassifyError`
    stops the command with nothing printed); a file that fails to decode is reported on ``err``, the
    others are still captioned, and the status is 1.
    """
    import json
    import sys
    import tempfile

    from pipeline.classify import ClassifyError, fetch, load, windows

    err = err or (lambda text: print(text, file=sys.stderr))
    if (ckpt is None) == (model_uri is None):
        raise ClassifyError("give --ckpt CKPT or --model models:/NAME/VERSION")
    if beam is not None and beam < 1:
        raise ClassifyError(f"--beam must be at least 1, got {beam}")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ClassifyError("; ".join(f"{p}: no such file" for p in missing))
    with tempfile.TemporaryDirectory(prefix="vpipe-caption-") as tmp:
        path = fetch(model_uri, Path(tmp)) if model_uri else Path(ckpt)
        loaded = load(path, weights=weights, device=device, source=model_uri or ckpt, task="Captioner", command="vpipe caption")
    failed = 0
    for video in paths:
        try:
            (_, _, frames), = windows(Path(video), loaded.fps, loaded.size, None, None)
            with torch.inference_mode():
                caption = loaded.model.generate(*loaded.inputs(frames), beam_size=beam)[0]
        except ClassifyError as error:
            err(f"vpipe caption: {error}")
            failed += 1
            continue
        out(json.dumps({"video": video, "caption": caption}) if as_json else f"{video}: {caption}")
    return 1 if failed else 0
