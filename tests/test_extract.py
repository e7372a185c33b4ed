import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import extract_command, same_files
from pipeline.media.codecs import CodecError
from pipeline.media.manifest import ManifestError, read_manifest, write_manifest
from pipeline.media.video import decode
from pipeline.stages.extract import ExtractError, extract
from pipeline.stages.parts import PartError, merge, parse_part, part_path
from pipeline.storage.store import FrameStore, StoreError


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_extract_writes_the_store(tiny_dataset, tmp_path, codec):
    summary = extract(tiny_dataset, tmp_path / "frames", fps=10, size="32", workers=2, codec=codec)
    assert summary["extracted"] == 6 and summary["failed"] == 0
    store = FrameStore(tmp_path / "frames")
    assert store.codec == store.meta["codec"] == codec
    for entry in read_manifest(tiny_dataset):
        expected = decode(entry.path, fps=10, size=(32, 32)).frames
        if codec == "raw":
            np.testing.assert_array_equal(store.rows(entry.video_id), expected)
        else:  # JPEG at quality 90: a few grey levels off on average, never a wrong picture
            got = store.rows(entry.video_id)
            assert got.shape == expected.shape and got.dtype == np.uint8
            assert np.abs(got.astype(int) - expected).mean() < 4
        row = next(r for r in store.index if r.video_id == entry.video_id)
        assert (row.label, row.split, row.width, row.height, row.fps) == (
            entry.label,
            entry.split,
            32,
            32,
            10.0,
        )
    params = {"fps": 10, "size": [32, 32], "max_frames": None, "image_fps": 12.0}
    if codec == "jpeg":
        params.update(codec="jpeg", quality=90)
        assert {p.suffix for p in (tmp_path / "frames").glob("frames-*")} == {".mjpeg", ".npy"}
    assert store.meta["params"] == params and "pyav" in store.meta


def test_store_does_not_depend_on_workers(tiny_dataset, tmp_path):
    extract(tiny_dataset, tmp_path / "one", workers=1)
    extract(tiny_dataset, tmp_path / "two", workers=2)
    assert (
        FrameStore(tmp_path / "one").meta["content_hash"] == FrameStore(tmp_path / "two").meta["content_hash"]
    )


def test_bad_videos_are_recorded_and_the_rest_extracted(tiny_dataset, tmp_path):
    (tiny_dataset.parent / "empty.mp4").write_bytes(b"")
    (tiny_dataset.parent / "text.mp4").write_text("not a video")
    rows = list(csv.DictReader(open(tiny_dataset)))
    rows += [
        {"video_id": "empty", "path": "empty.mp4", "label": "left", "split": "train"},
        {"video_id": "text", "path": "text.mp4", "label": "left", "split": "train"},
        {"video_id": "gone", "path": "missing.mp4", "label": "left", "split": "train"},
    ]
    write_manifest(tiny_dataset, rows)
    summary = extract(tiny_dataset, tmp_path / "frames", workers=2)
    assert (summary["extracted"], summary["failed"]) == (6, 3)
    errors = {e["video_id"]: e for e in FrameStore(tmp_path / "frames").errors}
    assert set(errors) == {"empty", "text", "gone"}
    for vid, name in [("empty", "empty.mp4"), ("text", "text.mp4"), ("gone", "missing.mp4")]:
        assert name in errors[vid]["error"] and "\n" not in errors[vid]["error"]
    assert "no such file" in errors["gone"]["error"]

    # --on-error fail: a missing file stops the run before any work, ...
    with pytest.raises(ManifestError, match="1 file\\(s\\) missing: .*missing.mp4"):
        extract(tiny_dataset, tmp_path / "strict", on_error="fail", workers=1)
    # ... and the first file that cannot be decoded stops it with an error naming the file.
    write_manifest(tiny_dataset, [r for r in csv.DictReader(open(tiny_dataset)) if r["video_id"] != "gone"])
    with pytest.raises(ExtractError, match="empty.mp4"):
        extract(tiny_dataset, tmp_path / "strict", on_error="fail", workers=1)
    assert not (tmp_path / "strict").exists()


def _add_rows(manifest, extra):
    rows = list(csv.DictReader(open(manifest)))
    write_manifest(
        manifest, rows + [{"video_id": v, "path": p, "label": "left", "split": "train"} for v, p in extra]
    )


