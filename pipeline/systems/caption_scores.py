"""Scores of generated captions against the references of :mod:`pipeline.storage.captions`.

Scores come from ``pycocoevalcap``, the MS-COCO caption evaluation code that MSR-VTT and MSVD results
are reported with: BLEU-1..4, ROUGE-L and CIDEr-D (its ``Cider`` is the CIDEr-D variant: clipped
n-gram counts and a length penalty, sigma 6), over the words of :func:`~pipeline.storage.captions.tokenize`.
The **order metric** is the share of clips whose caption names its own class's motion (a phrase of
``caption_keywords.json``) and no other class's; :func:`nearest_captions` is the nearest-neighbour baseline.
"""

from __future__ import annotations

import numpy as np

from pipeline.storage.captions import tokenize


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
