"""Bytes of a frame store against the bytes of the videos it came from, per codec, on any folder of videos.

    python bench/store_bytes.py ../shared/data/real_videos          # the real clips beside the project
    python bench/store_bytes.py /data/UCF-101/ApplyEyeMakeup --fps 10 --size 112

Extracts every video file of the folder (not its subfolders) as the pipeline's stages do (default: 10 fps,
112 px, one worker per core) into a raw and a JPEG frame store, and prints per video and in all the
store's bytes over the video's (`index.csv` gives each video's frames; the JPEG bytes of a video are its
images' bytes). Writes bench/results/store_bytes.json with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine  # noqa: E402

from pipeline.media.manifest import write_manifest  # noqa: E402
from pipeline.stages.extract import extract  # noqa: E402
from pipeline.storage.store import FrameStore  # noqa: E402

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"}


def video_bytes_in_store(store: FrameStore) -> dict[str, int]:
    """Each video's bytes in ``store``: its rows of a raw shard, its images in a JPEG one."""
    out = {}
    for row in store.index:
        if store.codec == "jpeg":
            out[row.video_id] = int(store.encoded(row.video_id)[1].sum())
        else:
            shard = store.shard(row.shard)
            out[row.video_id] = int(row.length * np.prod(shard.shape[1:]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder")
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--size", default="112")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_bytes.json"))
    args = parser.parse_args(argv)
    folder = Path(args.folder).resolve()
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise SystemExit(f"{folder}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
    sources = {p.name.replace(".", "_"): p.stat().st_size for p in videos}  # ids unique per file name
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.csv"
        rows = [
            {"video_id": p.name.replace(".", "_"), "path": str(p), "label": "x", "split": "train"}
            for p in videos
        ]
        write_manifest(manifest, rows)
        for codec in ("raw", "jpeg"):
            out = Path(tmp) / codec
            extract(manifest, out, fps=args.fps, size=args.size, codec=codec)
            per_video = video_bytes_in_store(FrameStore(out))
            results[codec] = {
                "videos": {
                    v: {"video_bytes": sources[v], "store_bytes": b, "ratio": b / sources[v]}
                    for v, b in per_video.items()
                },
                "video_bytes": sum(sources[v] for v in per_video),
                "store_bytes": sum(per_video.values()),
            }
            results[codec]["ratio"] = results[codec]["store_bytes"] / results[codec]["video_bytes"]
    print(
        f"\n{folder}: {len(videos)} videos, {sum(sources.values()) / 1e6:.2f} MB; frames at {args.fps:g} fps, {args.size} px"
    )
    print(f"{'video':44}{'video MB':>10}{'raw ×':>8}{'jpeg ×':>8}")
    for v in results["jpeg"]["videos"]:
        print(
            f"{v[:43]:44}{sources[v] / 1e6:10.2f}{results['raw']['videos'][v]['ratio']:8.2f}"
            f"{results['jpeg']['videos'][v]['ratio']:8.2f}"
        )
    print(
        f"{'all':44}{results['jpeg']['video_bytes'] / 1e6:10.2f}{results['raw']['ratio']:8.2f}{results['jpeg']['ratio']:8.2f}"
    )
    failed = set(sources) - set(results["jpeg"]["videos"])
    if failed:
        print(f"not extracted (see the store's errors.csv): {', '.join(sorted(failed))}")
    record = {
        "command": "python bench/store_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **machine(torch_threads=False),
        "folder": str(folder),
        "fps": args.fps,
        "size": args.size,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
