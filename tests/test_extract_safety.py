"""Extraction that loses nothing: crashed workers, killed store replacement, incremental re-runs,
seeking, skipped frames, and importers that never collide ids."""

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import extract_command, moving_square, same_files
from pipeline.media import video
from pipeline.media.manifest import read_manifest, write_manifest
from pipeline.stages.extract import extract
from pipeline.storage.atomic import clean_stale
from pipeline.storage.store import FrameStore, fingerprint
from pipeline.storage.writer import NpyAppender, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def _manifest(tmp_path: Path, make_video, count: int, frames: int = 30, name: str = "m.csv") -> Path:
    rows = []
    for i in range(count):
        make_video(f"v/{i}.mp4", frames=frames, seed=i)
        rows.append({"video_id": f"v{i}", "path": f"v/{i}.mp4", "label": "ab"[i % 2], "split": "train"})
    write_manifest(tmp_path / name, rows)
    return tmp_path / name


def test_worker_killed_mid_video_costs_that_video_only(tmp_path, make_video, monkeypatch):
    manifest = _manifest(tmp_path, make_video, 6, frames=60)
    # The worker decoding v2 sends itself SIGKILL after its fifth frame.
    monkeypatch.setenv("VPIPE_FAULT", "decode-v2")
    cmd = extract_command(manifest, tmp_path / "store", "--workers", "2", "--on-error", "skip")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    store = FrameStore(tmp_path / "store")
    assert [r.video_id for r in store.index] == ["v0", "v1", "v3", "v4", "v5"]
    [error] = store.errors
    assert error["video_id"] == "v2" and "SIGKILL" in error["error"] and "v/2.mp4" in error["error"]
    assert not list(tmp_path.glob(".store.*-*"))  # no spill file or temporary folder left behind


def test_a_worker_that_died_while_idle_is_replaced(tmp_path, make_video):
    """SIGKILL to a worker between two videos: the next video goes to a fresh worker (the parent's
    send used to raise BrokenPipeError and end the run)."""
    from pipeline.media.manifest import Entry
    from pipeline.stages.workers import Job, _context, _Slot

    clip = make_video("a.mp4", frames=20)
    slot = _Slot(_context(), (10.0, (16, 16), 12.0))
    slot.process.kill()
    slot.process.join()
    entry = Entry(video_id="a", path=clip, label="x", split="train")
    slot.submit(Job(0, entry, tmp_path / "spill.npy"))
    number, info, error = slot.conn.recv()
    slot.stop()
    assert (number, error) == (0, None) and info["width"] == 16
    assert np.load(tmp_path / "spill.npy").shape == (8, 16, 16, 3)


def _write_store(out: Path, value: int) -> None:
    with StoreWriter(out, "frames") as writer:
        writer.add(
            np.full((3, 4, 4, 3), value, np.uint8),
            video_id="x",
            label="a",
            split="train",
            src_fps=1.0,
            fps=1.0,
            width=4,
            height=4,
            duration_sec=3.0,
        )
        writer.finish({"kind": "frames", "value": value})


_WRITER = "import sys; from pathlib import Path; sys.path.insert(0, {tests!r}); from test_extract_safety import _write_store; _write_store(Path({out!r}), 2)"


@pytest.mark.parametrize(
    "faults",
    [
        "store-written",
        "store-swapped",
        "no-exchange,store-written",
        "no-exchange,store-moved-old",
        "no-exchange,store-swapped",
    ],
)
def test_store_replacement_survives_a_kill_at_every_step(tmp_path, faults):
    out = tmp_path / "store"
    _write_store(out, 1)
    env = {**os.environ, "VPIPE_FAULT": faults}
    done = subprocess.run(
        [sys.executable, "-c", _WRITER.format(tests=str(Path(__file__).parent), out=str(out))],
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == -9  # killed at the step
    step = faults.split(",")[-1]
    values = {"store-written": 1, "store-swapped": 2, "store-moved-old": None}
    if values[step] is not None:  # a reader sees a complete store: the old one or the new one
        assert FrameStore(out).meta["value"] == values[step]
        assert int(FrameStore(out).rows("x")[0, 0, 0, 0]) == values[step]
    else:  # the exchange is unavailable and the kill came between the two renames
        assert not out.exists()
    clean_stale(out)  # what the next writer does first: finish the interrupted replacement
    meta = FrameStore(out).meta
    assert meta["value"] == (values[step] or 2)  # the finished new store was moved in, not deleted
    assert not list(tmp_path.glob(".store.*-*"))
    _write_store(out, 3)
    assert FrameStore(out).meta["value"] == 3


def test_npy_header_is_valid_for_any_shape(tmp_path):
    long_shape = (1,) * 60
    path = tmp_path / "long.npy"
    appender = NpyAppender(path, np.float16, long_shape)
    appender.append(np.ones((5, *long_shape), np.float16))
    appender.close()
    assert np.load(path).shape == (5, *long_shape) and np.load(path, mmap_mode="r").sum() == 5
    huge = NpyAppender(tmp_path / "huge.npy", np.uint8, (2**40, 2**40))
    huge.rows = np.iinfo(np.int64).max  # the header must hold any count a file could reach
    with open(tmp_path / "header.bin", "wb") as fh:
        fh.write(huge.header())
    with open(tmp_path / "header.bin", "rb") as fh:
        assert np.lib.format.read_magic(fh) == (1, 0)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    assert shape == (np.iinfo(np.int64).max, 2**40, 2**40) and dtype == np.uint8
    assert len(huge.header()) % 64 == 0


def test_fingerprint_changes_with_contents_and_covers_image_folders(tmp_path, make_video):
    clip = make_video("a.mp4", frames=20)
    first = fingerprint(clip)
    assert fingerprint(clip) == first
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    clip.write_bytes(bytes(data))
    assert fingerprint(clip) != first
    folder = tmp_path / "seq"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:05d}.jpg").write_bytes(bytes([i]) * 100)
    before = fingerprint(folder)
    (folder / "00001.jpg").write_bytes(b"\x07" * 100)
    assert fingerprint(folder) != before
    (folder / "notes.txt").write_text("not an image")
    assert fingerprint(folder) == fingerprint(folder)


