"""Generate an embedded synthetic dataset as H.264 MP4 files plus ``manifest.csv``.

    python -m data_scripts.synth gestures --out data/raw/gestures --count 24 --seed 0

``--count`` is videos per class (sequences in all for ``digits``). Everything is determined by the
seed: the same arguments give byte-identical files. Splits are 60/20/20 train/val/test per class.

``gestures`` and ``actions`` also get reference captions (``captions.csv``: ``video_id,caption``, twelve
per clip, from what was rendered) and ``caption_keywords.json`` (the words that name each class's
motion and direction: the captioning order metric reads them); see :mod:`pipeline.storage.captions`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np

from data_scripts import actions, digits, gestures
from pipeline.media.manifest import write_manifest
from pipeline.storage.captions import write_captions

DATASETS: dict[str, ModuleType] = {"gestures": gestures, "actions": actions, "digits": digits}


def split_of(i: int, n: int) -> str:
    """60/20/20 split of items 0..n-1 (already shuffled), with at least one val and test item when n >= 3."""
    n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    n_val = max(1, round(0.2 * n)) if n >= 3 else 0
    return "test" if i < n_test else "val" if i < n_test + n_val else "train"


def plan(name: str, count: int, seed: int) -> list[dict]:
    """The list of clips to render: id, class, split, parameters. Pure function of its arguments."""
    module = DATASETS[name]
    items = []
    for c, cls in enumerate(module.CLASSES):
        order = np.random.default_rng([seed, c, 1]).permutation(count)
        for i in range(count):
            split = split_of(int(order[i]), count)
            rng = np.random.default_rng([seed, c, i])
            params = module.sample_params(rng, split) if module is digits else module.sample_params(rng)
            vid = f"{cls}_{i:04d}" if module is not digits else f"seq_{i:05d}"
            items.append({"video_id": vid, "label": cls, "split": split, "params": params})
    return items


def fps_of(module: ModuleType, params) -> float:
    return float(getattr(params, "fps", getattr(module, "FPS", 25)))


def _write(item: dict, name: str, folder: Path) -> dict:
    from pipeline.media.video import write_video

    module = DATASETS[name]
    frames = module.render(item["label"], item["params"])
    path = f"videos/{item['video_id']}.mp4"
    write_video(folder / path, frames, fps_of(module, item["params"]))
    return {"video_id": item["video_id"], "path": path, "label": item["label"], "split": item["split"]}


def reference_captions(name: str, items: list[dict], seed: int) -> list[tuple[str, str]]:
    """``(video_id, caption)`` rows for the planned ``items``: a pure function of its arguments."""
    module = DATASETS[name]
    rows = []
    for item in items:
        c, i = module.CLASSES.index(item["label"]), int(item["video_id"].rsplit("_", 1)[1])
        rng = np.random.default_rng([seed, c, i, 2])
        rows += [(item["video_id"], text) for text in module.captions(item["label"], item["params"], rng)]
    return rows


def generate(
    name: str, out: str | os.PathLike, count: int, seed: int = 0, workers: int | None = None
) -> Path:
    """Render every clip of dataset ``name`` into ``out`` (replaced atomically) and write its manifest."""
    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if count < 1:
        raise SystemExit(f"--count must be at least 1, got {count}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "videos").mkdir()
        items = plan(name, count, seed)
        with ProcessPoolExecutor(workers or os.cpu_count() or 1, mp_context=mp.get_context("spawn")) as pool:
            rows = list(pool.map(partial(_write, name=name, folder=tmp), items, chunksize=4))
        write_manifest(tmp / "manifest.csv", rows)
        if hasattr(DATASETS[name], "captions"):
            write_captions(tmp, reference_captions(name, items, seed), DATASETS[name].MOTION_WORDS)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{name}: wrote {len(rows)} videos to {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_scripts.synth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", required=True, help="output folder (replaced)")
    parser.add_argument(
        "--count", type=int, default=20, help="videos per class; sequences for digits (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: number of cores)")
    args = parser.parse_args(argv)
    generate(args.dataset, args.out, args.count, args.seed, args.workers)


if __name__ == "__main__":
    main()
