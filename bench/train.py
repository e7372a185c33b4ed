"""Benchmark: one training epoch of `vpipe fit` against a bare PyTorch loop, side by side.

    python bench/train.py [--videos N] [--repeat R]      # defaults: 4000 clips, best of 5

On a feature store of N clips (random float16 grid features, 8 segments per clip, 2048 values per
step, 10 classes), with configs/gesture_gru.yaml's head and batch size:

- ours: `vpipe fit` (LightningCLI, the Classifier with its metrics, AdamW + cosine schedule, gradient
  clipping, TSN sampling from the memory-mapped store), the steps of its training epoch timed by a
  callback (no validation, no MLflow);
- bare: the same head, loss, optimiser and clipping in a plain loop over the same clips already
  sampled into one in-memory tensor;

same batch size, same torch threads. Prints steps/s for both and the ratio ours/bare (target >= 0.8);
best of ``--repeat`` alternating runs. Results also go to bench/results/train.json.
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
import pytorch_lightning as pl
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.data import FeatureDataModule  # noqa: E402
from pipeline.heads import GRUHead  # noqa: E402
from pipeline.store_writer import StoreWriter  # noqa: E402
from pipeline.train import VPipeCLI  # noqa: E402

CONFIG = HERE.parent / "configs" / "gesture_gru.yaml"


def feature_store(folder: Path, videos: int) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(folder, "features") as writer:
        for i in range(videos):
            feats = rng.standard_normal((int(rng.integers(15, 30)), 512, 2, 2), dtype=np.float32).astype(
                np.float16
            )
            writer.add(
                feats,
                video_id=f"v{i}",
                label=f"c{i % 10}",
                split="train" if i % 5 else "val",
                src_fps=10.0,
                fps=10.0,
                width=112,
                height=112,
                duration_sec=2.0,
            )
        writer.finish({"kind": "features", "cache_key": "bench", "feature_shape": [512, 2, 2]})
    return folder


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.started
        self.steps = trainer.num_training_batches


def ours(store: Path, root: Path) -> float:
    timer = EpochTimer()
    os.environ["VPIPE_ROOT"] = str(root)  # checkpoints of the benchmark run stay in its temporary folder

    # A subclass hands the timer to the trainer and skips the test that `vpipe fit` runs after fitting.
    class Timed(VPipeCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(timer)
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
            "1",
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.accelerator",
            "cpu",
        ],
    )
    return timer.steps / timer.seconds


def bare(store: Path) -> float:
    config = yaml.safe_load(CONFIG.read_text())
    head_args = config["model"]["init_args"]["head"]["init_args"]
    model_args = config["model"]["init_args"]
    data = FeatureDataModule(str(store), num_segments=config["data"]["init_args"]["num_segments"])
    loader = data.train_dataloader()
    xs, ys = zip(*[(b["x"], b["y"]) for b in loader], strict=True)  # sampled once, outside the timing
    x, y = torch.cat(xs), torch.cat(ys)
    batch = config["data"]["init_args"]["batch_size"]
    torch.manual_seed(0)
    head = GRUHead(data.input_dim, data.num_classes, **head_args)
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=model_args["lr"], weight_decay=model_args["weight_decay"]
    )
    head.train()
    started = time.perf_counter()
    steps = 0
    for i in torch.randperm(len(x)).split(batch):
        logits = head(x[i])
        loss = torch.nn.functional.cross_entropy(logits, y[i], label_smoothing=model_args["label_smoothing"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), config["trainer"]["gradient_clip_val"])
        optimiser.step()
        steps += 1
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=4000, help="clips in the store (4 in 5 train)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs of each; the best counts")
    args = parser.parse_args()
    (HERE / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        store = feature_store(Path(tmp) / "features", args.videos)
        limit = stage = 0.0
        for _ in range(args.repeat):
            limit = max(limit, bare(store))
            stage = max(stage, ours(store, Path(tmp)))
    ratio = stage / limit
    print(
        f"\none training epoch, {args.videos} clips ({int(args.videos * 0.8)} train), configs/gesture_gru.yaml, "
        f"best of {args.repeat}, {torch.get_num_threads()} torch threads"
    )
    print(f"{'':24}{'steps/s':>10}")
    print(f"{'bare PyTorch loop':24}{limit:10.1f}")
    print(f"{'vpipe fit':24}{stage:10.1f}")
    print(f"ratio vpipe/bare: {ratio:.2f}   (target >= 0.8)")
    (HERE / "results" / "train.json").write_text(
        json.dumps({"bare_steps_s": limit, "ours_steps_s": stage, "ratio": ratio}, indent=2)
    )


if __name__ == "__main__":
    main()
