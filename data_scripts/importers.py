"""Manifests for real datasets in their usual layouts on disk.

    python -m data_scripts.importers tree     ROOT --out ROOT/manifest.csv [--ratios 0.7 0.15 0.15] [--seed 0]
    python -m data_scripts.importers ucf101   UCF-101 --splits ucfTrainTestlist --split 1 --out UCF-101/manifest.csv
    python -m data_scripts.importers hmdb51   hmdb51 --splits testTrainMulti_7030_splits --split 1 --out hmdb51/manifest.csv
    python -m data_scripts.importers jester   20bn-jester-v1 --labels jester-csv --out 20bn-jester-v1/manifest.csv
    python -m data_scripts.importers something 20bn-something-something-v2 --labels ssv2-json --out .../manifest.csv
    python -m data_scripts.importers kinetics kinetics400 --csv kinetics400/train.csv --csv .../validate.csv --out .../manifest.csv

Official splits are kept: UCF101 and HMDB51 have train/test lists (``--split 1|2|3``); Jester and
Something-Something publish train and validation labels (their test labels are private), so their
validation set becomes ``test``. Where a dataset has no validation split, ``val`` is carved from
train with a seed (``--val-fraction``), by UCF101 group so one actor's clips never straddle splits.
Paths are written relative to the manifest's folder when they lie inside it. A video's id is its
path without the extension; files that would share an id (``a.mp4`` and ``a.avi``) keep their
extension instead. The manifest is then checked (:func:`pipeline.media.manifest.validate`) and the report
printed. Any problem is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.media.manifest import ManifestError, read_manifest, validate, write_manifest

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".wmv")


def _rel(path: Path, out: Path) -> str:
    try:
        return (
            os.path.relpath(path, out.parent)
            if path.resolve().is_relative_to(out.parent.resolve())
            else str(path.resolve())
        )
    except ValueError:
        return str(path.resolve())


def _row(vid: str, path: Path, label: str, split: str, out: Path, **extra) -> dict:
    return {"video_id": vid, "path": _rel(path, out), "label": label, "split": split, **extra}


def _carve_val(rows: list[dict], fraction: float, seed: int, group=lambda r: r["video_id"]) -> None:
    """Move a seeded ``fraction`` of each class's training groups to ``val`` (in place)."""
    groups: dict[str, set] = defaultdict(set)
    for r in rows:
        if r["split"] == "train":
            groups[r["label"]].add(group(r))
    rng = np.random.default_rng(seed)
    held = set()
    for label in sorted(groups):
        names = sorted(groups[label])
        if len(names) < 2 or fraction <= 0:
            continue
        k = max(1, int(round(fraction * len(names))))
        held |= {(label, names[i]) for i in rng.permutation(len(names))[:k]}
    for r in rows:
        if r["split"] == "train" and (r["label"], group(r)) in held:
            r["split"] = "val"


def unique_names(paths: list[Path]) -> dict[Path, str]:
    """Each path's name without its extension, or with it where two paths would share a name."""
    stems: dict[str, int] = defaultdict(int)
    for path in paths:
        stems[path.stem] += 1
    return {path: path.stem if stems[path.stem] == 1 else path.name for path in paths}


def from_tree(root: Path, out: Path, ratios=(0.7, 0.15, 0.15), seed: int = 0) -> list[dict]:
    """``ROOT/<class>/<video>``: a seeded split, stratified by class (at least one train video per class)."""
    if abs(sum(ratios) - 1) > 1e-6 or len(ratios) != 3:
        raise SystemExit(f"--ratios must be three numbers summing to 1, got {ratios}")
    rows = []
    rng = np.random.default_rng(seed)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        videos = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        names = unique_names(videos)
        order = rng.permutation(len(videos))
        n_val, n_test = int(round(ratios[1] * len(videos))), int(round(ratios[2] * len(videos)))
        if len(videos) - n_val - n_test < 1:
            n_val = n_test = 0
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            video = videos[i]
            rows.append(_row(f"{class_dir.name}/{names[video]}", video, class_dir.name, split, out))
    return sorted(rows, key=lambda r: r["video_id"])


def ucf101(
    root: Path, splits: Path, split: int, out: Path, val_fraction: float = 0.1, seed: int = 0
) -> list[dict]:
    """UCF101: ``ROOT/<Class>/v_<Class>_gGG_cCC.avi`` with ``trainlist0N.txt`` / ``testlist0N.txt``."""
    rows = []
    for name, role in ((f"trainlist{split:02d}.txt", "train"), (f"testlist{split:02d}.txt", "test")):
        for line in (splits / name).read_text().split("\n"):
            if line.strip():
                rel = line.split()[0]
                label = rel.split("/")[0]
                rows.append(_row(Path(rel).stem, root / rel, label, role, out))
    _carve_val(rows, val_fraction, seed, group=lambda r: re.sub(r"_c\d+$", "", r["video_id"]))
    return rows


def hmdb51(
    root: Path, splits: Path, split: int, out: Path, val_fraction: float = 0.1, seed: int = 0
) -> list[dict]:
    """HMDB51: ``ROOT/<class>/<video>.avi`` with ``<class>_test_split<N>.txt`` (1 train, 2 test, 0 unused)."""
    rows = []
    suffix = f"_test_split{split}.txt"
    for path in sorted(splits.glob(f"*{suffix}")):
        label = path.name[: -len(suffix)]
        for line in path.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 2 and parts[1] in ("1", "2"):
                rows.append(
                    _row(
                        Path(parts[0]).stem,
                        root / label / parts[0],
                        label,
                        "train" if parts[1] == "1" else "test",
                        out,
                    )
                )
    _carve_val(rows, val_fraction, seed)
    return rows


