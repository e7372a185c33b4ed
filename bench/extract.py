"""Benchmark: `vpipe extract` against the FFmpeg command line and torchcodec doing the same work, with
each tool's start-up timed apart from its work.

    python bench/extract.py [--clips N] [--repeat R]     # defaults: 96 clips, 3 runs of each tool
    python bench/extract.py --quick --repeat 2           # a smoke run on small clips (not the benchmark)

Generates N H.264 clips (720p, 30 fps, 20 s, GOP 30 and 250 in turn, x264 `veryfast`: B-frames on;
cached under bench/results/clips_v3), then in one run, side by side, on every core:

- ``vpipe extract --size 112 --workers <cores>`` over all clips (the whole command, store included);
- FFmpeg: ``ffmpeg -threads 1 -i CLIP -vf fps=F,scale=112:112 -pix_fmt rgb24 -f rawvideo -``, one
  process per core over the clips (the binary shipped in the imageio-ffmpeg wheel), and the same
  decoding every frame to ``-f null`` (the floor for anything that decodes every frame);
- torchcodec (a decoder a PyTorch user would pick), one process per core, frames at the same times,
  resized to 112 by its decoder; skipped with a message where it is not installed.

Two workloads: ``--fps 10`` (a third of the 30 fps frames are shown) and the native rate.

Start-up and work. Every run of a tool over the clips is paired with a run of the same command over
one tiny clip per core (320×180, 1 s): the same interpreter start and imports (torch and torchcodec in
each torchcodec process, NumPy and PyAV in vpipe's), the same worker processes started, the same
store written and closed, and next to no decoding. That run's wall time is the tool's start-up; the
full run's wall time less it is its work, and the work's frames/s its throughput (each FFmpeg
process's own start per clip stays in FFmpeg's work: one process per clip is how it is used). Each
tool runs ``--repeat`` times, the tools alternating; every run is recorded, and the summary takes the
median. Printed per tool and workload: start-up s, work s, frames, work frames/s, peak RSS, and how
far apart its runs' work times are (they should agree within 10 %); then the ratios of the work
throughputs ours/FFmpeg (target >= 1.3 at 10 fps) and ours/torchcodec (target >= 2). Also: the work of
ours on 4x the videos against 1x (target <= 4.4; peak-RSS ratio <= 1.2; RSS is summed over the process
tree, sampled every 20 ms), and the work of a 5 s clip cut at the start and at the end of a 60 s video
(``start_sec`` seeks, so both cost the same).

Size: the default 96 clips (57,600 frames at 30 fps, 19,200 shown at 10 fps) are 12 times the 8 clips
of the earlier version of this benchmark, which took `vpipe extract` 2.5 s at 10 fps and 3.8 s at the
native rate on this project's 2-core CPU, about 0.4 s of each start-up: about 25 s and 40 s of work
now. torchcodec is the slowest (its 8-clip runs took 12 s and 23 s): about 20 of the about 30
minutes the whole run takes there (10 without torchcodec), more the first time (the clips are
encoded once, on every core). ``--clips`` sets the size.

Results go to bench/results/extract.json (``--quick``: bench/results/quick/extract.json) with the
command, the machine and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine  # noqa: E402

RESULTS = HERE / "results"
SIZE = 112
CORES = os.cpu_count() or 1


def specs(clips: int, quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(name, width, height, gop, seconds) of the benchmark's clips: GOP 30 and 250 in turn."""
    full = [(f"720p_gop{gop}_{i}", 1280, 720, gop, 20) for i in range((clips + 1) // 2) for gop in (30, 250)]
    if quick:
        return [(n, w // 4, h // 4, g, 4) for n, w, h, g, _ in full[: min(clips, 4)]]
    return full[:clips]


TINY = [(f"tiny_{i}", 320, 180, 30, 1) for i in range(CORES)]  # one a core: every worker starts

TORCHCODEC = """
import sys, multiprocessing as mp
import numpy as np

def run(job):
    path, fps = job
    from torchcodec.decoders import VideoDecoder
    from torchvision.transforms import v2
    decoder = VideoDecoder(path, num_ffmpeg_threads=1, transforms=[v2.Resize(({size}, {size}))])
    meta = decoder.metadata
    if fps == 0:
        return len(decoder.get_frames_in_range(0, meta.num_frames).data)
    begin, end = meta.begin_stream_seconds, meta.end_stream_seconds
    times = list(np.arange(begin, end - 1e-6, 1 / fps))
    return len(decoder.get_frames_played_at(seconds=times).data)

if __name__ == "__main__":
    fps, paths = float(sys.argv[1]), sys.argv[2:]
    with mp.get_context("spawn").Pool({cores}) as pool:
        print(sum(pool.map(run, [(p, fps) for p in paths], chunksize=1)))
"""


def make_clip(path: Path, width: int, height: int, gop: int, seconds: int, seed: int = 0) -> None:
    """A moving gradient with moving boxes: compresses like camera footage, not like noise.

    Encoded with x264's `veryfast` preset (CABAC, deblocking and B-frames on, as in typical camera and
    web video); `ultrafast` turns them off and makes decoding unrealistically cheap.
    """
    import av

    fps = 30
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "preset": "veryfast",
            "crf": "23",
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
        }
        for i in range(fps * seconds):
            frame = np.empty((height, width, 3), np.uint8)
            frame[..., 0] = ((xx + 4 * i + 17 * seed) % 256).astype(np.uint8)
            frame[..., 1] = ((yy + 2 * i) % 256).astype(np.uint8)
            frame[..., 2] = 128
            for k in range(3):
                x = int((i * (5 + 3 * k) + 50 * seed) % (width - 200))
                y = int((height / 4) * (k + 0.5))
                frame[y : y + 120, x : x + 200] = (255 - 60 * k, 40 * k, 200)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _clip_path(folder: Path, name: str, seconds: int) -> Path:
    return folder / f"{name}_{seconds}s.mp4"


def _generate(job: tuple) -> None:
    path, w, h, gop, seconds, seed = job
    print(f"generating {path.name} ...", file=sys.stderr)
    make_clip(path.with_suffix(".tmp.mp4"), w, h, gop, seconds, seed)
    path.with_suffix(".tmp.mp4").rename(path)


def clip(folder: Path, name: str, w: int, h: int, gop: int, seconds: int, seed: int = 0) -> Path:
    path = _clip_path(folder, name, seconds)
    if not path.is_file():
        _generate((path, w, h, gop, seconds, seed))
    return path


def clips(spec: list[tuple], folder: Path) -> list[Path]:
    """The clips of ``spec`` (clip i seeded with i), the missing ones encoded first, one process a core."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, missing = [], []
    for seed, (name, w, h, gop, seconds) in enumerate(spec):
        paths.append(_clip_path(folder, name, seconds))
        if not paths[-1].is_file():
            missing.append((paths[-1], w, h, gop, seconds, seed))
    if missing:
        with ProcessPoolExecutor(min(CORES, len(missing))) as pool:
            list(pool.map(_generate, missing))
    return paths


def measure(cmd: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float, bytes]:
    """Wall seconds, peak RSS of the whole process tree (MiB), and stdout if asked for."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    peak, stop = [0], threading.Event()

    def sample():
        parent = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"{cmd[:3]} took over 1800 s") from None
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - started, peak[0] / 2**20, out or b""


def _result(seconds: float, frames: int, rss: float = 0.0) -> dict:
    return {"seconds": seconds, "frames": int(frames), "peak_rss_mib": rss}


def ours(paths: list[Path], fps: float, work: Path, tag: str, repeat: int = 1, extra: str = "") -> dict:
    manifest = work / f"manifest_{tag}.csv"
    lines = ["video_id,path,label,split" + (",start_sec,end_sec" if extra else "")]
    lines += [f"v{r}_{p.stem},{p},x,train{extra}" for r in range(repeat) for p in paths]
    manifest.write_text("\n".join(lines) + "\n")
    out = work / f"store_{tag}"
    shutil.rmtree(out, ignore_errors=True)  # a run from scratch, not an incremental one
    seconds, rss, _ = measure(
        [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--fps",
            str(fps),
            "--size",
            str(SIZE),
            "--workers",
            str(CORES),
        ]
    )
    frames = sum(int(line.split(",")[5]) for line in (out / "index.csv").read_text().splitlines()[1:])
    shutil.rmtree(out, ignore_errors=True)
    return _result(seconds, frames, rss)


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(paths: list[Path], fps: float, null: bool = False) -> dict:
    """One FFmpeg process per core over the clips; ``null`` decodes every frame and keeps nothing."""
    rate = f"fps={fps}," if fps else ""
    args = (
        ["-f", "null", "-"]
        if null
        else ["-vf", f"{rate}scale={SIZE}:{SIZE}", "-pix_fmt", "rgb24", "-f", "rawvideo", "-"]
    )
    script = (
        "import subprocess, sys\nfrom concurrent.futures import ThreadPoolExecutor\n"
        f"cmd = {[ffmpeg_exe(), '-v', 'error', '-threads', '1', '-i']!r}\nargs = {args!r}\n"
        "def run(p): return len(subprocess.run(cmd + [p] + args, capture_output=True, check=True).stdout)\n"
        f"with ThreadPoolExecutor({CORES}) as pool: print(sum(pool.map(run, sys.argv[1:])))\n"
    )
    seconds, rss, out = measure([sys.executable, "-c", script, *map(str, paths)], stdout=subprocess.PIPE)
    return _result(seconds, 0 if null else int(out) // (SIZE * SIZE * 3), rss)


def torchcodec_version() -> str | None:
    """torchcodec's version where it can be loaded (its FFmpeg libraries found), else None (and why,
    on stderr)."""
    try:
        import torchcodec
    except Exception as err:  # noqa: BLE001 - not installed, or its FFmpeg libraries are missing
        print(
            f"torchcodec skipped: {type(err).__name__}: {' '.join(str(err).split())[:200]}", file=sys.stderr
        )
        return None
    return getattr(torchcodec, "__version__", "?")


def torchcodec(paths: list[Path], fps: float, work: Path) -> dict:
    script = work / "torchcodec_run.py"  # a file: spawned pool workers re-import it
    script.write_text(TORCHCODEC.format(size=SIZE, cores=CORES))
    seconds, rss, out = measure(
        [sys.executable, str(script), str(fps), *map(str, paths)], stdout=subprocess.PIPE
    )
    return _result(seconds, int(out), rss)


def one(tool: str, paths: list[Path], fps: float, work: Path, tag: str) -> dict:
    if tool == "vpipe extract":
        return ours(paths, fps, work, tag)
    if tool == "torchcodec":
        return torchcodec(paths, fps, work)
    return ffmpeg(paths, fps, null=tool == "ffmpeg decode only")


def paired(tool: str, paths: list[Path], tiny: list[Path], fps: float, work: Path) -> dict:
    """One run of ``tool`` over the tiny clips (its start-up), then over the clips: start-up, work."""
    start = one(tool, tiny, fps, work, "tiny")
    full = one(tool, paths, fps, work, "full")
    seconds = full["seconds"] - start["seconds"]
    frames = full["frames"] - start["frames"]
    return {
        "startup_s": start["seconds"],
        "startup_frames": start["frames"],
        "total_s": full["seconds"],
        "frames": full["frames"],
        "work_s": seconds,
        "work_frames": frames,
        "work_fps": frames / seconds if frames and seconds > 0 else None,
        "peak_rss_mib": full["peak_rss_mib"],
    }


def summary(runs: list[dict]) -> dict:
    work = [r["work_s"] for r in runs]
    rates = [r["work_fps"] for r in runs if r["work_fps"]]
    return {
        "startup_s": statistics.median(r["startup_s"] for r in runs),
        "work_s": statistics.median(work),
        "work_frames": runs[0]["work_frames"],
        "work_fps": statistics.median(rates) if rates else None,
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "spread": max(work) / min(work) - 1 if min(work) > 0 else None,  # 0.10: 10 % apart
    }


def seek_costs(work: Path, quick: bool, folder: Path, tiny: Path) -> dict:
    """The work of extracting a 5 s clip at the start and at the end of one 60 s video (best of two
    each), start-up (one tiny clip, best of two) apart."""
    long = clip(folder, "720p_gop60_long", 320 if quick else 1280, 180 if quick else 720, 60, 60)
    startup = min(ours([tiny], 10, work, "seek_tiny")["seconds"] for _ in range(2))
    costs = {"startup_s": startup}
    for name, start in (("first 5 s", 0), ("last 5 s", 55)):
        total = min(
            ours([long], 10, work, "seek", extra=f",{start},{start + 5}")["seconds"] for _ in range(2)
        )
        costs[name] = {"total_s": total, "work_s": total - startup}
    return costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=96, help="720p clips of 20 s (GOP 30 and 250 in turn)")
    parser.add_argument(
        "--quick", action="store_true", help="4 small clips of 4 s: a smoke run, not the benchmark"
    )
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each tool, all recorded")
    parser.add_argument("--out", default=None, help="results JSON (default: bench/results/extract.json)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    folder = RESULTS / ("clips_quick_v3" if args.quick else "clips_v3")
    paths = clips(specs(args.clips, args.quick), folder)
    tiny = clips(TINY, RESULTS / "clips_tiny_v1")
    versions = {
        "ffmpeg": subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True).stdout.split(
            "\n"
        )[0]
    }
    tc = torchcodec_version()
    if tc:
        versions["torchcodec"] = tc
    tools = ["ffmpeg CLI", *(["torchcodec"] if tc else []), "vpipe extract"]
    runs: dict = {label: {tool: [] for tool in tools} for label in ("10 fps", "native")}
    floor: list[dict] = []
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        work = Path(tmp)
        for _ in range(args.repeat):
            for label, fps in (("10 fps", 10), ("native", 0)):
                for tool in tools:  # alternating: a slow spell of the machine touches every tool
                    runs[label][tool].append(paired(tool, paths, tiny, fps, work))
                    print(
                        f"  {label}, {tool}: {runs[label][tool][-1]['work_s']:.1f} s of work", file=sys.stderr
                    )
            floor.append(paired("ffmpeg decode only", paths, tiny, 0, work))
        stats = {label: {tool: summary(r) for tool, r in by_tool.items()} for label, by_tool in runs.items()}
        stats["every frame"] = {"ffmpeg decode only": summary(floor)}
        one_x = stats["10 fps"]["vpipe extract"]
        four = ours(paths, 10, work, "x4", repeat=4)
        four_work = four["seconds"] - one_x["startup_s"]
        scaling = {
            "total_s": four["seconds"],
            "work_s": four_work,
            "frames": four["frames"],
            "peak_rss_mib": four["peak_rss_mib"],
            "work_ratio": four_work / one_x["work_s"],
            "rss_ratio": four["peak_rss_mib"] / one_x["peak_rss_mib"],
        }
        seek = seek_costs(work, args.quick, folder, tiny[0])

    print(
        f"\nextract --size {SIZE} on {len(paths)} clips ({paths[0].stem} ...), {CORES} cores, "
        f"median of {args.repeat} runs each; start-up: the same command over {len(tiny)} tiny clip(s)"
    )
    print(
        f"{'':30}{'start-up s':>11}{'work s':>9}{'frames':>8}{'frames/s':>10}{'peak RSS MiB':>14}{'runs apart':>12}"
    )
    for label, by_tool in stats.items():
        for tool, s in by_tool.items():
            frames, rate = (
                (f"{s['work_frames']:8d}", f"{s['work_fps']:10.1f}")
                if s["work_fps"]
                else (f"{'-':>8}", f"{'-':>10}")
            )
            spread = f"{100 * s['spread']:11.1f}%" if s["spread"] is not None else f"{'-':>12}"
            flag = "" if s["spread"] is not None and s["spread"] <= 0.10 else "  (over 10 %)"
            print(
                f"{label + ': ' + tool:30}{s['startup_s']:11.2f}{s['work_s']:9.2f}{frames}{rate}"
                f"{s['peak_rss_mib']:14.0f}{spread}{flag}"
            )
    ratios: dict = {}
    for label in ("10 fps", "native"):
        r = stats[label]
        ours_fps = r["vpipe extract"]["work_fps"]
        ratios[label] = {  # none where a work time was lost in the noise (a workload far too small)
            f"ours/{tool}": ours_fps / r[tool]["work_fps"]
            for tool in tools
            if tool != "vpipe extract" and ours_fps and r[tool]["work_fps"]
        }
        line = ", ".join(f"{k} {v:.2f}x" for k, v in ratios[label].items())
        target = "   (targets at 10 fps: >= 1.3x ffmpeg CLI, >= 2x torchcodec)" if label == "10 fps" else ""
        print(f"{label}: work throughput {line}{target}")
    floor_s = stats["every frame"]["ffmpeg decode only"]["work_s"]
    ratios["decode-only floor / ours work, 10 fps"] = floor_s / stats["10 fps"]["vpipe extract"]["work_s"]
    print(
        f"ffmpeg decoding every frame (the floor): {floor_s:.2f} s of work, "
        f"{ratios['decode-only floor / ours work, 10 fps']:.2f}x the work of vpipe extract at 10 fps"
    )
    print(
        f"1x -> 4x videos (vpipe extract, 10 fps): work ratio {scaling['work_ratio']:.2f} (target <= 4.4), "
        f"peak-RSS ratio {scaling['rss_ratio']:.2f} (target <= 1.2)"
    )
    first, last = seek["first 5 s"]["work_s"], seek["last 5 s"]["work_s"]
    print(
        f"5 s clip of a 60 s video, work (start-up {seek['startup_s']:.2f} s apart): first 5 s {first:.2f} s, "
        f"last 5 s {last:.2f} s (ratio {last / first:.2f}; cost follows the clip's length, not its offset)"
    )
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "") / "extract.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python bench/extract.py " + " ".join(sys.argv[1:] if argv is None else argv),
                **machine(torch_threads=False),
                "versions": versions,
                "clips": [p.name for p in paths],
                "startup_clips": [p.name for p in tiny],
                "size": SIZE,
                "repeat": args.repeat,
                "runs": {**runs, "every frame": {"ffmpeg decode only": floor}},
                "summary": stats,
                "work_throughput_ratios": ratios,
                "ours_x4": scaling,
                "seek": seek,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