def test_incremental_rerun_decodes_only_new_videos_and_equals_a_fresh_run(tmp_path, make_video):
    manifest = _manifest(tmp_path, make_video, 4)
    first = extract(manifest, tmp_path / "store", fps=10, size="24", workers=2)
    assert (first["decoded"], first["reused"]) == (4, 0)
    manifest = _manifest(tmp_path, make_video, 6)  # two videos added
    again = extract(manifest, tmp_path / "store", fps=10, size="24", workers=2)
    assert (again["decoded"], again["reused"], again["extracted"]) == (2, 4, 6)
    fresh = extract(manifest, tmp_path / "fresh", fps=10, size="24", workers=2)
    assert fresh["decoded"] == 6
    assert same_files(tmp_path / "store", tmp_path / "fresh")  # JPEG images copied, not re-encoded
    # A changed file is decoded again; other parameters reuse nothing.
    make_video("v/1.mp4", frames=30, seed=99)
    assert extract(manifest, tmp_path / "store", fps=10, size="24", workers=2)["decoded"] == 1
    assert extract(manifest, tmp_path / "store", fps=5, size="24", workers=2)["decoded"] == 6


def _extract_repo(tmp_path: Path) -> dict:
    """A git + DVC repository in ``tmp_path`` whose one stage extracts ``m.csv`` into a persistent
    ``frames`` output; returns the environment that finds ``vpipe`` and ``dvc``."""
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  extract:\n    cmd: vpipe extract --manifest m.csv --out frames --fps 10 --size 24 --workers 1\n"
        "    deps: [m.csv, v]\n    outs:\n      - frames:\n          persist: true\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    return env


