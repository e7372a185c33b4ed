"""Reference captions: the files and the words (the scores of generated captions are in
:mod:`pipeline.systems.caption_scores`).

A dataset folder may hold, beside its manifest:

- ``captions.csv``: ``video_id,caption``, one row per reference caption, many rows per video (as
  MSR-VTT and MSVD have about 20 and 40). Every id must be a video of the manifest; no caption may be
  empty. ``vpipe check`` reads it when it lies beside the manifest (or with ``--captions FILE``).
- ``caption_keywords.json`` (optional): ``{label: [phrase, ...]}``, the words that name each class's
  motion and direction. With it, the captioning task reports the **order metric**: the share of clips
  whose generated caption names its own class's motion (a phrase of its label) and no other class's.

Captions are lower-cased and split into words by :func:`tokenize` (instead of the Stanford tokenizer,
which needs Java), for the vocabulary and for the scores alike.

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

from pipeline.media.errors import UserError

CAPTIONS = "captions.csv"
KEYWORDS = "caption_keywords.json"


class CaptionError(ValueError, UserError):
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
