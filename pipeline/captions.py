"""Reference captions: the files, the words, and the scores of generated captions.

A dataset folder may hold, beside its manifest:

- ``captions.csv``: ``video_id,caption``, one row per reference caption, many rows per video (as
  MSR-VTT and MSVD have about 20 and 40). Every id must be a video of the manifest; no caption may be
  empty. ``vpipe check`` reads it when it lies beside the manifest (or with ``--captions FILE``).
- ``caption_keywords.json`` (optional): ``{label: [phrase, ...]}``, the words that name each class's
  motion and direction. With it, the captioning task reports the **order metric**: the share of clips
  whose generated caption names its own class's motion (a phrase of its label) and no other class's.

Scores come from ``pycocoevalcap``, the MS-COCO caption evaluation code that MSR-VTT and MSVD results
are reported with: BLEU-1..4, ROUGE-L and CIDEr-D (its ``Cider`` is the CIDEr-D variant: clipped
n-gram counts and a length penalty, sigma 6). Captions are lower-cased and split into words by
:func:`tokenize` first (instead of the Stanford tokenizer, which needs Java).

This module needs no torch: the dataset generators import it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

CAPTIONS = "captions.csv"
KEYWORDS = "caption_keywords.json"


class CaptionError(ValueError):
    """A captions file cannot be used; the message names the file and the problems."""


def tokenize(text: str) -> list[str]:
    """Lower-cased words: ``"The red disc, moving LEFT."`` → ``["the", "red", "disc", "moving", "left"]``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def write_captions(
    folder: str | os.PathLike, rows: Iterable[tuple[str, str]], keywords: dict[str, list[str]] | None = None
) -> None:
    """Write ``captions.csv`` (and ``caption_keywords.json`` when ``keywords`` are given) into ``folder``."""
    folder = Path(folder)
    with open(folder / CAPTIONS, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["video_id", "caption"])
        writer.writerows(rows)
    if keywords is not None:
        (folder / KEYWORDS).write_text(json.dumps(keywords, indent=2, sort_keys=True) + "\n")


def read_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{video_id: [caption, ...]}`` in file order.

    Raises:
        CaptionError: no such file, missing columns, or empty captions (the lines are named).
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"{path}: captions file not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"video_id", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise CaptionError(
                f"{path}: missing column(s) {', '.join(sorted(missing))} (expected video_id,caption)"
            )
        out: dict[str, list[str]] = {}
        empty = []
        for line, row in enumerate(reader, start=2):
            video, text = (row["video_id"] or "").strip(), row["caption"] or ""
            if not video or not tokenize(text):
                empty.append(line)
                continue
            out.setdefault(video, []).append(text.strip())
    if empty:
        raise CaptionError(
            f"{path}: {len(empty)} row(s) with an empty id or caption, line(s) "
            f"{', '.join(map(str, empty[:5]))}{' …' if len(empty) > 5 else ''}"
        )
    if not out:
        raise CaptionError(f"{path}: no captions")
    return out


def check_captions(
    path: str | os.PathLike, labels: dict[str, str], show: int = 5
) -> tuple[list[str], list[str]]:
    """Problems and warnings of a captions file against the manifest's ``{video_id: label}``.

    Problems: the file is unreadable, names videos the manifest lacks, holds empty captions, or its
    keywords file names unknown labels. Warnings: videos without captions.
    """
    path = Path(path)
    try:
        captions = read_captions(path)
    except CaptionError as err:
        return [str(err)], []
    errors, warnings = [], []
    unknown = [v for v in captions if v not in labels]
    if unknown:
        errors.append(
            f"{path}: {len(unknown)} video id(s) not in the manifest: {', '.join(unknown[:show])}"
            f"{' …' if len(unknown) > show else ''}"
        )
    uncaptioned = [v for v in labels if v not in captions]
    if uncaptioned:
        warnings.append(
            f"{path}: {len(uncaptioned)} video(s) without captions: {', '.join(uncaptioned[:show])}"
            f"{' …' if len(uncaptioned) > show else ''}"
        )
    keywords = path.with_name(KEYWORDS)
    if keywords.is_file():
        try:
            strange = sorted(set(read_keywords(keywords)) - set(labels.values()))
        except CaptionError as err:
            errors.append(str(err))
        else:
            if strange:
                errors.append(f"{keywords}: label(s) not in the manifest: {', '.join(strange[:show])}")
    return errors, warnings


