"""The embedded synthetic datasets: real decodable MP4 files, determined by the seed."""

import csv

import numpy as np
import pytest

from data_scripts import gestures, synth
from pipeline.media.video import decode


@pytest.fixture(scope="module", params=["gestures", "actions", "digits"])
def generated(request, tmp_path_factory):
    name = request.param
    count = 3
    out = synth.generate(name, tmp_path_factory.mktemp(name) / "raw", count=count, seed=7, workers=2)
    return name, out, synth.plan(name, count, 7)


def test_every_file_decodes_as_planned(generated):
    name, out, plan = generated
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["video_id"] for r in rows] == [p["video_id"] for p in plan]
    for row, item in zip(rows, plan, strict=True):
        params = item["params"]
        video = decode(out / row["path"])
        expected = synth.DATASETS[name].render(item["label"], params)
        assert video.frames.shape == expected.shape, row["video_id"]
        assert video.fps == pytest.approx(synth.fps_of(synth.DATASETS[name], params))
        # Lossy H.264, but close to what was rendered.
        assert np.abs(video.frames.astype(np.int16) - expected).mean() < 10, row[
            "video_id"
        ]  # lossy H.264 smooths the noise
    splits = {r["split"] for r in rows}
    assert splits == {"train", "val", "test"}


def test_every_class_in_every_split(generated):
    name, out, _ = generated
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    for label in {r["label"] for r in rows}:
        assert {r["split"] for r in rows if r["label"] == label} == {"train", "val", "test"}


def test_same_seed_gives_identical_files(generated, tmp_path):
    name, out, _ = generated
    again = synth.generate(name, tmp_path / "again", count=3, seed=7, workers=1)
    for path in sorted((out / "videos").iterdir()):
        assert (again / "videos" / path.name).read_bytes() == path.read_bytes(), path.name
    other = synth.plan(name, 3, 8)
    assert other[0]["params"] != synth.plan(name, 3, 7)[0]["params"]


@pytest.mark.parametrize("reverse,forward", sorted(gestures.REVERSE_OF.items()))
def test_gesture_pairs_are_time_reverses(reverse, forward):
    for seed in range(3):
        params = gestures.sample_params(np.random.default_rng(seed))
        fwd = gestures.render(forward, params)
        np.testing.assert_array_equal(gestures.render(reverse, params), fwd[::-1])
        assert np.abs(fwd[0].astype(int) - fwd[-1]).mean() > 0.5  # the clip does move


def test_gesture_variety():
    params = [gestures.sample_params(np.random.default_rng(s)) for s in range(40)]
    assert {p.fps for p in params} == {25, 30}
    assert len({(p.width, p.height) for p in params}) > 2
    assert len({p.shape for p in params}) > 2 and len({p.texture for p in params}) > 1
    assert 1.5 <= min(p.frames / p.fps for p in params) and max(p.frames / p.fps for p in params) <= 3.0


def test_actions_differ_by_tempo_and_stride():
    from data_scripts import actions

    params = actions.sample_params(np.random.default_rng(0))
    speeds = [actions.GAITS[g][0] for g in ("walking", "jogging", "running")]
    strides = [actions.GAITS[g][1] for g in ("walking", "jogging", "running")]
    assert speeds == sorted(speeds) and strides == sorted(strides)
    # Same figure, same parameters: the hip travels further when running than when walking.
    hip = {g: [actions._pose(g, params, t)[0][0][0][0] for t in (0.0, 1.0)] for g in ("walking", "running")}
    assert abs(hip["running"][1] - hip["running"][0]) > 2 * abs(hip["walking"][1] - hip["walking"][0])


def test_digits_are_real_handwriting_in_64x64():
    from data_scripts import digits

    frames = digits.render("digits", digits.sample_params(np.random.default_rng(0), "test"))
    assert frames.shape == (20, 64, 64, 3) and frames.max() > 200
    assert len(digits.digit_images()) == 1797


def test_captions_describe_what_was_rendered(generated):
    """Twelve different references per clip; each names its own class's motion and no other (the order metric's
    premise), and the gesture captions name the object's shape and, when given, its colour."""
    from pipeline.storage.captions import read_captions, read_keywords
    from pipeline.systems.caption_scores import named_motion

    name, out, plan = generated
    if name == "digits":
        assert not (out / "captions.csv").exists()
        return
    captions, keywords = read_captions(out / "captions.csv"), read_keywords(out / "caption_keywords.json")
    assert list(captions) == [item["video_id"] for item in plan]
    for item in plan:
        refs = captions[item["video_id"]]
        assert len(refs) == len(set(refs)) == 12
        assert all(named_motion(text, keywords) == item["label"] for text in refs), (item["label"], refs)
        if name == "gestures":
            p = item["params"]
            shapes = {
                "circle": "circle disc",
                "square": "square box",
                "triangle": "triangle",
                "diamond": "diamond",
                "cross": "cross plus",
            }[p.shape].split()
            assert all(any(s in text.split() for s in shapes) for text in refs)
            colours = {gestures.colour_name(p.colour)}
            assert all(
                colours & set(text.split())
                or not set(text.split()) & {"red", "green", "blue", "grey", "white"}
                for text in refs
            )
    assert synth.reference_captions(name, plan, 7) == [
        (v, c) for v, refs in captions.items() for c in refs
    ]  # deterministic
