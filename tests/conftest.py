"""Shared fixtures: tiny videos written with PyAV, tiny manifests and stores."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# Before timm and huggingface_hub are imported (they read it at import): tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.media.manifest import write_manifest  # noqa: E402
from pipeline.media.video import write_video  # noqa: E402
from pipeline.storage.writer import StoreWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fit_in(root: Path, *args: str) -> None:
    """``vpipe fit ARGS`` in this process, with ``root`` as the project root (``VPIPE_ROOT``) until it ends."""
    from pipeline.train import cli_main

    previous = os.environ.get("VPIPE_ROOT")
    os.environ["VPIPE_ROOT"] = str(root)
    try:
        cli_main(["fit", *args])
    finally:
        os.environ.pop("VPIPE_ROOT") if previous is None else os.environ.__setitem__("VPIPE_ROOT", previous)


def quiet_trainer(**kw):
    """A CPU Lightning trainer that writes and prints nothing of its own (no logger, checkpoints, progress
    bar or model summary); ``kw`` adds to these settings or overrides them."""
    import pytorch_lightning as pl

    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**quiet, **kw})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    args: list[str], nproc: int = 2, port: int | None = None, node: tuple[int, int] | None = None
) -> list[str]:
    """``python -m pipeline ARGS`` under ``torchrun --nproc-per-node NPROC`` on 127.0.0.1, meeting at PORT (a
    free one unless given); ``node=(rank, count)`` makes it node RANK of COUNT."""
    nodes = [] if node is None else ["--nnodes", str(node[1]), "--node-rank", str(node[0])]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes,
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port() if port is None else port),
        "-m",
        "pipeline",
        *args,
    ]


def extract_command(manifest: Path, out: Path, *options: str) -> list[str]:
    """``vpipe extract --manifest MANIFEST --out OUT OPTIONS`` in a fresh interpreter (``python -m pipeline``)."""
    return [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        *options,
    ]


def same_files(a: Path, b: Path) -> bool:
    """Two store folders hold the same files with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def write_store(folder: Path, kind: str, counts: dict[str, int], clip, meta: dict, size: int = 16) -> Path:
    """A store of KIND in FOLDER with ``counts[split]`` clips ``{split}{i}`` a split, each ``clip(rng, i) ->
    (rows, label)`` from one generator (seed 0) drawn in that order; every clip 10 fps, 1 s, SIZE×SIZE.
    ``meta`` is the rest of meta.json (after ``kind``)."""
    rng = np.random.default_rng(0)
    with StoreWriter(folder, kind) as writer:
        for split, n in counts.items():
            for i in range(n):
                rows, label = clip(rng, i)
                writer.add(
                    rows,
                    video_id=f"{split}{i}",
                    label=label,
                    split=split,
                    src_fps=10.0,
                    fps=10.0,
                    width=size,
                    height=size,
                    duration_sec=1.0,
                )
        writer.finish({"kind": kind, **meta})
    return folder


def moving_square(frames: int = 12, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A bright square moving right over a noisy background: frame i differs from frame i+1."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 60, (frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        x = 2 + i * (width - 14) // max(1, frames - 1)
        video[i, 10:22, x : x + 12] = 230
    return video


@pytest.fixture
def make_video(tmp_path: Path):
    """``make_video(name, frames=12, fps=25, ...)`` writes an H.264 MP4 and returns its path."""

    def make(
        name: str = "clip.mp4",
        frames: int = 12,
        fps: float = 25,
        height: int = 48,
        width: int = 64,
        seed: int = 0,
    ) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, moving_square(frames, height, width, seed), fps)
        return path

    return make


@pytest.fixture
def tiny_dataset(tmp_path: Path, make_video) -> Path:
    """A manifest of 6 clips in 2 classes (train/val/test), returns the manifest path."""
    rows = []
    for c, label in enumerate(["left", "right"]):
        for i, split in enumerate(["train", "val", "test"]):
            make_video(f"videos/{label}{i}.mp4", frames=10 + 2 * i, seed=10 * c + i)
            rows.append(
                {"video_id": f"{label}{i}", "path": f"videos/{label}{i}.mp4", "label": label, "split": split}
            )
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, rows)
    return manifest


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Tests never reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A tiny project taken through the real chain once per session, in its own root: H.264 videos of
    two classes (a square moving right, the same clips reversed) → frame store (10 fps, 32×32) →
    feature store (timm ``test_resnet``, grid pooling) → ``vpipe fit`` of ``gesture_gru`` for two
    epochs with MLflow on (``mlflow.db``, ``mlartifacts/``, a registered model version)."""
    from pipeline.stages.extract import extract
    from pipeline.stages.features import compute

    root = tmp_path_factory.mktemp("project")
    rows = []
    for label, step in (("right", 1), ("left", -1)):
        for i, split in enumerate(["train", "train", "train", "val", "val", "test", "test"]):
            path = root / "videos" / f"{label}{i}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, moving_square(14 + i, 48, 64, seed=i)[::step], 25)
            rows.append(
                {"video_id": f"{label}{i}", "path": f"videos/{label}{i}.mp4", "label": label, "split": split}
            )
    write_manifest(
        root / "videos" / "manifest.csv", [{**r, "path": r["path"].removeprefix("videos/")} for r in rows]
    )
    extract(root / "videos" / "manifest.csv", root / "frames", fps=10, size="32", workers=1)
    compute(
        str(root / "frames"),
        str(root / "features"),
        name="test_resnet",
        pool="grid",
        grid=2,
        input_size=32,
        batch_size=64,
        num_workers=0,
        accelerator="cpu",
    )
    fit_in(
        root,
        "-c",
        str(ROOT / "tests/configs/gru_features.yaml"),
        "--data.init_args.features",
        str(root / "features"),
        "--data.init_args.batch_size",
        "2",
    )
    return root
