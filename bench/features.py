"""Benchmark: the whole features stage against a bare timm forward pass, side by side.

    python bench/features.py [--frames N] [--batch-size B]

For each backbone (resnet18 and mobilenetv3_small_100 at 112 px, random init), in one run:

- bare: `model(x)` under `torch.inference_mode()` on the same frames, already normalised, channels_last
  and in memory, batch B, after one warm-up batch; the faster of one batch fed again and again and
  16 distinct batches in turn: the limit;
- ours: `pipeline.stages.features.compute(...)` over a frame store of N frames of 112×112 (reading the
  memory-mapped shards, uint8 to the device, normalising there, the forward pass, writing float16
  shards, assembling and hashing the store): the whole stage, start to finish;

both with the same batch size and the same number of torch threads. Prints images/s for both and
the ratio ours/bare (target >= 0.9). Each is run ``--repeat`` times, alternating, and the best run
of each counts. Results also go to bench/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import machine  # noqa: E402

from pipeline.models import backbone  # noqa: E402
from pipeline.stages.features import compute  # noqa: E402
from pipeline.storage.store import FrameStore  # noqa: E402
from pipeline.storage.writer import StoreWriter  # noqa: E402

BACKBONES = ["resnet18", "mobilenetv3_small_100"]
INFO = dict(label="x", split="train", src_fps=10.0, fps=10.0, width=112, height=112, duration_sec=1.0)


def smooth_frames(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` frames of 112×112 with the spectrum of camera images (smooth fields and a little sensor
    noise), not white noise: a JPEG store's bytes and decode time depend on what the frames show."""
    coarse = rng.integers(0, 256, (n, 14, 14, 3)).astype(np.float32)
    fine = coarse.repeat(8, axis=1).repeat(8, axis=2)
    kernel = np.ones(8, np.float32) / 8
    for axis in (1, 2):
        fine = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, fine)
    return np.clip(fine + rng.normal(0, 4, fine.shape), 0, 255).astype(np.uint8)


def frame_store(folder: Path, frames: int, codec: str) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(folder / f"frames_{codec}", "frames", codec=codec) as writer:
        per_video = 100
        for v in range(0, frames, per_video):
            n = min(per_video, frames - v)
            writer.add(smooth_frames(rng, n), video_id=f"v{v}", **INFO)
        writer.finish({"kind": "frames", "codec": codec})
    return folder / f"frames_{codec}"


def bare(name: str, store: Path, frames: int, batch: int, input_size: int = 112, pool: str = "avg") -> float:
    """The limit: the same model on the same frames, preprocessed beforehand (not timed).

    Timed two ways, and the faster counts: one batch fed again and again (hot in cache), and 16
    distinct batches in turn (about 150 MB, the memory traffic of real data).
    """
    model, _ = backbone.create(name)
    encoder = backbone.FrameEncoder(model, backbone.preprocessing(model, input_size), pool)
    shard = FrameStore(store).shard(0)  # decoded beforehand, as the frames the model sees
    xs = [
        encoder.normalise(torch.from_numpy(np.array(shard[i * batch : (i + 1) * batch]))) for i in range(16)
    ]
    model = model.to(memory_format=torch.channels_last)
    best = 0.0
    with torch.inference_mode():
        model(xs[0])  # warm-up
        for inputs in (xs[:1], xs):
            started = time.perf_counter()
            for i in range(0, frames, batch):
                model(inputs[(i // batch) % len(inputs)])
            best = max(best, frames / (time.perf_counter() - started))
    return best


def ours(name: str, store: Path, out: Path, batch: int) -> float:
    frames = sum(r.length for r in FrameStore(store).index)
    started = time.perf_counter()
    compute(
        str(store),
        str(out),
        name=name,
        pool="avg",
        input_size=112,
        batch_size=batch,
        accelerator="cpu",
        overwrite=True,
    )
    return frames / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--codecs", nargs="+", default=["raw", "jpeg"], help="frame store codecs to read")
    args = parser.parse_args()
    results = {}
    (HERE / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        for codec in args.codecs:
            store = frame_store(Path(tmp), args.frames, codec)
            for name in BACKBONES:
                # Alternate the two, and keep the best of each: this machine's timings are noisy.
                limits, stages = [], []
                for _ in range(args.repeat):
                    limits.append(bare(name, store, args.frames, args.batch_size))
                    stages.append(ours(name, store, Path(tmp) / f"features_{name}", args.batch_size))
                results[f"{name}/{codec}"] = {
                    "bare_images_s": max(limits),
                    "stage_images_s": max(stages),
                    "ratio": max(stages) / max(limits),
                    "runs": {"bare": limits, "stage": stages},
                }
    print(
        f"\nfeatures stage vs bare timm forward: {args.frames} frames of 112x112, batch {args.batch_size}, best of {args.repeat}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    )
    print(f"{'backbone/codec':30}{'bare img/s':>12}{'stage img/s':>13}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:30}{r['bare_images_s']:12.1f}{r['stage_images_s']:13.1f}{r['ratio']:8.2f}")
    print("target: ratio >= 0.9")
    record = {
        "command": "python bench/features.py " + " ".join(sys.argv[1:]),
        **machine(),
        "frames": args.frames,
        "batch_size": args.batch_size,
        "results": results,
    }
    (HERE / "results" / "features.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
