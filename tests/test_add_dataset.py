"""`vpipe add-dataset` / `remove-dataset`: the printed diff, the refusals (nothing changed), the atomic
write, `dvc repro` from a plain shell (no virtualenv on PATH), and the whole journey from a folder of
videos to a report line and a classified clip."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_e2e import copy_repository, run

from conftest import moving_square
from pipeline.cli import main
from pipeline.media.video import write_video

ROOT = Path(__file__).resolve().parents[1]
PLAIN_PATH = "/usr/bin:/bin"  # a plain shell's PATH: no virtualenv on it


def project(dest: Path) -> Path:
    """params.yaml, dvc.yaml and configs/ of the repository: what add-dataset edits."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "configs", dest / "configs")
    return dest


def snapshot(root: Path) -> dict[str, bytes]:
    files = [root / "params.yaml", root / "dvc.yaml", *sorted((root / "configs").rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def vpipe(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_add_dataset_prints_its_diff_and_remove_dataset_undoes_it(
    tmp_path, tiny_dataset, monkeypatch, capsys
):
    root = project(tmp_path / "project")
    before = snapshot(root)
    monkeypatch.chdir(root)
    code, out, err = vpipe(
        capsys, "add-dataset", "own", "--manifest", str(tiny_dataset), "--size", "64", "--fps", "5"
    )
    assert code == 0, err
    manifest = tiny_dataset.resolve()
    for line in (
        "--- a/params.yaml",
        f"+  own: {{root: {manifest.parent}, manifest: {manifest}, fps: 5, size: 64, codec: jpeg}}",
        "-  datasets: [gestures, actions]",
        "+  datasets: [gestures, actions, own]",
        "+  own_lstm: data/features/own",
        "+  own_gru: data/features/own",
        "--- a/dvc.yaml",
        "+        plots/own_gru/epochs.csv: val/acc",
        "+  - plots/own_lstm/predictions.csv:",
        "--- /dev/null",
        "+++ b/configs/backbone_own.yaml",
        "+++ b/configs/own_lstm.yaml",
        "+++ b/configs/own_gru.yaml",
        "+    features: data/features/own",
        "+    frames: data/frames/own",
    ):
        assert line in out.splitlines(), line
    assert out.rstrip().endswith("make repro TARGETS='train@own_lstm train@own_gru'")
    # The comments of params.yaml stay; what was written parses, and every path is own's.
    params_text = (root / "params.yaml").read_text()
    assert params_text.count("\n#") == before["params.yaml"].decode().count("\n#")
    params = yaml.safe_load(params_text)
    assert (
        params["datasets"]["own"]["manifest"] == str(manifest) and params["features"]["datasets"][-1] == "own"
    )
    backbone = yaml.safe_load((root / "configs/backbone_own.yaml").read_text())
    assert backbone["name"] == "backbone_own" and backbone["data"]["init_args"]["frames"] == "data/frames/own"
    gru = yaml.safe_load((root / "configs/own_gru.yaml").read_text())
    assert gru["name"] == "own_gru" and gru["data"]["init_args"]["features"] == "data/features/own"
    assert gru["model"]["init_args"]["head"]["class_path"] == "pipeline.models.heads.GRUHead"
    assert "own_val_accuracy" in str(yaml.safe_load((root / "dvc.yaml").read_text())["plots"])
    assert not list(root.rglob(".*add-dataset*"))  # no temporaries left

    code, out, err = vpipe(capsys, "remove-dataset", "own")
    assert code == 0, err
    assert "--- a/configs/own_lstm.yaml" in out and "+++ /dev/null" in out
    assert snapshot(root) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gestures"], "vpipe add-dataset: dataset 'gestures' exists (datasets.gestures in params.yaml"),
        (["own", "--template", "sports"], "vpipe add-dataset: unknown template 'sports'"),
        (["own", "--heads", "lstm,cnn"], "vpipe add-dataset: unknown head(s) cnn"),
        (["own", "--bad-manifest"], "vpipe add-dataset: "),
    ],
    ids=["existing-name", "unknown-template", "unknown-head", "manifest-with-errors"],
)
def test_add_dataset_refuses_in_one_line_and_changes_nothing(
    tmp_path, tiny_dataset, monkeypatch, capsys, argv, message
):
    root = project(tmp_path / "project")
    before = snapshot(root)
    manifest = tiny_dataset
    if "--bad-manifest" in argv:
        argv = argv[:1]
        (tiny_dataset.parent / "videos" / "left1.mp4").unlink()  # a file missing: an error of vpipe check
        message = f"vpipe add-dataset: {manifest}: 1 error(s) (vpipe check --manifest {manifest}): error: 1 file(s) missing"
    monkeypatch.chdir(root)
    code, out, err = vpipe(capsys, "add-dataset", *argv, "--manifest", str(manifest))
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert snapshot(root) == before


def test_a_failed_write_changes_nothing(tmp_path, tiny_dataset, monkeypatch, capsys):
    root = project(tmp_path / "project")
    before = snapshot(root)
    monkeypatch.chdir(root)
    real = Path.write_text

    def failing(self, *args, **kwargs):
        if "own_gru" in self.name:  # the last file: the others are written by then
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    code, _, err = vpipe(capsys, "add-dataset", "own", "--manifest", str(tiny_dataset))
    assert code != 0 and "No space left on device" in err
    assert snapshot(root) == before and not list(root.rglob(".*add-dataset*"))


def test_remove_dataset_refuses_what_add_dataset_did_not_add(tmp_path, monkeypatch, capsys):
    root = project(tmp_path / "project")
    monkeypatch.chdir(root)
    code, _, err = vpipe(capsys, "remove-dataset", "gestures")
    assert code != 0 and "was not added by vpipe add-dataset" in err
    code, _, err = vpipe(capsys, "remove-dataset", "nothing")
    assert code != 0 and err.strip() == "vpipe remove-dataset: no dataset 'nothing' in params.yaml"


def plain_env() -> dict[str, str]:
    """The environment of a plain shell: the virtualenv neither on PATH nor activated."""
    drop = ("MLFLOW_TRACKING_URI", "VPIPE_ROOT", "DVC_ROOT", "VIRTUAL_ENV", "VPIPE_PYTHON", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PATH": PLAIN_PATH, "DVC_NO_ANALYTICS": "1"}


def git_repository(repo: Path, env: dict) -> None:
    """A copy of the project as a fresh clone with `make setup` run: its own .venv (here the
    interpreter running the tests), in a git repository with one commit."""
    copy_repository(repo)
    (repo / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "project"], repo, env)


def test_dvc_stage_runs_without_the_virtualenv_on_path(tmp_path):
    """A stage of the real dvc.yaml, run by `dvc repro` from a shell whose PATH has no virtualenv:
    bin/python finds the project's .venv itself."""
    env = plain_env()
    assert shutil.which("vpipe", path=env["PATH"]) is None and shutil.which("dvc", path=env["PATH"]) is None
    repo = tmp_path / "repo"
    git_repository(repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["traffic"]["days"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = str(Path(sys.prefix) / "bin" / "dvc")  # as `.venv/bin/dvc repro`: only dvc named by its path
    log = run([dvc, "repro", "synth_traffic"], repo, env)
    assert "Running stage 'synth_traffic'" in log and (repo / "data/raw/traffic/flows.h5").is_file()


@pytest.mark.slow
def test_own_videos_from_a_folder_to_a_report_and_a_classified_clip(tmp_path):
    """A class-per-folder tree of H.264 MP4 and MPEG-4 AVI clips of several sizes → the tree importer
    and add-dataset in one command → `dvc repro train@own_lstm` from a plain shell → metrics, the
    report, `vpipe classify` on a new clip → remove-dataset leaves params.yaml, dvc.yaml and configs/
    as they were."""
    env = plain_env()
    repo = tmp_path / "repo"
    git_repository(repo, env)
    before = snapshot(repo)
    videos = repo / "videos"
    kinds = [
        ("mp4", "libx264", 48, 64),
        ("avi", "mpeg4", 72, 96),
        ("mp4", "libx264", 40, 40),
        ("avi", "mpeg4", 64, 48),
    ]
    for c, label in enumerate(["wave", "clap", "spin"]):
        for i, (ext, codec, height, width) in enumerate(kinds):
            path = videos / label / f"{label}{i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            frames = moving_square(12 + 2 * i, height, width, seed=10 * c + i)
            write_video(path, np.ascontiguousarray(np.roll(frames, c, axis=-1)), 12, codec=codec)
    python = [sys.executable, "-m", "pipeline"]
    out = run(
        [
            *python,
            "add-dataset",
            "own",
            "--manifest",
            "videos/manifest.csv",
            "--size",
            "32",
            "--fps",
            "0",
            "--heads",
            "lstm",
            "--epochs",
            "1",
            "--import",
            "tree",
            "videos",
        ],
        repo,
        env,
    )
    assert "videos/manifest.csv: 12 videos (train 6, val 3, test 3), 3 classes" in out
    assert "+  own: {root: videos, manifest: videos/manifest.csv, fps: 0, size: 32, codec: jpeg}" in out
    assert out.rstrip().endswith("make repro TARGETS='train@own_lstm'")

    dvc = str(Path(sys.prefix) / "bin" / "dvc")
    log = run([dvc, "repro", "train@own_lstm"], repo, env)
    for stage in ("extract@own", "backbone@own", "features@own", "train@own_lstm"):
        assert f"Running stage '{stage}'" in log
    assert (repo / "metrics/own_lstm.json").is_file() and (repo / "models/own_lstm/best.ckpt").is_file()
    report = run([*python, "report"], repo, env)
    assert "| own_lstm |" in report and "| backbone_own |" in report

    clip = tmp_path / "new_clip.mp4"
    write_video(clip, moving_square(14, 56, 56, seed=99), 12)
    shown = run(
        [*python, "classify", str(clip), "--ckpt", "models/own_lstm/best.ckpt", "--topk", "1"], repo, env
    )
    assert any(label in shown for label in ("wave", "clap", "spin")), shown

    out = run([*python, "remove-dataset", "own"], repo, env)
    assert "data/frames/own" in out and "kept" in out
    assert snapshot(repo) == before
    assert (repo / "data/frames/own").is_dir()  # the stores stay without --purge
    run([*python, "add-dataset", "own", "--manifest", "videos/manifest.csv"], repo, env)
    run([*python, "remove-dataset", "own", "--purge"], repo, env)
    assert snapshot(repo) == before and not (repo / "data/frames/own").exists()
    assert not (repo / "models/own_lstm").exists() and not (repo / "metrics/own_lstm.json").exists()
