"""What a user gets wrong ends the command with one line on stderr, ``vpipe COMMAND: MESSAGE``, naming
the file or option and what to run first, and a non-zero status; ``--debug`` or ``VPIPE_DEBUG=1`` give
the traceback instead. One test per case, through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.media.manifest import ManifestError
from pipeline.storage.store import what_to_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gesture_gru.yaml"
FIXTURES = Path(__file__).parent / "fixtures" / "before_layout"


@pytest.fixture
def vpipe(capsys, monkeypatch, tmp_path):
    """``vpipe(*args)`` in this process, in an empty project at ``tmp_path``: (exit status, stderr lines) as
    the console script leaves them (a ``sys.exit(message)`` prints the message, status 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    monkeypatch.delenv("VPIPE_DEBUG", raising=False)

    def run(*args: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        if isinstance(code, str):
            err, code = err + code + "\n", 1
        return code or 0, err.splitlines()

    return run


def command(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in a fresh interpreter, in ``tmp_path`` as the project root."""
    environment = {k: v for k, v in os.environ.items() if k != "VPIPE_DEBUG"}
    environment.update(VPIPE_ROOT=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


# Stores


def test_a_missing_feature_store_is_one_line_saying_what_to_run(tmp_path):
    done = command(tmp_path, "fit", "-c", str(CONFIG))
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "vpipe fit: data/features/gestures: no features store; run `dvc repro features@gestures` first"
    ]


def test_an_unfinished_store_names_its_missing_file_and_the_leftover(vpipe, tmp_path):
    store = tmp_path / "data" / "features" / "gestures"
    store.mkdir(parents=True)
    (store / "index.csv").write_text("video_id\n")  # meta.json, written last, never came
    (store.parent / ".gestures.tmp-4242-x").mkdir()
    code, err = vpipe("fit", "-c", str(CONFIG))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("vpipe fit: data/features/gestures/meta.json: missing; ")
    assert ".gestures.tmp-4242-x" in err[0] and err[0].endswith("run `dvc repro features@gestures` first")


@pytest.mark.parametrize(
    "store,kind,run",
    [
        ("data/frames/jester", "frames", "dvc repro extract@jester"),
        ("/elsewhere/data/features/ucf101", "features", "dvc repro features@ucf101"),
        ("data/grids/traffic", "grids", "dvc repro grids"),
        ("scratch/frames", "frames", "vpipe extract --manifest MANIFEST --out scratch/frames"),
        ("scratch/features", "features", "vpipe features --frames FRAMES --out scratch/features"),
        ("scratch/grids", "grids", "vpipe grids H5... --out scratch/grids"),
    ],
)
def test_what_writes_a_store(store, kind, run):
    assert what_to_run(store, kind) == run


# Configs and options


def test_a_class_that_does_not_exist_names_the_option_and_the_class_path(vpipe, tmp_path):
    config = tmp_path / "nope.yaml"
    text = CONFIG.read_text().replace(
        "pipeline.systems.classifier.Classifier", "pipeline.systems.nope.Classifier"
    )
    config.write_text(text)
    code, err = vpipe("fit", "-c", str(config))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"vpipe fit: --model: class_path pipeline.systems.nope.Classifier (in {config})")


def test_a_training_option_of_the_wrong_type_names_the_option(vpipe):
    code, err = vpipe("fit", "-c", str(CONFIG), "--trainer.max_epochs", "abc")
    assert code == 2
    assert err == ["vpipe fit: --trainer.max_epochs: expected int, got abc (see vpipe fit --help)"]


def test_an_option_of_the_wrong_type_names_the_option(vpipe):
    code, err = vpipe("extract", "--manifest", "m.csv", "--out", "frames", "--fps", "abc")
    assert code == 2
    assert err == ["vpipe extract: argument --fps: invalid float value: 'abc' (see vpipe extract --help)"]


# Checkpoints


def test_a_checkpoint_of_another_task_is_one_line(vpipe):
    code, err = vpipe("caption", str(FIXTURES / "right5.mp4"), "--ckpt", str(FIXTURES / "classifier.ckpt"))
    assert code == 1 and len(err) == 1, err
    assert err[0] == (
        f"vpipe caption: {FIXTURES / 'classifier.ckpt'}: a checkpoint of pipeline.classification.Classifier, "
        "not of a Captioner; `vpipe caption` needs a Captioner"
    )


# --debug, VPIPE_DEBUG


def test_debug_anywhere_on_the_command_line_gives_the_traceback(tmp_path, vpipe):
    done = command(tmp_path, "extract", "--manifest", "nope.csv", "--out", "frames", "--debug")
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.rstrip().endswith(
        "pipeline.media.manifest.ManifestError: nope.csv: manifest not found"
    )
    with pytest.raises(ManifestError):  # in-process: the error itself
        main(["--debug", "extract", "--manifest", "nope.csv", "--out", "frames"])
    assert vpipe("extract", "--manifest", "nope.csv", "--out", "frames") == (
        1,
        ["vpipe extract: nope.csv: manifest not found"],
    )


def test_vpipe_debug_gives_the_traceback_of_a_training_command(tmp_path):
    done = command(tmp_path, "fit", "-c", str(CONFIG), VPIPE_DEBUG="1")
    assert done.returncode == 1
    assert "Traceback (most recent call last):" in done.stderr
    assert "pipeline.storage.store.StoreError: data/features/gestures: no features store" in done.stderr


# Manifest values


@pytest.mark.parametrize(
    "columns,values,message",
    [
        ("start_sec,end_sec", "nan,0.2", "start_sec: not a finite number: 'nan'"),
        ("start_sec,end_sec", "0,inf", "end_sec: not a finite number: 'inf'"),
        ("start_sec,end_sec", "soon,0.2", "start_sec: not a number: 'soon'"),
        ("start_sec,end_sec", "-1,0.2", "start_sec -1 must be at least 0"),
        ("start_sec,end_sec", ",0", "end_sec 0 must be above 0"),
        ("start_sec,end_sec", "0.3,0.2", "end_sec 0.2 is not after start_sec 0.3"),
        ("fps", "0", "fps 0 must be above 0"),
        ("fps", "-12", "fps -12 must be above 0"),
        ("fps", "nan", "fps: not a finite number: 'nan'"),
    ],
)
def test_each_bad_manifest_value_is_one_line_naming_the_line_and_field(
    vpipe, tmp_path, make_video, columns, values, message
):
    make_video("clip.mp4", frames=12, fps=25)  # 0.48 s
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"video_id,path,label,split,{columns}\n"
        f"a,clip.mp4,x,train,{',' * columns.count(',')}\n"
        f"b,clip.mp4,x,train,{values}\n"
    )
    code, err = vpipe("extract", "--manifest", str(manifest), "--out", str(tmp_path / "frames"))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("vpipe extract: ") and f"{manifest}:3: {message}" in err[0], err
    assert not (tmp_path / "frames").exists()


@pytest.mark.parametrize(
    "values,message",
    [
        ("0.5,0.6", "start_sec 0.5 is not before the end of clip.mp4 (0.480 s)"),
        ("0,0.7", "end_sec 0.7 is past the end of clip.mp4 (0.480 s)"),
    ],
)
def test_clip_times_outside_the_video_are_that_file_s_error(vpipe, tmp_path, make_video, values, message):
    """Checked by the decoding worker as the video's job starts: ``--on-error fail`` stops with one line
    naming the file, the field and the manifest line; ``skip`` records it and extracts the others."""
    make_video("clip.mp4", frames=12, fps=25)  # 0.48 s
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "video_id,path,label,split,start_sec,end_sec\na,clip.mp4,x,train,,\n"
        f"b,clip.mp4,x,train,{values}\nc,clip.mp4,x,val,,\nd,clip.mp4,x,test,,\n"
    )
    code, err = vpipe(
        "extract",
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "fail"),
        "--on-error",
        "fail",
        "--workers",
        "1",
    )
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("vpipe extract: ") and message in err[0] and "(manifest line 3)" in err[0], err
    assert not (tmp_path / "fail").exists()
    code, err = vpipe(
        "extract", "--manifest", str(manifest), "--out", str(tmp_path / "skip"), "--workers", "1"
    )
    assert code == 0
    errors = (tmp_path / "skip" / "errors.csv").read_text()
    assert "b," in errors and message in errors
    assert (tmp_path / "skip" / "index.csv").read_text().splitlines()[1].startswith("a,")


def test_several_manifest_problems_are_still_one_line(vpipe, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video_id,path,label,split,fps\na,a,x,train,0\nb,b,x,train,-1\n")
    code, err = vpipe("check", "--manifest", str(manifest))
    assert code == 1 and err == [
        f"vpipe check: {manifest}: 2 problem(s): {manifest}:2: fps 0 must be above 0; "
        f"{manifest}:3: fps -1 must be above 0"
    ]
