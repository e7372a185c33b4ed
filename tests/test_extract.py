import csv

import numpy as np
import pytest

from pipeline.extract import ExtractError, extract
from pipeline.manifest import read_manifest, write_manifest
from pipeline.stores import FrameStore
from pipeline.video import decode


def test_extract_writes_the_store(tiny_dataset, tmp_path):
    summary = extract(tiny_dataset, tmp_path / "frames", fps=10, size="32", workers=2)
    assert summary["extracted"] == 6 and summary["failed"] == 0
    store = FrameStore(tmp_path / "frames")
    for entry in read_manifest(tiny_dataset):
        expected = decode(entry.path, fps=10, size=(32, 32)).frames
        np.testing.assert_array_equal(store.rows(entry.video_id), expected)
        row = next(r for r in store.index if r.video_id == entry.video_id)
        assert (row.label, row.split, row.width, row.height, row.fps) == (entry.label, entry.split, 32, 32, 10.0)
    assert store.meta["params"] == {"fps": 10, "size": [32, 32]} and "pyav" in store.meta


def test_store_does_not_depend_on_workers(tiny_dataset, tmp_path):
    extract(tiny_dataset, tmp_path / "one", workers=1)
    extract(tiny_dataset, tmp_path / "two", workers=2)
    assert FrameStore(tmp_path / "one").meta["content_hash"] == FrameStore(tmp_path / "two").meta["content_hash"]


def test_bad_videos_are_recorded_and_the_rest_extracted(tiny_dataset, tmp_path):
    (tiny_dataset.parent / "empty.mp4").write_bytes(b"")
    (tiny_dataset.parent / "text.mp4").write_text("not a video")
    rows = list(csv.DictReader(open(tiny_dataset)))
    rows += [{"video_id": "empty", "path": "empty.mp4", "label": "left", "split": "train"},
             {"video_id": "text", "path": "text.mp4", "label": "left", "split": "train"},
             {"video_id": "gone", "path": "missing.mp4", "label": "left", "split": "train"}]
    write_manifest(tiny_dataset, rows)
    summary = extract(tiny_dataset, tmp_path / "frames", workers=2)
    assert (summary["extracted"], summary["failed"]) == (6, 3)
    errors = {e["video_id"]: e for e in FrameStore(tmp_path / "frames").errors}
    assert set(errors) == {"empty", "text", "gone"}
    for vid, name in [("empty", "empty.mp4"), ("text", "text.mp4"), ("gone", "missing.mp4")]:
        assert name in errors[vid]["error"] and "\n" not in errors[vid]["error"]
    assert "no such file" in errors["gone"]["error"]

    with pytest.raises(ExtractError, match="empty.mp4"):
        extract(tiny_dataset, tmp_path / "strict", on_error="fail", workers=1)
    assert not (tmp_path / "strict").exists()