def jester(
    root: Path, labels: Path, out: Path, fps: float = 12.0, val_fraction: float = 0.1, seed: int = 0
) -> list[dict]:
    """Jester: folders of JPEG frames ``ROOT/<id>/00001.jpg`` and ``jester-v1-{train,validation}.csv`` (``id;label``)."""
    rows = []
    for name, role in (("jester-v1-train.csv", "train"), ("jester-v1-validation.csv", "test")):
        with open(labels / name, newline="") as fh:
            for vid, label in csv.reader(fh, delimiter=";"):
                rows.append(_row(vid, root / vid, label, role, out, fps=fps))
    _carve_val(rows, val_fraction, seed)
    return rows


def something(root: Path, labels: Path, out: Path, val_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """Something-Something v2: ``ROOT/<id>.webm`` and ``something-something-v2-{train,validation}.json``."""
    rows = []
    for name, role in (
        ("something-something-v2-train.json", "train"),
        ("something-something-v2-validation.json", "test"),
    ):
        for item in json.loads((labels / name).read_text()):
            label = item["template"].replace("[", "").replace("]", "")
            rows.append(_row(str(item["id"]), root / f"{item['id']}.webm", label, role, out))
    _carve_val(rows, val_fraction, seed)
    return rows


def kinetics(root: Path, csvs: list[Path], out: Path) -> list[dict]:
    """Kinetics-style CSVs (``youtube_id,time_start,time_end,label,split``) mapped to local files.

    A file named ``<youtube_id>_<start>_<end>.<ext>`` (anywhere under ROOT) is an already trimmed
    clip; a file named ``<youtube_id>.<ext>`` is the whole video, cut by ``start_sec``/``end_sec``.
    Rows without a local file or a label are left out and counted.
    """
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            files.setdefault(path.stem, path)  # the first in sorted order where stems repeat
    rows, missing, unlabelled = [], 0, 0
    splits = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
    for table in csvs:
        with open(table, newline="") as fh:
            for r in csv.DictReader(fh):
                if not r.get("label"):
                    unlabelled += 1
                    continue
                start, end = int(float(r["time_start"])), int(float(r["time_end"]))
                vid = f"{r['youtube_id']}_{start:06d}_{end:06d}"
                split = splits.get(r["split"].strip().lower(), "train")
                if vid in files:
                    rows.append(_row(vid, files[vid], r["label"], split, out))
                elif r["youtube_id"] in files:
                    rows.append(
                        _row(
                            vid, files[r["youtube_id"]], r["label"], split, out, start_sec=start, end_sec=end
                        )
                    )
                else:
                    missing += 1
    if missing or unlabelled:
        print(
            f"kinetics: left out {missing} row(s) without a local file and {unlabelled} without a label",
            file=sys.stderr,
        )
    return rows


def check_unique(rows: list[dict]) -> None:
    """Stop with one line naming both files when two rows share a video id."""
    seen: dict[str, str] = {}
    for r in rows:
        if r["video_id"] in seen:
            raise SystemExit(
                f"error: video id {r['video_id']!r} names two files: {seen[r['video_id']]} and {r['path']}"
            )
        seen[r["video_id"]] = r["path"]


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except (OSError, ValueError, KeyError, csv.Error, ManifestError) as err:
        raise SystemExit(f"error: {type(err).__name__}: {' '.join(str(err).split())}") from None


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_scripts.importers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="layout", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("root", type=Path, help="the dataset's folder")
    common.add_argument("--out", type=Path, required=True, help="manifest to write")
    common.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("tree", parents=[common], help="ROOT/<class>/<video>")
    p.add_argument(
        "--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST")
    )
    for name in ("ucf101", "hmdb51"):
        p = sub.add_parser(name, parents=[common], help=f"{name} class folders and official split files")
        p.add_argument("--splits", type=Path, required=True, help="folder of the official split files")
        p.add_argument("--split", type=int, choices=[1, 2, 3], default=1)
        p.add_argument("--val-fraction", type=float, default=0.1)
    p = sub.add_parser("jester", parents=[common], help="Jester frame folders and label CSVs")
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="folder with jester-v1-train.csv and jester-v1-validation.csv",
    )
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p = sub.add_parser("something", parents=[common], help="Something-Something v2 videos and label JSONs")
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="folder with something-something-v2-{train,validation}.json",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p = sub.add_parser("kinetics", parents=[common], help="Kinetics-style CSVs mapped to local files")
    p.add_argument("--csv", type=Path, action="append", required=True, help="a CSV (repeat for several)")
    args = parser.parse_args(argv)

    out = args.out
    if args.layout == "tree":
        rows = from_tree(args.root, out, tuple(args.ratios), args.seed)
    elif args.layout == "ucf101":
        rows = ucf101(args.root, args.splits, args.split, out, args.val_fraction, args.seed)
    elif args.layout == "hmdb51":
        rows = hmdb51(args.root, args.splits, args.split, out, args.val_fraction, args.seed)
    elif args.layout == "jester":
        rows = jester(args.root, args.labels, out, args.fps, args.val_fraction, args.seed)
    elif args.layout == "something":
        rows = something(args.root, args.labels, out, args.val_fraction, args.seed)
    else:
        rows = kinetics(args.root, args.csv, out)
    if not rows:
        raise SystemExit(f"{args.root}: no videos found for layout {args.layout!r}")
    check_unique(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, rows)
    report = validate(read_manifest(out), out)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    print(
        f"{out}: {len(rows)} videos ({', '.join(f'{k} {v}' for k, v in counts.items())}), {len({r['label'] for r in rows})} classes"
    )
    for line in report.lines():
        print(f"  {line}")
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
