"""Benchmark: training with `vpipe fit` against a bare PyTorch loop, side by side, start-up apart.

    python bench/train.py [--videos N] [--epochs E] [--repeat R]   # defaults: 4000 clips, 3 epochs, 3 runs

On a feature store of N clips (random float16 grid features 512×2×2, i.e. 2048 values per step, 15 to
29 steps per clip, 10 classes, 4 clips in 5 train), with configs/gesture_gru.yaml as it is when the
benchmark runs: its head (class and arguments, GRU ``hidden_size`` included: 256 at present), TSN
segments (8), batch size (64), feature dropout, learning rate, weight decay, label smoothing and
gradient clipping (all read from the config and recorded with the results):

- vpipe fit: LightningCLI, the Classifier with its metrics, AdamW + warm-up/cosine schedule, gradient
  clipping, TSN sampling and feature dropout from the memory-mapped store, E epochs (no validation,
  no MLflow, no test after the fit);
- bare: the same head, loss, AdamW, feature dropout and clipping in a plain loop, E epochs over the
  same clips, sampled once into one in-memory tensor before the loop.

Each run is a fresh process (the tools alternate, ``--repeat`` runs each, every run recorded), timed
inside it: start-up is from the process's start (as the kernel records it: the interpreter's start and
every import count) to the first training step (vpipe fit: the CLI, the config, model, trainer and data
module; bare: its imports, the head and the clips read into memory); work is from the first step to the
end of the last epoch. Printed per tool: start-up s, work s, steps and steps/s of the work (medians
over the runs), and how far apart its runs' work rates are (they should agree within 10 %); then the
ratio of the work rates vpipe/bare (target >= 0.8).

Size: the default 4000 clips (3200 train: 50 steps of 64 an epoch, a 360 MB store) for 3 epochs is
150 steps: 0.2 to 0.4 s a step on the 2-core CPU this project is developed on (measured on 512 clips),
so 30 to 60 s of work a run against a start-up of 3 to 4 s, and about 5 minutes for the whole
benchmark. Results go to bench/results/train.json with the command, the machine and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pipeline.tracking.timings import process_started  # noqa: E402 - standard library only

CONFIG = HERE.parent / "configs" / "gesture_gru.yaml"
TOOLS = ("bare", "vpipe fit")
FEATURE_SHAPE = (512, 2, 2)


def config() -> dict:
    import yaml

    return yaml.safe_load(CONFIG.read_text())


def feature_store(folder: Path, videos: int) -> Path:
    import numpy as np

    from pipeline.storage.writer import StoreWriter

    rng = np.random.default_rng(0)
    with StoreWriter(folder, "features") as writer:
        for i in range(videos):
            feats = rng.standard_normal((int(rng.integers(15, 30)), *FEATURE_SHAPE), dtype=np.float32)
            writer.add(
                feats.astype(np.float16),
                video_id=f"v{i}",
                label=f"c{i % 10}",
                split="train" if i % 5 else "val",
                src_fps=10.0,
                fps=10.0,
                width=112,
                height=112,
                duration_sec=2.0,
            )
        writer.finish({"kind": "features", "cache_key": "bench", "feature_shape": list(FEATURE_SHAPE)})
    return folder


# The two tools, each run in a child process of its own (--child); each returns
# {"first_step": epoch s, "end": epoch s, "steps": n}.


def ours(store: Path, root: Path, epochs: int) -> dict:
    import pytorch_lightning as pl

    from pipeline.train import VPipeCLI

    times: dict = {}

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.setdefault("first_step", time.time())

        def on_train_epoch_end(self, trainer, pl_module):
            times["end"] = time.time()
            times["steps"] = times.get("steps", 0) + trainer.num_training_batches

    os.environ["VPIPE_ROOT"] = str(root)  # checkpoints of the benchmark run stay in its temporary folder

    # A subclass hands the timer to the trainer and skips the test that `vpipe fit` runs after fitting.
    class Timed(VPipeCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(Timer())
            return trainer

        def after_fit(self):  # the benchmark times training only
            pass

    Timed(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        seed_everything_default=0,
        args=[
            "fit",
            "-c",
            str(CONFIG),
            "--data.init_args.features",
            str(store),
            "--trainer.max_epochs",
            str(epochs),
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.accelerator",
            "cpu",
        ],
    )
    return times


def bare(store: Path, epochs: int) -> dict:
    """A plain PyTorch script: no Lightning imported; the clips read once with the store's own reader."""
    import importlib

    import numpy as np
    import torch

    from pipeline.datasets.loaders import read_rows
    from pipeline.storage.store import FeatureStore

    cfg = config()
    model_args, data_args = cfg["model"]["init_args"], cfg["data"]["init_args"]
    module, _, name = model_args["head"]["class_path"].rpartition(".")
    head_type = getattr(importlib.import_module(module), name)
    features = FeatureStore(store)
    rows = features.split("train")
    classes = sorted({r.label for r in rows})
    # TSN sampling as in training: one step drawn uniformly within each of the equal segments.
    segments = data_args["num_segments"]
    rng = np.random.default_rng(0)
    lengths = np.array([r.length for r in rows])[:, None]
    edges = lengths * (np.arange(segments + 1) / segments)
    steps = np.minimum(
        (edges[:, :-1] + rng.random((len(rows), segments)) * np.diff(edges)).astype(np.int64), lengths - 1
    )
    x = torch.from_numpy(read_rows(features, rows, steps)).flatten(2).float()
    y = torch.tensor([classes.index(r.label) for r in rows])
    torch.manual_seed(0)
    head = head_type(x.shape[-1], len(classes), **model_args["head"].get("init_args", {}))
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=model_args["lr"], weight_decay=model_args["weight_decay"]
    )
    drop, batch = data_args.get("feature_dropout", 0.0), data_args["batch_size"]
    head.train()
    first_step = time.time()
    count = 0
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(batch):
            xb = x[i]
            if drop:
                xb = xb * ((torch.rand(xb.shape) >= drop) / (1 - drop))
            loss = torch.nn.functional.cross_entropy(
                head(xb), y[i], label_smoothing=model_args["label_smoothing"]
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg["trainer"]["gradient_clip_val"])
            optimiser.step()
            count += 1
    return {"first_step": first_step, "end": time.time(), "steps": count}


