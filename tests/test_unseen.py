"""Captions of clips no model has seen (another generator seed) name the motion about as often as the
classifier gets the class: ``bench/unseen.py`` over the models of ``dvc repro``.

The models are the pipeline's outputs (``dvc repro``, or ``make repro``); where they are absent (a fresh
clone that has not run the pipeline) the test is skipped and says so.
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = [
    ROOT / "models/gesture_gru/best.ckpt",
    ROOT / "models/caption_gru/best.ckpt",
    ROOT / "models/backbone_gestures/backbone.safetensors",
]


@pytest.mark.skipif(not all(p.is_file() for p in MODELS), reason="needs the models of `dvc repro`")
def test_captions_of_unseen_clips_name_the_motion_as_often_as_the_classifier_is_right(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("unseen", ROOT / "bench" / "unseen.py")
    unseen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unseen)
    out = tmp_path / "unseen.json"
    assert unseen.main(["--seed", "3", "--count", "6", "--out", str(out)]) == 0
    result = __import__("json").loads(out.read_text())
    print(capsys.readouterr().out)  # both figures, in the test's output
    assert result["clips"] == 60  # six clips of each of the ten classes, none from the training seed
    assert result["classifier_accuracy"] >= 0.8  # the models work on new clips at all
    assert result["caption_motion_accuracy"] >= result["classifier_accuracy"] - 0.05
