"""Benchmark on one CUDA GPU: the features paths and end-to-end training against bare PyTorch.

    python bench/gpu.py [--clips 48] [--frames 90] [--batch-size 128] [--backbone resnet18]
    python bench/gpu.py --cpu        # no GPU needed: the clips and the decode rate only (a smoke check)

Generates its own H.264 clips (320x240, 30 fps, a square moving over noise; PyAV, as the tests'
fixtures), then, on the first GPU, bf16 autocast and channels_last throughout:

(a) features stage: ``pipeline.stages.features.compute`` over a raw frame store of the clips (extracted
    beforehand, not timed) against a bare timm forward of the same model, input size and batch on
    tensors already normalised on the GPU;
(b) streaming features: ``pipeline.stages.video_features.compute_from_videos`` (``vpipe features --manifest``:
    decoding included) against the same bare forward;
(c) one training epoch of configs/gesture_gru_e2e.yaml's model (Classifier: timm CNN + GRU head,
    trained jointly) under ``pl.Trainer.fit`` against a bare PyTorch loop of the same model, loss,
    AdamW, clipping and batches (the same DataLoader);
(d) the streaming path's frames/s against the decode rate of the machine's cores alone (the extract
    worker pool on every core, decode only).

Start-up is separated from steady state: (a) and (b) run on a quarter of the clips and on all of them,
and the difference gives the steady rate (frames/s) and the fixed cost (s); (c) times its second epoch
(the first carries cuDNN autotuning and allocator warm-up), start-up being what precedes the first
epoch; the bare forward is timed after warm-up batches. Results go to bench/results/gpu.json.
Without CUDA it says so and exits 0 (``--cpu`` runs the parts that need no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from pipeline.media.manifest import read_manifest, write_manifest  # noqa: E402
from pipeline.media.resample import parse_size  # noqa: E402
from pipeline.media.video import write_video  # noqa: E402
from pipeline.stages.workers import Job, pool_results  # noqa: E402


def make_clips(folder: Path, count: int, frames: int, width: int = 320, height: int = 240) -> Path:
    """``count`` H.264 clips of ``frames`` frames at 30 fps, two classes (a square moving right or left
    over noise), mostly train; returns the manifest. A quarter of them: ``manifest-quarter.csv``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        video = rng.integers(0, 80, (frames, height, width, 3), dtype=np.uint8)
        step = 1 if i % 2 else -1
        for t in range(frames):
            x = (width // 2 + step * t * (width // 2 - 40) // max(1, frames - 1)) % (width - 40)
            video[t, height // 3 : height // 3 + 40, x : x + 40] = 230
        write_video(folder / f"clip{i:03d}.mp4", video, 30)
        split = "val" if i % 8 == 6 else "test" if i % 8 == 7 else "train"
        rows.append(
            {"video_id": f"clip{i:03d}", "path": f"clip{i:03d}.mp4", "label": str(step), "split": split}
        )
    write_manifest(folder / "manifest.csv", rows)
    write_manifest(folder / "manifest-quarter.csv", rows[: max(2, count // 4)])
    return folder / "manifest.csv"


def decode_rate(manifest: Path, fps: float, size: str, workers: int) -> dict:
    """Decode only, every core: the extract worker pool over the clips, frames written to spill files
    and dropped. The rate anything that decodes these clips on this machine can reach."""
    entries = read_manifest(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [Job(k, e, Path(tmp) / f"{k}.npy") for k, e in enumerate(entries)]
        started = time.perf_counter()
        frames = 0
        for job, _, error in pool_results(jobs, workers, (fps, parse_size(size), 12.0), None):
            if error:
                raise RuntimeError(error)
            frames += len(np.load(job.spill, mmap_mode="r"))
            job.spill.unlink()
        seconds = time.perf_counter() - started
    return {"frames": frames, "seconds": seconds, "frames_s": frames / seconds, "workers": workers}


def fixed_and_rate(small: tuple[int, float], big: tuple[int, float]) -> dict:
    """Start-up (s) and steady rate (frames/s) from (frames, seconds) of a small and a big run."""
    (f1, t1), (f2, t2) = small, big
    rate = (f2 - f1) / max(t2 - t1, 1e-9)
    return {"startup_s": max(0.0, t1 - f1 / rate), "frames_s": rate, "runs": [list(small), list(big)]}


def timed(run) -> tuple[int, float]:
    """(frames, seconds) of ``run()``, which returns a feature store's meta."""
    from pipeline.storage.store import FeatureStore

    started = time.perf_counter()
    meta = run()
    seconds = time.perf_counter() - started
    return sum(r.length for r in FeatureStore(meta["out"]).index), seconds


def bare_forward(name: str, input_size: int, batch: int, device: str, steps: int = 30) -> float:
    """The limit: frames/s of the timm model alone on normalised tensors already on the device."""
    import torch

    from pipeline.models import backbone

    model, _ = backbone.create(name)
    model = model.to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, input_size, input_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    with torch.inference_mode(), autocast:
        for _ in range(5):  # warm-up: cuDNN picks its kernels
            model(x)
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync(device)
    return batch * steps / (time.perf_counter() - started)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def features_paths(manifest: Path, work: Path, args, accelerator: str) -> dict:
    """(a) and (b): each path on a quarter of the clips and on all of them."""
    from pipeline.stages.extract import extract
    from pipeline.stages.features import compute
    from pipeline.stages.video_features import compute_from_videos

    net = dict(name=args.backbone, input_size=args.input_size, batch_size=args.batch_size)
    net.update(accelerator=accelerator, precision="bf16-mixed", overwrite=True)
    decode = dict(fps=args.fps, size=args.size)
    results = {}
    runs = {"stage": [], "streaming": []}
    for which in ("manifest-quarter.csv", "manifest.csv"):
        frames = work / f"frames-{which}"
        extract(manifest.with_name(which), frames, codec="raw", **decode)  # not timed: the stage's input
        stage = partial(compute, str(frames), str(work / "f-stage"), **net)
        runs["stage"].append(timed(lambda stage=stage: {**stage(), "out": work / "f-stage"}))
        stream = partial(compute_from_videos, manifest.with_name(which), work / "f-stream", **decode, **net)
        runs["streaming"].append(timed(lambda stream=stream: {**stream(), "out": work / "f-stream"}))
    for path, (small, big) in runs.items():
        results[path] = fixed_and_rate(small, big)
    return results


def train_epochs(frames: Path, args, device: str) -> dict:
    """(c): seconds of a steady-state training epoch of the end-to-end model, Lightning against bare."""
    import pytorch_lightning as pl
    import torch
    import yaml
    from torch.nn import functional as F

    from pipeline.datasets.clips import FrameDataModule
    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier

    config = yaml.safe_load((ROOT / "configs" / "gesture_gru_e2e.yaml").read_text())
    init = dict(config["model"]["init_args"])
    head = partial(GRUHead, **init.pop("head")["init_args"])
    data_args = config["data"]["init_args"]
    accelerator = "gpu" if device.startswith("cuda") else "cpu"

    def data() -> FrameDataModule:
        dm = FrameDataModule(
            str(frames),
            num_segments=data_args["num_segments"],
            batch_size=data_args["batch_size"],
            num_workers=min(4, os.cpu_count() or 1),
            pin_memory=accelerator == "gpu",
        )
        dm.setup("fit")
        return dm

    class EpochTimes(pl.Callback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            sync(device)
            self.starts.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module):
            sync(device)
            self.ends.append(time.perf_counter())

    pl.seed_everything(0)
    dm = data()
    clips = len(dm.train_dataloader().dataset)
    times = EpochTimes()
    started = time.perf_counter()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        gradient_clip_val=config["trainer"]["gradient_clip_val"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[times],
    )
    trainer.fit(Classifier(head, num_classes=dm.num_classes, **init), dm)
    lightning = {"startup_s": times.starts[0] - started, "epoch_s": times.ends[1] - times.starts[1]}

    pl.seed_everything(0)
    dm = data()
    begun = time.perf_counter()
    model = Classifier(head, num_classes=dm.num_classes, **init).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=init["lr"], weight_decay=init["weight_decay"])
    loader = dm.train_dataloader()
    bare_startup = time.perf_counter() - begun
    epochs = []
    for _ in range(2):
        sync(device)
        epoch_started = time.perf_counter()
        for batch in loader:
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                logits = model(batch["x"].to(device, non_blocking=True))
                loss = F.cross_entropy(logits, batch["y"].to(device), label_smoothing=init["label_smoothing"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["trainer"]["gradient_clip_val"])
            optimiser.step()
        sync(device)
        epochs.append(time.perf_counter() - epoch_started)
    bare = {"startup_s": bare_startup, "epoch_s": epochs[1]}
    return {
        "clips_per_epoch": clips,
        "batch_size": data_args["batch_size"],
        "lightning": lightning,
        "bare": bare,
        "ratio": bare["epoch_s"] / lightning["epoch_s"],
    }


def table(results: dict) -> str:
    lines = [f"{'measure':44}{'start-up s':>11}{'steady':>14}{'vs':>14}{'ratio':>8}"]
    limit = results.get("bare_forward_frames_s")
    for path in ("stage", "streaming"):
        if path in results.get("features", {}):
            r = results["features"][path]
            lines.append(
                f"{'(' + 'ab'[path == 'streaming'] + ') features ' + path + ' frames/s':44}{r['startup_s']:11.1f}"
                f"{r['frames_s']:14.0f}{limit:14.0f}{r['frames_s'] / limit:8.2f}"
            )
    if "train" in results:
        t = results["train"]
        lines.append(
            f"{'(c) e2e epoch s (Lightning vs bare)':44}{t['lightning']['startup_s']:11.1f}"
            f"{t['lightning']['epoch_s']:14.2f}{t['bare']['epoch_s']:14.2f}{t['ratio']:8.2f}"
        )
    d = results["decode"]
    stream = results.get("features", {}).get("streaming", {}).get("frames_s")
    lines.append(
        f"{'(d) streaming vs decode-only frames/s':44}{'':11}{stream or float('nan'):14.0f}"
        f"{d['frames_s']:14.0f}{(stream or float('nan')) / d['frames_s']:8.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="no GPU: clip generation and the decode rate only")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--frames", type=int, default=90, help="frames per clip (30 fps)")
    parser.add_argument("--fps", type=float, default=0.0, help="decoding rate (0: every frame)")
    parser.add_argument("--size", default="112", help="decoded frame size, as vpipe extract --size")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            "bench/gpu.py: CUDA is not available here: nothing to measure (--cpu runs the clip generation "
            "and the decode rate)"
        )
        return 0
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        started = time.perf_counter()
        manifest = make_clips(work / "clips", args.clips, args.frames)
        results = {
            "clips": args.clips,
            "frames_per_clip": args.frames,
            "clip_seconds": time.perf_counter() - started,
            "decode": decode_rate(manifest, args.fps, args.size, cores),
            "cores": cores,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
        }
        if not args.cpu:
            results["device"] = torch.cuda.get_device_name(0)
            results["bare_forward_frames_s"] = bare_forward(
                args.backbone, args.input_size, args.batch_size, "cuda"
            )
            results["features"] = features_paths(manifest, work, args, "gpu")
            results["train"] = train_epochs(work / "frames-manifest.csv", args, "cuda")
            results["streaming_vs_decode"] = (
                results["features"]["streaming"]["frames_s"] / results["decode"]["frames_s"]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n{results.get('device', 'CPU only (--cpu)')}: {args.clips} clips x {args.frames} frames of 320x240 "
        f"-> {args.size}, {args.backbone} at {args.input_size} px, batch {args.batch_size}, {cores} cores "
        f"(clips written in {results['clip_seconds']:.1f} s)"
    )
    print(table(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
