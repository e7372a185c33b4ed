"""Benchmark: a JPEG frame store against a raw one, side by side, on the default settings' videos.

    python bench/codec.py [--count N] [--repeat R]      # defaults: 20 gesture clips per class, best of 3

Generates the embedded gestures dataset (H.264 MP4, `python -m data_scripts.synth gestures`), then:

- size: the source videos' bytes, and the frame store's at the default settings (10 fps, 112 px) with
  `--codec raw` and `--codec jpeg` (target: jpeg at most 1.5x the videos);
- extraction: wall time of `extract()` with each codec (JPEG is encoded in the decoding workers);
- training: two epochs of configs/gesture_gru_e2e.yaml's end-to-end model (test_resnet at 64 px + a
  GRU, batch 16, 8 segments) over each store, each timed from its first step to its last by a
  callback, no validation (target: jpeg at most 1.1x raw). A JPEG store decodes its frames in the
  first epoch and keeps them (``VPIPE_DECODED_CACHE_MB``), so the second epoch shows the steady state;
- features: the features stage (`pipeline.stages.features.compute`, test_resnet at 64 px as the backbone
  stage trains it, grid pooling) over each store, against a bare timm forward on the same frames
  already in memory (bench/features.py `bare`; target: stage at least 0.9x bare).

Each timing is run ``--repeat`` times, alternating raw and jpeg, and the best run counts. Results go
to bench/results/codec.json with the machine (cores, CPU model) and the command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import pytorch_lightning as pl  # noqa: E402
from features import bare  # noqa: E402
from machine import machine  # noqa: E402

from pipeline.datasets.clips import FrameDataModule  # noqa: E402
from pipeline.models.heads import GRUHead  # noqa: E402
from pipeline.stages.extract import extract  # noqa: E402
from pipeline.stages.features import compute  # noqa: E402
from pipeline.storage.store import FrameStore  # noqa: E402
from pipeline.systems.classifier import Classifier  # noqa: E402

CODECS = ("raw", "jpeg")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class EpochTimer(pl.Callback):
    """Seconds of each training epoch, from its first step's start to its last one's end."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self.started)


def epoch_seconds(store: Path) -> list[float]:
    """The first and the second epoch's seconds (a JPEG store decodes in the first, then keeps the frames)."""
    pl.seed_everything(0, verbose=False)
    data = FrameDataModule(str(store), num_segments=8, batch_size=16)
    model = Classifier(
        lambda d, c: GRUHead(d, c, hidden_size=128),
        input_dim=data.input_dim,
        num_classes=data.num_classes,
        backbone="test_resnet",
        backbone_input_size=64,
    )
    timer = EpochTimer()
    pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    ).fit(model, data)
    return timer.seconds


def features_rate(store: Path, out: Path) -> float:
    frames = sum(r.length for r in FrameStore(store).index)
    started = time.perf_counter()
    compute(str(store), str(out), name="test_resnet", pool="grid", grid=2, input_size=64, batch_size=256,
            accelerator="cpu", overwrite=True)  # fmt: skip
    return frames / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20, help="gesture clips per class")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    (HERE / "results").mkdir(exist_ok=True)
    results: dict = {"command": "python bench/codec.py " + " ".join(argv or sys.argv[1:]), **machine()}
    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "data_scripts.synth", "gestures", "--out", str(tmp / "raw"),
             "--count", str(args.count), "--seed", "0"],
            check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        videos = sum(p.stat().st_size for p in (tmp / "raw").glob("**/*.mp4"))
        results["videos_bytes"] = videos
        stores = {c: tmp / f"frames_{c}" for c in CODECS}
        timing = {
            c: {"extract_s": [], "epoch_s": [], "epoch2_s": [], "features_frames_s": []} for c in CODECS
        }
        for _ in range(args.repeat):
            for codec, store in stores.items():
                shutil.rmtree(store, ignore_errors=True)  # from scratch: no video reused
                started = time.perf_counter()
                extract(tmp / "raw" / "manifest.csv", store, fps=10, size="112", codec=codec)
                timing[codec]["extract_s"].append(time.perf_counter() - started)
        frames = sum(r.length for r in FrameStore(stores["raw"]).index)
        bare_rates = []
        for _ in range(args.repeat):
            for codec, store in stores.items():
                first, second = epoch_seconds(store)
                timing[codec]["epoch_s"].append(first)
                timing[codec]["epoch2_s"].append(second)
                timing[codec]["features_frames_s"].append(features_rate(store, tmp / f"features_{codec}"))
            bare_rates.append(
                bare("test_resnet", stores["raw"], min(frames, 4096), 256, input_size=64, pool="grid")
            )
        bare_rate = max(bare_rates)
        for codec, store in stores.items():
            t = timing[codec]
            results[codec] = {
                "store_bytes": folder_bytes(store),
                "store_to_videos": folder_bytes(store) / videos,
                "extract_s": min(t["extract_s"]),
                "epoch_s": min(t["epoch_s"]),
                "epoch2_s": min(t["epoch2_s"]),
                "features_frames_s": max(t["features_frames_s"]),
                "features_vs_bare": max(t["features_frames_s"]) / bare_rate,
                "runs": t,
            }
        results.update(frames=frames, bare_frames_s=bare_rate)
        results["jpeg_epoch_vs_raw"] = results["jpeg"]["epoch_s"] / results["raw"]["epoch_s"]
        results["jpeg_epoch2_vs_raw"] = results["jpeg"]["epoch2_s"] / results["raw"]["epoch2_s"]
    print(
        f"\n{args.count * 10} gesture clips ({videos / 1e6:.1f} MB of H.264), {frames} frames at 10 fps, 112 px; "
        f"best of {args.repeat}; {results['cores']} cores ({results['cpu']}), {results['torch_threads']} torch threads"
    )
    print(
        f"{'codec':6}{'store MB':>10}{'x videos':>10}{'extract s':>11}{'epoch 1 s':>11}{'epoch 2 s':>11}"
        f"{'features fr/s':>15}{'x bare':>8}"
    )
    for codec in CODECS:
        r = results[codec]
        print(
            f"{codec:6}{r['store_bytes'] / 1e6:10.1f}{r['store_to_videos']:10.2f}{r['extract_s']:11.2f}"
            f"{r['epoch_s']:11.2f}{r['epoch2_s']:11.2f}{r['features_frames_s']:15.0f}{r['features_vs_bare']:8.2f}"
        )
    print(f"bare timm forward (test_resnet, 64 px, batch 256): {bare_rate:.0f} frames/s")
    print(
        f"jpeg epoch / raw epoch: first {results['jpeg_epoch_vs_raw']:.3f}, second {results['jpeg_epoch2_vs_raw']:.3f} "
        f"(target <= 1.1); "
        f"jpeg store / videos: {results['jpeg']['store_to_videos']:.2f} (target <= 1.5); "
        f"features / bare: {results['jpeg']['features_vs_bare']:.2f} (target >= 0.9)"
    )
    (HERE / "results" / "codec.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