def child(tool: str, store: Path, root: Path, epochs: int) -> None:
    result = bare(store, epochs) if tool == "bare" else ours(store, root, epochs)
    started = process_started()
    import torch

    print(
        "RESULT "
        + json.dumps({**result, "process_started": started, "torch_threads": torch.get_num_threads()})
    )


def run(tool: str, store: Path, root: Path, epochs: int) -> dict:
    """One run of ``tool`` in a fresh process: start-up, work and its steps/s."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", tool, "--store", str(store), "--root", str(root),
         "--epochs", str(epochs)],
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{tool} failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.rpartition("RESULT ")[2])
    work = r["end"] - r["first_step"]
    return {
        "startup_s": r["first_step"] - r["process_started"],
        "work_s": work,
        "steps": r["steps"],
        "steps_s": r["steps"] / work,
        "process_s": wall,  # as the parent saw it, the interpreter's shutdown included
        "torch_threads": r["torch_threads"],
    }


def summary(runs: list[dict]) -> dict:
    rates = [r["steps_s"] for r in runs]
    return {
        "startup_s": statistics.median(r["startup_s"] for r in runs),
        "work_s": statistics.median(r["work_s"] for r in runs),
        "steps": runs[0]["steps"],
        "steps_s": statistics.median(rates),
        "spread": max(rates) / min(rates) - 1,  # 0.10: the slowest run 10 % below the fastest
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=4000, help="clips in the store (4 in 5 train)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs each run times")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each tool, all recorded")
    parser.add_argument("--out", default=None, help="results JSON (default: bench/results/train.json)")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, Path(args.store), Path(args.root), args.epochs)

    from machine import machine

    cfg = config()
    head = cfg["model"]["init_args"]["head"]
    data_args = cfg["data"]["init_args"]
    setup = {
        "videos": args.videos,
        "train_clips": sum(1 for i in range(args.videos) if i % 5),
        "epochs": args.epochs,
        "feature_shape": list(FEATURE_SHAPE),
        "config": str(CONFIG.relative_to(HERE.parent)),
        "head": head["class_path"],
        "head_args": head.get("init_args", {}),
        "num_segments": data_args["num_segments"],
        "batch_size": data_args["batch_size"],
        "feature_dropout": data_args.get("feature_dropout", 0.0),
    }
    runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    (HERE / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        store = feature_store(Path(tmp) / "features", args.videos)
        for _ in range(args.repeat):
            for tool in TOOLS:
                runs[tool].append(run(tool, store, Path(tmp), args.epochs))
                print(f"  {tool}: {runs[tool][-1]['work_s']:.1f} s of work", file=sys.stderr)
    stats = {tool: summary(r) for tool, r in runs.items()}
    ratio = stats["vpipe fit"]["steps_s"] / stats["bare"]["steps_s"]
    print(
        f"\n{args.epochs} training epochs of {setup['train_clips']} clips, {CONFIG.name} "
        f"({head['class_path'].rpartition('.')[2]} {setup['head_args']}, batch {setup['batch_size']}, "
        f"{setup['num_segments']} segments, feature dropout {setup['feature_dropout']}), "
        f"{runs['bare'][0]['torch_threads']} torch threads, median of {args.repeat} runs each"
    )
    print(f"{'':12}{'start-up s':>11}{'work s':>9}{'steps':>7}{'steps/s':>9}{'runs apart':>12}")
    for tool, s in stats.items():
        flag = "" if s["spread"] <= 0.10 else "  (over 10 %: rerun on a quiet machine)"
        print(
            f"{tool:12}{s['startup_s']:11.2f}{s['work_s']:9.2f}{s['steps']:7d}{s['steps_s']:9.1f}"
            f"{100 * s['spread']:11.1f}%{flag}"
        )
    print(f"work rate vpipe fit / bare: {ratio:.2f}   (target >= 0.8)")
    out = Path(args.out) if args.out else HERE / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
                **machine(),
                **setup,
                "runs": runs,
                "summary": stats,
                "ratio_work_steps_s": ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