def _repro(tmp_path: Path, env: dict) -> str:
    """``dvc repro`` in ``tmp_path``, which must succeed; its output."""
    run = subprocess.run(["dvc", "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + run.stdout
    return run.stderr + run.stdout


def test_incremental_extraction_under_dvc_repro(tmp_path, make_video):
    """A dvc.yaml stage with a persistent output: adding videos re-runs it and decodes only those."""
    _manifest(tmp_path, make_video, 3)
    env = _extract_repo(tmp_path)
    _repro(tmp_path, env)
    _manifest(tmp_path, make_video, 5)
    assert "extracted 5 (3 reused from the previous store)" in _repro(tmp_path, env)
    lock = (tmp_path / "dvc.lock").read_text()
    status = subprocess.run(["dvc", "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # dvc.lock describes what is on disk
    assert "frames" in lock and len(FrameStore(tmp_path / "frames").index) == 5


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _cached_dir(repo: Path, md5: str) -> dict[str, str]:
    """A directory as DVC's cache holds it: relpath → md5, every cached file checked against its name."""
    files = repo / ".dvc" / "cache" / "files" / "md5"
    listing = json.loads((files / md5[:2] / md5[2:]).read_text())
    for entry in listing:
        cached = files / entry["md5"][:2] / entry["md5"][2:]
        assert _md5(cached) == entry["md5"], f"{cached} was changed after DVC cached it"
    return {entry["relpath"]: entry["md5"] for entry in listing}


def test_dvc_cache_links_instead_of_copying_and_an_incremental_rerun_corrupts_nothing(tmp_path, make_video):
    """With the project's cache settings (.dvc/config), a store costs its bytes once; changing one video
    re-runs the stage, and both the new store and the cached old one match what dvc.lock recorded."""
    import yaml

    _manifest(tmp_path, make_video, 4)
    env = _extract_repo(tmp_path)
    (tmp_path / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())

    def repro() -> tuple[str, str]:
        log = _repro(tmp_path, env)
        lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
        return lock["stages"]["extract"]["outs"][0]["md5"], log

    old, _ = repro()
    store = tmp_path / "frames"
    outputs = sum(p.stat().st_size for p in store.iterdir())
    inodes = {}
    for path in [*store.rglob("*"), *(tmp_path / ".dvc" / "cache").rglob("*")]:
        if path.is_file():
            inodes[path.stat().st_ino] = path.stat().st_size
    assert sum(inodes.values()) <= 1.1 * outputs + 4096, "the cache holds a second copy of the store"
    old_files = _cached_dir(tmp_path, old)

    make_video("v/2.mp4", frames=24, seed=77)  # one video changed
    new, log = repro()
    assert new != old and "extracted 4 (3 reused from the previous store)" in log
    new_files = _cached_dir(tmp_path, new)  # the old store's cached files are unchanged as well
    _cached_dir(tmp_path, old)
    assert {p.name: _md5(p) for p in store.iterdir()} == new_files  # the workspace is what dvc.lock says
    # The same files; all but errors.csv (no video failed either time) hold the changed video's new frames.
    changed = {name for name in new_files if new_files[name] != old_files[name]}
    assert new_files.keys() == old_files.keys() and changed == {
        "frames-00000.mjpeg",
        "frames-00000.offsets.npy",
        "index.csv",
        "sources.csv",
        "meta.json",
    }


def test_seeking_to_start_sec_gives_the_frames_of_decoding_from_the_start(tmp_path):
    clip = tmp_path / "long.mp4"
    # 12 s at 25 fps with a keyframe every 2 s: a late start is reached by seeking.
    video.write_video(clip, moving_square(300, 48, 64, seed=3), 25, options={"g": "50", "keyint_min": "50"})
    for fps, start, end in ((0, 7.3, 9.0), (10, 7.3, 9.1), (4, 5.0, None), (25, 10.02, 11.0)):
        with video.Decoder(clip, fps=fps, start_sec=start, end_sec=end, skip=False) as seeking:
            sought = np.stack(list(seeking))
        with video.Decoder(clip, fps=fps, start_sec=start, end_sec=end, seek=False, skip=False) as linear:
            everything = np.stack(list(linear))
        np.testing.assert_array_equal(sought, everything)
        assert seeking.duration_sec == linear.duration_sec
        # Decoding began at most one keyframe interval (2 s) before the start.
        assert seeking.decoded <= linear.decoded - int((start - 2) * 25), (seeking.decoded, linear.decoded)


def _vfr_clip(path: Path) -> None:
    frames = moving_square(90, 48, 64, seed=5)
    gaps = np.random.default_rng(0).integers(1, 5, len(frames))
    video.write_video(path, frames, 30, pts=list(np.cumsum(gaps) - gaps[0]), time_base=Fraction(1, 90))


@pytest.mark.parametrize("kind", ["bframes", "vfr"])
def test_skipping_unused_frames_gives_the_frames_of_full_decoding(tmp_path, kind):
    clip = tmp_path / f"{kind}.mp4"
    if kind == "bframes":
        video.write_video(
            clip, moving_square(150, 48, 64, seed=4), 30
        )  # libx264 veryfast: 3 B-frames, pyramid
    else:
        _vfr_clip(clip)
    for fps in (10, 7, 2.5):
        with video.Decoder(clip, fps=fps) as skipping:
            fast = np.stack(list(skipping))
        with video.Decoder(clip, fps=fps, skip=False) as full:
            slow = np.stack(list(full))
        np.testing.assert_array_equal(fast, slow)
        assert skipping.duration_sec == full.duration_sec
        if kind == "bframes":
            assert skipping.skipped > 0 and skipping.decoded < full.decoded


def _importers(*args: str) -> subprocess.CompletedProcess:
    """``python -m data_scripts.importers ARGS`` from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "data_scripts.importers", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_tree_import_gives_unique_ids_when_stems_collide(tmp_path, make_video):
    for name in ("a.mp4", "a.avi", "b.mp4"):
        make_video(f"data/left/{name}")
        make_video(f"data/right/{name}", seed=1)
    out = tmp_path / "data" / "manifest.csv"
    done = _importers("tree", str(tmp_path / "data"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    ids = sorted(e.video_id for e in read_manifest(out))
    assert ids == ["left/a.avi", "left/a.mp4", "left/b", "right/a.avi", "right/a.mp4", "right/b"]


def test_importer_problems_are_one_line_errors(tmp_path):
    done = _importers("tree", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.csv"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().startswith("error:")
        and "nowhere" in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 1\nB/v_A_g01_c01.avi 2\n")
    (tmp_path / "lists" / "testlist01.txt").write_text("")
    done = _importers(
        "ucf101", str(tmp_path), "--splits", str(tmp_path / "lists"), "--out", str(tmp_path / "m.csv")
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr and "v_A_g01_c01" in done.stderr
    assert not (tmp_path / "m.csv").exists()


def test_synthetic_data_is_byte_identical_under_load(tmp_path):
    from data_scripts import synth

    synth.generate("gestures", tmp_path / "quiet", count=2, seed=7, workers=1)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        synth.generate("gestures", tmp_path / "loaded", count=2, seed=7, workers=2)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    quiet = sorted((tmp_path / "quiet").rglob("*.*"))
    assert len(quiet) > 10
    for path in quiet:
        twin = tmp_path / "loaded" / path.relative_to(tmp_path / "quiet")
        assert path.read_bytes() == twin.read_bytes(), path.name
    assert json.loads((tmp_path / "quiet" / "caption_keywords.json").read_text())