def test_every_kind_of_bad_input_is_recorded(tiny_dataset, tmp_path):
    import av

    from pipeline.media.video import write_video

    root = tiny_dataset.parent
    (root / "zero.mp4").write_bytes(b"")
    (root / "random.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    )
    (root / "text.mp4").write_text("this is a text file, not a video\n" * 100)
    good = (root / "videos/left0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    with av.open(str(root / "audio.m4a"), "w") as container:  # audio only
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with av.open(str(root / "noframes.avi"), "w") as container:  # a video stream without a frame
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height = 32, 32
        container.start_encoding()
    from conftest import moving_square

    write_video(root / "full.mkv", moving_square(40, 48, 64), 25)
    mkv = (root / "full.mkv").read_bytes()
    (root / "cut.mkv").write_bytes(
        mkv[: int(len(mkv) * 0.6)]
    )  # truncated mid-stream, still decodable in part

    bad = {
        "zero": "zero.mp4",
        "random": "random.mp4",
        "text": "text.mp4",
        "truncated": "truncated.mp4",
        "audio": "audio.m4a",
        "missing": "missing.mp4",
        "noframes": "noframes.avi",
    }
    _add_rows(tiny_dataset, [*bad.items(), ("cut", "cut.mkv")])
    summary = extract(tiny_dataset, tmp_path / "frames", workers=2)
    store = FrameStore(tmp_path / "frames")
    errors = {e["video_id"]: e["error"] for e in store.errors}
    assert set(errors) == set(bad) and summary["failed"] == len(bad)
    for vid, name in bad.items():
        assert name in errors[vid], errors[vid]
    assert (
        "empty file" in errors["zero"]
        and "no video stream" in errors["audio"]
        and "no such file" in errors["missing"]
    )
    assert "no decodable video frame" in errors["noframes"]
    cut = next(r for r in store.index if r.video_id == "cut")
    assert 0 < cut.length < 40  # the frames before the cut are kept
    assert summary["extracted"] == 7


def test_hanging_decoder_is_killed_after_timeout(tiny_dataset, tmp_path):
    os.mkfifo(tiny_dataset.parent / "hangs.mp4")  # opening a FIFO with no writer blocks forever
    _add_rows(tiny_dataset, [("hangs", "hangs.mp4")])
    summary = extract(tiny_dataset, tmp_path / "frames", workers=2, timeout=3)
    assert (summary["extracted"], summary["failed"]) == (6, 1)
    [error] = FrameStore(tmp_path / "frames").errors
    assert (
        error["video_id"] == "hangs" and "longer than 3 s" in error["error"] and "hangs.mp4" in error["error"]
    )


@pytest.mark.parametrize("codec", ["jpeg", "raw"])
def test_parts_merged_equal_a_single_run(tiny_dataset, tmp_path, codec):
    extract(tiny_dataset, tmp_path / "single", size="24", workers=1, codec=codec)
    for i in range(3):
        summary = extract(tiny_dataset, tmp_path / "merged", size="24", workers=1, part=(i, 3), codec=codec)
        assert summary["out"] == str(part_path(tmp_path / "merged", i, 3))
    merge(None, tmp_path / "merged")
    assert same_files(tmp_path / "merged", tmp_path / "single")  # byte for byte, meta.json included
    # Hard-linked: the same frames and rows, one shard per part, no frame copied.
    parts = [part_path(tmp_path / "merged", i, 3) for i in range(3)]
    merge(parts, tmp_path / "linked", link=True)
    single, linked = FrameStore(tmp_path / "single"), FrameStore(tmp_path / "linked")
    assert [r.video_id for r in linked.index] == [r.video_id for r in single.index]
    for a in single.index:
        np.testing.assert_array_equal(linked.rows(a.video_id), single.rows(a.video_id))
    first = linked.shard_path(0).name
    assert os.stat(tmp_path / "linked" / first).st_ino == os.stat(parts[0] / first).st_ino


def test_merge_refuses_incomplete_or_mismatched_parts(tiny_dataset, tmp_path):
    out = tmp_path / "frames"
    for i in (0, 2):
        extract(tiny_dataset, out, size="24", workers=1, part=(i, 3))
    with pytest.raises(StoreError, match=r"frames.part-0001-of-0003: part 1 of 3 is missing.*--part 1/3"):
        merge(None, out)
    extract(tiny_dataset, out, size="16", workers=1, part=(1, 3))
    with pytest.raises(StoreError, match="extracted with different params"):
        merge(None, out)
    extract(tiny_dataset, out, size="24", workers=1, part=(1, 2))
    with pytest.raises(StoreError, match="parts of different splits"):
        merge(None, out)
    assert not out.exists()  # nothing was written
    with pytest.raises(PartError, match=r"--part 3/3: I must be in 0..N-1"):
        parse_part("3/3")
    with pytest.raises(PartError, match=r"--part two: expected I/N"):
        parse_part("two")
    with pytest.raises(ExtractError, match=r"--quality 0: a JPEG quality is 1 to 100"):
        extract(tiny_dataset, tmp_path / "q", quality=0)
    with pytest.raises(CodecError, match=r"unknown frame codec 'png'"):
        extract(tiny_dataset, tmp_path / "q", codec="png")
    with pytest.raises(StoreError, match="no part stores"):
        merge(None, tmp_path / "nothing")


def test_two_writers_of_one_store_the_second_refused(tmp_path):
    from pipeline.storage.writer import StoreWriter

    with StoreWriter(tmp_path / "s", "frames"):
        with pytest.raises(StoreError, match=r"s: another process is writing this store"):
            StoreWriter(tmp_path / "s", "frames").__enter__()
    with StoreWriter(tmp_path / "s", "frames"):  # released
        pass


def test_parts_as_two_processes_join_to_a_one_process_extraction(tiny_dataset, tmp_path):
    """Two tasks of a SLURM job array (the variables srun sets), run at once, then vpipe merge."""
    extract(tiny_dataset, tmp_path / "single", size="24", workers=1)
    procs = []
    for task in (4, 5):  # --array=4-5: the task ids need not start at 0
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"}
        env["SLURM_ARRAY_TASK_MIN"] = "4"
        command = extract_command(tiny_dataset, tmp_path / "frames", "--size", "24", "--workers", "1")
        procs.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    merged = subprocess.run(
        [sys.executable, "-m", "pipeline", "merge", "--out", str(tmp_path / "frames"), "--remove-parts"],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0, merged.stderr
    assert same_files(tmp_path / "frames", tmp_path / "single")
    assert not list(tmp_path.glob("frames.part-*"))


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (forked workers keep their parent's)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            data = cmdline.read_bytes()
            state = (cmdline.parent / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if text.encode() in data and state != "Z":
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_killed_run_leaves_nothing_complete_and_rerun_succeeds(tmp_path, make_video):
    rows = []
    for i in range(12):
        make_video(f"v/{i}.mp4", frames=60, height=240, width=320, seed=i)
        rows.append({"video_id": f"v{i}", "path": f"v/{i}.mp4", "label": "a", "split": "train"})
    write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "store"
    cmd = extract_command(tmp_path / "m.csv", out, "--workers", "1")
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".store.tmp-*/spill/*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".store.tmp-*"))  # killed mid-way: only a temporary folder
    deadline = time.time() + 10  # its decoding worker dies with it
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.05)
    assert not _processes_mentioning(str(out))
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    assert len(FrameStore(out).index) == 12
    assert not list(tmp_path.glob(".store.tmp-*"))  # the killed run's leftovers are gone


def test_mixed_formats_in_one_run(tmp_path):
    """Every container, codec and oddity of the decoding tests, through one `extract` run."""
    from fractions import Fraction

    from test_decode_cases import quadrants

    from conftest import moving_square
    from pipeline.media.video import write_video

    clips = {
        "avi": ("a.avi", dict(codec="mpeg4", options={"qscale": "2"}), (48, 64)),
        "webm": (
            "b.webm",
            dict(codec="libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"}),
            (48, 64),
        ),
        "hevc": (
            "c.mp4",
            dict(codec="libx265", options={"preset": "ultrafast", "x265-params": "log-level=error"}),
            (48, 64),
        ),
        "mjpeg": ("d.avi", dict(codec="mjpeg", pix_fmt="yuvj420p"), (48, 64)),
        "odd": ("e.mkv", dict(codec="ffv1", pix_fmt="bgr0"), (17, 33)),
        "rotated": ("f.mp4", dict(rotation=90), (48, 64)),
        "vfr": (
            "g.mkv",
            dict(
                codec="ffv1", pix_fmt="bgr0", pts=[0, 10, 20, 50, 51, 52, 53, 54], time_base=Fraction(1, 100)
            ),
            (48, 64),
        ),
        "late": (
            "h.mkv",
            dict(
                codec="ffv1", pix_fmt="bgr0", pts=[900 + 4 * i for i in range(8)], time_base=Fraction(1, 100)
            ),
            (48, 64),
        ),
        "4k": ("i.mp4", dict(preset="ultrafast"), (2160, 3840)),
    }
    rows = []
    for vid, (name, kwargs, (h, w)) in clips.items():
        frames = quadrants(3, h, w) if vid == "4k" else moving_square(8, h, w)
        write_video(tmp_path / name, frames, 25, **kwargs)
        rows.append({"video_id": vid, "path": name, "label": "x", "split": "train"})
    write_manifest(tmp_path / "m.csv", rows)
    summary = extract(tmp_path / "m.csv", tmp_path / "store", fps=10, size="32x24", workers=2)
    assert summary["failed"] == 0, FrameStore(tmp_path / "store").errors
    index = {r.video_id: r for r in FrameStore(tmp_path / "store").index}
    assert all((r.width, r.height) == (32, 24) for r in index.values())
    from pipeline.media.video import decode

    for vid in ("vfr", "late"):  # resampled by presentation time, exactly as decode() does (tested there)
        assert index[vid].length == len(decode(tmp_path / clips[vid][0], fps=10).frames)
    assert index["vfr"].length == 6 and index["late"].length == 4


def test_parts_default_to_torchrun_environment(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    extract(tiny_dataset, tmp_path / "frames", workers=1)
    part = FrameStore(part_path(tmp_path / "frames", 1, 2))
    assert [r.video_id for r in part.index] == [e.video_id for e in read_manifest(tiny_dataset)[3:]]
    assert part.meta["part"] == [1, 2]
