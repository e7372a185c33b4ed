"""Benchmark: the pipeline's stages on a dataset shaped like a real one, and what that projects to.

    python bench/scale.py                   # make bench-scale: 1,000 clips of 10 s, 320x240, 25 fps, 20 classes
    python bench/scale.py --clips 200 --seconds 5 --size 320x240 --classes 20 --epochs 2

Generates the dataset (H.264 MP4 at 25 fps: a textured background that pans, a moving object whose
path and colour give the class, light sensor noise; written by PyAV in parallel), then runs the
real stages as a user does, each as its own `vpipe` process in a scratch project (its own MLflow
store and DVC cache):

1. extract: `vpipe extract --fps 10 --size 112` (the default JPEG frame store);
2. backbone: `vpipe fit -c configs/backbone_gestures.yaml` on this store for ``--epochs`` epochs
   (or none with ``--weights FILE``: the features stage then reads those weights);
3. features: `vpipe features --pool grid --grid 2` with those weights;
4. head: `vpipe fit -c configs/gesture_gru.yaml` on the feature store;
5. dvc: `dvc add` of the frame and feature stores with the project's cache settings.

Per stage it prints wall time, throughput (seconds of video per second, and frames per second per
core, frames counted at the store's 10 fps) and the peak RSS of the largest process; then the bytes
on disk (sources, frame store, feature store, DVC cache beyond the workspace, MLflow artifacts) and
the peak RSS of one worker decoding one long video (``--long-minutes`` at 1280x720).

The projection to UCF101 (13,320 clips, 26.7 h, 6.5 GB) and Kinetics-400 (about 240,000 clips of
10 s, 650 h, about 450 GB) keeps each stage's start-up as measured and scales its work: decoding and
the features by hours of video, the backbone and the head by clips (they sample 8 frames a clip). On
this machine as measured; on a 16-core node with one GPU, extraction at 16/cores times this machine's
rate (one video per core), the features at the rate an H200 reached for this pipeline (18,295
frames in 1.4 s), the backbone faster by the same GPU-to-CPU ratio, and the head at the H200's 8 s
for 30 epochs over 800 clips. Store bytes scale by hours; the generated videos compress far better
than real ones, so the stores are also given as a fraction of the real datasets' own bytes.
Results: bench/results/scale.json (``--report FILE`` prints an earlier run's table again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from machine import machine  # noqa: E402

from pipeline.media.manifest import write_manifest  # noqa: E402
from pipeline.media.video import write_video  # noqa: E402

FPS = 25
DATASETS = {  # clips, hours of video, source bytes
    "UCF101": (13_320, 26.67, 6.5e9),
    "Kinetics-400": (240_000, 650.0, 450e9),
}
H200_FEATURES_FRAMES_S = 18_295 / 1.4
# One process: run a command as its child and print the child's peak RSS (KiB), so each stage's peak
# is its own (RUSAGE_CHILDREN of the benchmark itself only ever grows).
PEAK = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def clip_frames(seed: int, label: int, classes: int, frames: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texture = rng.integers(40, 200, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
    background = np.kron(texture, np.ones((8, 8, 1), np.uint8))  # blocky texture, blurred below
    background = ((background[:-1, :-1].astype(np.uint16) + background[1:, 1:]) // 2).astype(np.uint8)
    noise = rng.integers(0, 6, (4, h, w, 3), dtype=np.uint8)
    angle = 2 * np.pi * label / classes
    colour = np.array([60 + 190 * (label % 5) / 4, 255 - 190 * (label // 5 % 4) / 3, 128], np.uint8)
    out = np.empty((frames, h, w, 3), np.uint8)
    pan = rng.integers(0, 8)
    side = max(8, h // 6)
    for t in range(frames):
        s = t / max(frames - 1, 1)
        out[t] = background[pan + t % 8 : pan + t % 8 + h, :w] + noise[t % 4]
        cx = int(w / 2 + np.cos(angle) * (s - 0.5) * w * 0.6)
        cy = int(h / 2 + np.sin(angle) * (s - 0.5) * h * 0.6)
        out[t, max(cy - side, 0) : cy + side, max(cx - side, 0) : cx + side] = colour
    return out


def _write_clip(job: tuple) -> None:
    path, seed, label, classes, frames, w, h = job
    write_video(path, clip_frames(seed, label, classes, frames, w, h), FPS, crf=23)


def generate(folder: Path, clips: int, seconds: float, size: tuple[int, int], classes: int) -> Path:
    """``clips`` videos in ``folder/videos`` and their manifest (70/15/15 split per class)."""
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    jobs, rows = [], []
    for i in range(clips):
        label, k = i % classes, i // classes
        share = k / max(1, -(-clips // classes))  # this clip's place among its class's clips
        split = "train" if share < 0.7 else "val" if share < 0.85 else "test"
        path = folder / "videos" / f"c{i:06d}.mp4"
        jobs.append((path, i, label, classes, int(seconds * FPS), *size))
        rows.append(
            {
                "video_id": f"c{i:06d}",
                "path": f"videos/{path.name}",
                "label": f"class{label:02d}",
                "split": split,
            }
        )
    # H.264 bytes depend only on the frames (write_video: one encoder thread), whatever the pool.
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_clip, jobs, chunksize=4)
    write_manifest(manifest, rows)
    return manifest


def folder_bytes(*folders: Path) -> int:
    """Bytes of the files under ``folders``, a hard-linked file counted once."""
    seen: dict[int, int] = {}
    for folder in folders:
        for p in folder.rglob("*") if folder.exists() else []:
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                seen[st.st_ino] = st.st_size
    return sum(seen.values())


def run(name: str, command: list[str], cwd: Path, env: dict) -> dict:
    """Run one stage; its wall time, the peak RSS of its largest process, and the split of its wall
    time into start-up and work as the vpipe process records it (``VPIPE_TIMINGS``)."""
    timings = cwd / f".timings-{name.replace(' ', '_')}.jsonl"
    timings.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK, *command],
        cwd=cwd, env={**env, "VPIPE_TIMINGS": str(timings)}, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{name} failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    lines = [json.loads(line) for line in timings.read_text().splitlines()] if timings.is_file() else []
    work = sum(line["phases"]["work"] for line in lines if line.get("rank", 0) == 0) if lines else seconds
    print(f"  {name}: {seconds:.1f} s", file=sys.stderr)
    return {"seconds": seconds, "work_s": min(work, seconds), "fixed_s": seconds - min(work, seconds),
            "peak_rss_mb": peak / 1024}  # fmt: skip


def long_video_rss(folder: Path, minutes: float) -> dict:
    """Peak RSS of one worker decoding one long 720p video into a store (the extract parent included)."""
    path = folder / "long.mp4"
    if not path.is_file():
        frames = int(minutes * 60 * 10)  # 10 fps: the length is what matters to memory, not the rate
        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=10, options={"preset": "ultrafast", "crf": "30"})
            stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
            base = clip_frames(0, 3, 20, 8, 1280, 720)
            for t in range(frames):
                for packet in stream.encode(av.VideoFrame.from_ndarray(base[t % 8], format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    write_manifest(
        folder / "long.csv", [{"video_id": "long", "path": "long.mp4", "label": "x", "split": "train"}]
    )
    env = dict(os.environ)
    result = run(
        "long video",
        [sys.executable, "-m", "pipeline", "extract", "--manifest", str(folder / "long.csv"), "--out", str(folder / "long_frames"),
         "--fps", "10", "--size", "112", "--workers", "1"],
        folder, env,
    )  # fmt: skip
    return {"minutes": minutes, "width": 1280, "height": 720, "bytes": path.stat().st_size, **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", default="320x240", help="WxH of the generated videos")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2, help="backbone epochs (ignored with --weights)")
    p.add_argument("--weights", default=None, help="backbone weights (.safetensors) instead of training")
    p.add_argument("--long-minutes", type=float, default=20.0, help="the long video's length (0: skip)")
    p.add_argument("--work", default=str(HERE / "results" / "scale"), help="scratch project (kept)")
    p.add_argument("--report", metavar="JSON", help="print the table of an earlier run's results and stop")
    args = p.parse_args(argv)
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    w, h = (int(x) for x in args.size.lower().split("x"))
    work = Path(args.work).resolve()
    data = work / f"videos-{args.clips}x{args.seconds:g}s-{w}x{h}-{args.classes}"
    project = work / "project"
    if project.exists():
        shutil.rmtree(project)  # stores, models and MLflow from scratch; the generated videos are kept
    project.mkdir(parents=True)
    began = time.perf_counter()
    started = time.perf_counter()
    manifest = generate(data, args.clips, args.seconds, (w, h), args.classes)
    generated = time.perf_counter() - started
    hours = args.clips * args.seconds / 3600
    env = {
        **os.environ,
        "VPIPE_ROOT": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    vpipe = [sys.executable, "-m", "pipeline"]
    stages = {}
    stages["extract"] = run(
        "extract", [*vpipe, "extract", "--manifest", str(manifest), "--out", "data/frames/scale", "--fps", "10", "--size", "112"],
        project, env,
    )  # fmt: skip
    from pipeline.storage.store import FeatureStore, FrameStore

    frames = sum(r.length for r in FrameStore(project / "data/frames/scale").index)
    weights = args.weights
    if not weights:
        stages["backbone"] = run(
            "backbone",
            [*vpipe, "fit", "-c", str(ROOT / "configs/backbone_gestures.yaml"), "--name", "backbone_scale",
             "--data.init_args.frames", "data/frames/scale", "--trainer.max_epochs", str(args.epochs)],
            project, env,
        )  # fmt: skip
        weights = str(project / "models/backbone_scale/backbone.safetensors")
    stages["features"] = run(
        "features",
        [*vpipe, "features", "--frames", "data/frames/scale", "--out", "data/features/scale", "--weights", weights,
         "--pool", "grid", "--grid", "2", "--batch-size", "256"],
        project, env,
    )  # fmt: skip
    stages["head"] = run(
        "head",
        [*vpipe, "fit", "-c", str(ROOT / "configs/gesture_gru.yaml"), "--name", "scale_gru",
         "--data.init_args.features", "data/features/scale"],
        project, env,
    )  # fmt: skip
    head_metrics = json.loads((project / "metrics/scale_gru.json").read_text())
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=project, check=True, env=env)
    shutil.copyfile(ROOT / ".dvc/config", project / ".dvc/config")
    stages["dvc add"] = run(
        "dvc add", [str(Path(sys.executable).parent / "dvc"), "add", "-q", "data/frames/scale", "data/features/scale"],
        project, env,
    )  # fmt: skip
    outputs = [project / "data/frames/scale", project / "data/features/scale"]
    sizes = {
        "sources": sum(p.stat().st_size for p in (data / "videos").iterdir()),
        "frame store": folder_bytes(outputs[0]),
        "feature store": folder_bytes(outputs[1]),
        "DVC cache beyond the workspace": folder_bytes(*outputs, project / ".dvc/cache")
        - folder_bytes(*outputs),
        "MLflow artifacts": folder_bytes(project / "mlartifacts"),
    }
    long_video = long_video_rss(work, args.long_minutes) if args.long_minutes else None
    features_frames = sum(r.length for r in FeatureStore(project / "data/features/scale").index)
    results = {
        "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(torch_threads=False),
        "dataset": {"clips": args.clips, "seconds": args.seconds, "size": [w, h], "classes": args.classes,
                    "fps": FPS, "hours": hours, "frames_stored": frames, "generate_s": generated},
        "stages": stages,
        "bytes": sizes,
        "head_test_acc": head_metrics.get("test/acc"),
        "long_video": long_video,
        "total_s": time.perf_counter() - began,
    }  # fmt: skip
    assert features_frames == frames
    report(results)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scale.json").write_text(json.dumps(results, indent=2) + "\n")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def report(r: dict) -> None:
    d, m = r["dataset"], r["machine"]
    video_s = d["clips"] * d["seconds"]
    print(
        f"\n{d['clips']} clips x {d['seconds']:g} s ({d['hours']:.2f} h) at {d['size'][0]}x{d['size'][1]}, {d['fps']} fps "
        f"H.264, {d['classes']} classes; {d['frames_stored']} frames stored (10 fps, 112 px, jpeg); "
        f"{m['cores']} cores ({m['cpu']}); videos generated in {d['generate_s']:.0f} s"
    )
    print(
        f"{'stage':10}{'wall s':>8}{'start-up s':>12}{'work s':>8}{'video-s/s':>11}{'frames/s/core':>15}{'peak RSS':>11}"
    )
    for name, s in r["stages"].items():
        rate = video_s / s["seconds"]
        per_core = d["frames_stored"] / s["seconds"] / m["cores"]
        print(
            f"{name:10}{s['seconds']:8.1f}{s['fixed_s']:12.1f}{s['work_s']:8.1f}{rate:11.1f}{per_core:15.0f}"
            f"{s['peak_rss_mb']:8.0f} MB"
        )
    print(f"head test accuracy: {r['head_test_acc']:.3f}; the whole run: {r['total_s']:.0f} s")
    b = r["bytes"]
    print("bytes on disk: " + "; ".join(f"{k} {_size(v)}" for k, v in b.items()))
    print(f"frame store / sources: {b['frame store'] / b['sources']:.2f}")
    if r["long_video"]:
        lv = r["long_video"]
        print(
            f"one worker, one {lv['minutes']:g}-minute {lv['width']}x{lv['height']} video: {lv['seconds']:.0f} s, "
            f"peak RSS {lv['peak_rss_mb']:.0f} MB (largest process)"
        )
    names = list(DATASETS)
    print("\nprojection (start-up as measured + work x the dataset's hours, or clips for backbone and head):")
    print(f"{'':34}" + "".join(f"{n:>16}" for n in names))
    row = lambda label, values: print(f"{label:34}" + "".join(f"{v:>16}" for v in values))  # noqa: E731
    for label, key in (("frame store", "frame store"), ("feature store", "feature store")):
        row(label, [_size(b[key] / d["hours"] * ds[1]) for ds in DATASETS.values()])
    row(
        "frame store / their videos",
        [f"{b['frame store'] / d['hours'] * ds[1] / ds[2]:.2f}" for ds in DATASETS.values()],
    )
    for name, s in r["stages"].items():
        if name == "dvc add":
            continue
        row(
            f"{name}, this machine",
            [_duration(s["fixed_s"] + s["work_s"] * scale_of(name, r, ds)) for ds in DATASETS.values()],
        )
        row(
            f"{name}, 16 cores + 1 GPU",
            [_duration(gpu_node_seconds(name, s, r, ds)) for ds in DATASETS.values()],
        )


def scale_of(name: str, r: dict, dataset: tuple) -> float:
    """How much more work ``dataset`` (clips, hours, bytes) is for a stage: decoding and the features
    grow with the hours of video; the backbone and the heads sample 8 frames per clip (TSN), so their
    epochs grow with the clips."""
    d = r["dataset"]
    return dataset[0] / d["clips"] if name in ("backbone", "head") else dataset[1] / d["hours"]


def gpu_node_seconds(name: str, stage: dict, r: dict, dataset: tuple) -> float:
    """A stage's time on a 16-core node with one GPU, for ``dataset`` (clips, hours, bytes)."""
    d, cores = r["dataset"], r["machine"]["cores"]
    scale = scale_of(name, r, dataset)
    if name == "extract":  # one video per core: the rate grows with the cores
        work = stage["work_s"] * scale * cores / 16
    elif name == "features":  # frames at the H200's measured rate
        work = d["frames_stored"] * scale / H200_FEATURES_FRAMES_S
    elif name == "head":  # the cached GRU's 30 epochs took 8 s over the 800 gesture clips on an H200
        work = 8.0 * dataset[0] / 800
    else:  # the backbone: faster by the features' GPU-to-this-machine ratio
        here = d["frames_stored"] / r["stages"]["features"]["work_s"]
        work = stage["work_s"] * scale * here / H200_FEATURES_FRAMES_S
    return stage["fixed_s"] + work


if __name__ == "__main__":
    main()
