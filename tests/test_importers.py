"""Importers for standard dataset layouts, from a tiny fake tree to a finished `vpipe extract`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import moving_square
from data_scripts import importers
from pipeline.media.manifest import ManifestError, read_manifest, validate, write_manifest
from pipeline.media.video import write_video
from pipeline.stages.extract import extract
from pipeline.storage.store import FrameStore


def clip(path: Path, seed: int = 0, frames: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = {
        ".webm": dict(codec="libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"}),
        ".avi": dict(codec="mpeg4"),
    }.get(path.suffix, {})
    write_video(path, moving_square(frames, 32, 32, seed), 25, **codec)
    return path


def extracted(manifest: Path, tmp_path: Path) -> FrameStore:
    summary = extract(manifest, tmp_path / "frames", size="16", workers=2)
    assert summary["failed"] == 0, FrameStore(tmp_path / "frames").errors
    return FrameStore(tmp_path / "frames")


def test_generic_tree(tmp_path):
    root = tmp_path / "data"
    for c, label in enumerate(["cats", "dogs"]):
        for i in range(5):
            clip(root / label / f"clip{i}.mp4", seed=10 * c + i)
    importers.main(["tree", str(root), "--out", str(root / "manifest.csv"), "--seed", "3"])
    entries = read_manifest(root / "manifest.csv")
    assert len(entries) == 10 and {e.split for e in entries} == {"train", "val", "test"}
    for label in ("cats", "dogs"):
        assert [e.split for e in entries if e.label == label].count("train") == 3  # 70/15/15 of 5, rounded
    assert all(not Path(row["path"]).is_absolute() for row in csv.DictReader(open(root / "manifest.csv")))
    importers.main(["tree", str(root), "--out", str(tmp_path / "again.csv"), "--seed", "3"])
    again = read_manifest(tmp_path / "again.csv")
    assert [(e.video_id, e.split) for e in again] == [(e.video_id, e.split) for e in entries]  # seeded
    assert len(extracted(root / "manifest.csv", tmp_path)) == 10


def test_ucf101(tmp_path):
    root, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    train, test = [], []
    for label in ("ApplyEyeMakeup", "Archery"):
        for group in range(1, 6):
            rel = f"{label}/v_{label}_g{group:02d}_c01.avi"
            clip(root / rel, seed=group)
            (train if group > 1 else test).append(rel)
    (lists / "trainlist01.txt").write_text("".join(f"{r} 1\n" for r in train))
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))
    importers.main(
        [
            "ucf101",
            str(root),
            "--splits",
            str(lists),
            "--split",
            "1",
            "--out",
            str(root / "manifest.csv"),
            "--val-fraction",
            "0.25",
        ]
    )
    entries = read_manifest(root / "manifest.csv")
    splits = {e.video_id: e.split for e in entries}
    assert splits["v_Archery_g01_c01"] == "test" and list(splits.values()).count("val") == 2
    assert len(extracted(root / "manifest.csv", tmp_path)) == 10


def test_hmdb51(tmp_path):
    root, lists = tmp_path / "hmdb51", tmp_path / "splits"
    lists.mkdir()
    for label in ("brush_hair", "cartwheel"):
        lines = []
        for i, role in enumerate(["1", "1", "1", "2", "0"]):
            clip(root / label / f"{label}_{i}.avi", seed=i)
            lines.append(f"{label}_{i}.avi {role}")
        (lists / f"{label}_test_split1.txt").write_text("\n".join(lines) + "\n")
    importers.main(
        [
            "hmdb51",
            str(root),
            "--splits",
            str(lists),
            "--out",
            str(root / "manifest.csv"),
            "--val-fraction",
            "0.3",
        ]
    )
    entries = read_manifest(root / "manifest.csv")
    assert len(entries) == 8  # role 0 (unused in this split) left out
    assert [e.split for e in entries if e.label == "cartwheel"].count("test") == 1
    assert len(extracted(root / "manifest.csv", tmp_path)) == 8


def test_jester_image_sequences(tmp_path):
    root, labels = tmp_path / "20bn-jester-v1", tmp_path / "csv"
    labels.mkdir()
    rows = {"train": [], "validation": []}
    for vid in range(1, 9):
        folder = root / str(vid)
        folder.mkdir(parents=True)
        for k, frame in enumerate(moving_square(12, 32, 48, seed=vid), start=1):
            Image.fromarray(frame).save(folder / f"{k:05d}.jpg", quality=95)
        label = "Swiping Left" if vid % 2 else "Swiping Right"
        rows["validation" if vid > 6 else "train"].append(f"{vid};{label}")
    for name, lines in rows.items():
        (labels / f"jester-v1-{name}.csv").write_text("\n".join(lines) + "\n")
    importers.main(["jester", str(root), "--labels", str(labels), "--out", str(root / "manifest.csv")])
    assert {e.fps for e in read_manifest(root / "manifest.csv")} == {12.0}
    store = extracted(root / "manifest.csv", tmp_path)
    row = next(r for r in store.index if r.video_id == "3")
    assert (row.length, row.src_fps) == (12, 12.0)
    first = np.asarray(Image.open(root / "3" / "00001.jpg").resize((16, 16), Image.BILINEAR), np.int16)
    assert np.abs(store.rows("3")[0].astype(np.int16) - first).mean() < 20


def test_image_sequence_natural_order(tmp_path):
    from pipeline.media.video import decode

    folder = tmp_path / "seq"
    folder.mkdir()
    for k in range(1, 12):  # img1.png … img11.png: not zero-padded
        Image.fromarray(np.full((8, 8, 3), 20 * k, np.uint8)).save(folder / f"img{k}.png")
    out = decode(folder, image_fps=5)
    assert [int(f[0, 0, 0]) for f in out.frames] == [20 * k for k in range(1, 12)] and out.src_fps == 5


def test_something_something(tmp_path):
    root, labels = tmp_path / "ssv2", tmp_path / "labels"
    labels.mkdir()
    items = {"train": [], "validation": []}
    for vid in range(1, 7):
        clip(root / f"{vid}.webm", seed=vid)
        template = (
            "Pushing [something] from left to right" if vid % 2 else "Pulling [something] from right to left"
        )
        items["validation" if vid > 4 else "train"].append(
            {"id": str(vid), "template": template, "placeholders": ["a cup"]}
        )
    for name, data in items.items():
        (labels / f"something-something-v2-{name}.json").write_text(json.dumps(data))
    importers.main(
        [
            "something",
            str(root),
            "--labels",
            str(labels),
            "--out",
            str(root / "manifest.csv"),
            "--val-fraction",
            "0",
        ]
    )
    entries = read_manifest(root / "manifest.csv")
    assert {e.label for e in entries} == {
        "Pushing something from left to right",
        "Pulling something from right to left",
    }
    assert len(extracted(root / "manifest.csv", tmp_path)) == 6


def test_kinetics_trimmed_and_whole(tmp_path):
    root = tmp_path / "k400"
    clip(root / "train" / "abseiling" / "aaa_000002_000004.mp4", seed=1)  # already trimmed
    clip(root / "raw" / "bbb.mp4", seed=2, frames=100)  # a whole video: 4 s at 25 fps
    clip(root / "raw" / "ccc.mp4", seed=3, frames=100)
    (tmp_path / "k.csv").write_text(
        "youtube_id,time_start,time_end,label,split\n"
        "aaa,2,4,abseiling,train\nbbb,1,3,abseiling,train\nccc,0,2,abseiling,validate\n"
        "gone,0,10,abseiling,train\nddd,0,10,,test\n"
    )
    importers.main(
        ["kinetics", str(root), "--csv", str(tmp_path / "k.csv"), "--out", str(root / "manifest.csv")]
    )
    entries = {e.video_id: e for e in read_manifest(root / "manifest.csv")}
    assert set(entries) == {"aaa_000002_000004", "bbb_000001_000003", "ccc_000000_000002"}
    assert entries["aaa_000002_000004"].start_sec is None and entries["bbb_000001_000003"].start_sec == 1
    assert entries["ccc_000000_000002"].split == "val"
    store = extracted(root / "manifest.csv", tmp_path)
    assert (
        next(r for r in store.index if r.video_id == "bbb_000001_000003").length == 50
    )  # 1 s … 3 s at 25 fps


def test_validation_report(tmp_path, capsys):
    clip(tmp_path / "a.mp4")
    rows = [
        {"video_id": "a", "path": "a.mp4", "label": "x", "split": "train"},
        {"video_id": "b", "path": "../outside.mp4", "label": "x", "split": "train"},
        {"video_id": "c", "path": "c.mp4", "label": "y", "split": "test"},
    ]
    rows += [
        {"video_id": f"m{i}", "path": f"missing{i}.mp4", "label": "x", "split": "train"} for i in range(7)
    ]
    write_manifest(tmp_path / "m.csv", rows)
    report = validate(read_manifest(tmp_path / "m.csv"), tmp_path / "m.csv", show=3)
    text = str(report)
    assert "1 path(s) escape the dataset root" in text and "b (../outside.mp4)" in text
    assert "1 label(s) in val/test never occur in train: y (test: 1)" in text
    assert "8 file(s) missing" in text and "... (5 more)" in text  # c.mp4 and missing0..6: 3 named
    assert "warning: 1 empty split(s): val" in text
    with pytest.raises(ManifestError):
        report.raise_or_warn(file_errors_fatal=False)  # dataset-level errors are always fatal
    from pipeline.cli import main

    with pytest.raises(SystemExit) as err:
        main(["check", "--manifest", str(tmp_path / "m.csv")])
    assert err.value.code == 1 and "8 file(s) missing" in capsys.readouterr().out