def read_keywords(path: str | os.PathLike) -> dict[str, list[tuple[str, ...]]]:
    """``{label: [phrase as a word tuple, ...]}`` of a ``caption_keywords.json``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not all(isinstance(v, list) and v for v in raw.values()):
            raise ValueError("expected {label: [phrase, ...]} with at least one phrase per label")
        return {label: [tuple(tokenize(p)) for p in phrases] for label, phrases in raw.items()}
    except (OSError, ValueError) as err:
        raise CaptionError(f"{path}: {err}") from err


class Vocabulary:
    """Words ↔ indices. Index 0 pads, 1 starts and 2 ends a caption, 3 stands for unknown words."""

    SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
    PAD, BOS, EOS, UNK = range(4)

    def __init__(self, words: list[str]):
        if words[:4] != self.SPECIALS:
            raise ValueError(f"a vocabulary starts with {self.SPECIALS}, got {words[:4]}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """The words of ``captions`` seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for text in captions for w in tokenize(text))
        return cls(
            cls.SPECIALS
            + sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        )

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_length: int) -> list[int]:
        """``[BOS, word..., EOS]`` with at most ``max_length`` words."""
        return [self.BOS, *(self.index.get(w, self.UNK) for w in tokenize(text)[:max_length]), self.EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """The words up to the first EOS, without padding or BOS."""
        words = []
        for i in ids:
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                words.append(self.words[i])
        return " ".join(words)


def scores(references: dict[str, list[str]], generated: dict[str, str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D (pycocoevalcap) of one generated caption per video against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(generated)
    missing = [v for v in ids if v not in references]
    if missing:
        raise KeyError(f"no references for {', '.join(missing[:5])}")
    refs = {v: [" ".join(tokenize(r)) for r in references[v]] for v in ids}
    # pycocoevalcap's scorers assert a non-empty hypothesis: an empty caption scores as one unknown word.
    hyps = {v: [" ".join(tokenize(generated[v])) or "<unk>"] for v in ids}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    rouge, _ = Rouge().compute_score(refs, hyps)
    cider, _ = Cider().compute_score(refs, hyps)
    return {
        **{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)},
        "rouge_l": float(rouge),
        "cider": float(cider),
    }


def _contains(words: list[str], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return any(tuple(words[i : i + n]) == phrase for i in range(len(words) - n + 1))


def named_motion(caption: str, keywords: dict[str, list[tuple[str, ...]]]) -> str | None:
    """The one label whose phrases ``caption`` contains; None when it names none or several."""
    words = tokenize(caption)
    named = [label for label, phrases in keywords.items() if any(_contains(words, p) for p in phrases)]
    return named[0] if len(named) == 1 else None


def order_accuracy(
    generated: dict[str, str], labels: dict[str, str], keywords: dict[str, list[tuple[str, ...]]]
) -> float:
    """Share of videos whose caption names the motion of their own label and of no other."""
    return float(np.mean([named_motion(text, keywords) == labels[v] for v, text in generated.items()]))


def nearest_captions(
    train: np.ndarray,
    train_ids: list[str],
    references: dict[str, list[str]],
    query: np.ndarray,
    query_ids: list[str],
) -> dict[str, str]:
    """The nearest-neighbour baseline: each query clip gets the first reference caption of the training clip
    closest to it by cosine distance between whole clips (``(N, T, D)`` sampled features, flattened: the
    order of the steps counts)."""
    a = train.reshape(len(train), -1).astype(np.float64)
    b = query.reshape(len(query), -1).astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
    nearest = (b @ a.T).argmax(1)
    return {q: references[train_ids[n]][0] for q, n in zip(query_ids, nearest, strict=True)}
