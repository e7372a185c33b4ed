"""Decoding real files of many kinds: codecs, odd sizes, variable frame rate, rotation, late starts."""

from fractions import Fraction

import numpy as np
import pytest

from conftest import moving_square
from pipeline.media.video import decode, write_video


def quadrants(frames: int, height: int, width: int) -> np.ndarray:
    """Four flat colours, one per quadrant: orientation is easy to check after lossy coding."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    video[:, :h, :w] = (255, 0, 0)
    video[:, :h, w:] = (0, 255, 0)
    video[:, h:, :w] = (0, 0, 255)
    video[:, h:, w:] = (255, 255, 255)
    return video


@pytest.mark.parametrize(
    "name,codec,pix_fmt,options",
    [
        ("mpeg4.avi", "mpeg4", "yuv420p", {"qscale": "2"}),
        ("vp9.webm", "libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
        ("hevc.mp4", "libx265", "yuv420p", {"preset": "ultrafast", "x265-params": "log-level=error"}),
        ("mjpeg.avi", "mjpeg", "yuvj420p", {}),
        ("ffv1.mkv", "ffv1", "yuv444p", {}),
    ],
)
def test_codecs(tmp_path, name, codec, pix_fmt, options):
    frames = quadrants(8, 48, 64)
    for i in range(8):
        frames[i, 16:32, 4 * i : 4 * i + 16] = 0  # a black box moving right
    write_video(tmp_path / name, frames, 25, codec=codec, pix_fmt=pix_fmt, options=options)
    out = decode(tmp_path / name)
    assert out.frames.shape == frames.shape
    assert np.abs(out.frames.astype(int) - frames).mean() < 12


def test_lossless_frames_are_exact(tmp_path):
    """FFV1 in 4:4:4 with RGB input: frame k out equals frame k in (up to YUV rounding, ≤ 2 levels)."""
    frames = moving_square(10, 34, 46)
    write_video(tmp_path / "rgb.mkv", frames, 25, codec="ffv1", pix_fmt="bgr0")
    out = decode(tmp_path / "rgb.mkv").frames
    np.testing.assert_array_equal(out, frames)


def test_odd_size(tmp_path):
    frames = moving_square(6, 17, 33)
    write_video(tmp_path / "odd.mkv", frames, 25, codec="ffv1", pix_fmt="bgr0")
    assert decode(tmp_path / "odd.mkv").frames.shape == (6, 17, 33, 3)
    assert decode(tmp_path / "odd.mkv", size=(16, 8)).frames.shape == (6, 8, 16, 3)


def test_4k_scaled_down(tmp_path):
    frames = quadrants(3, 2160, 3840)
    write_video(tmp_path / "4k.mp4", frames, 30, preset="ultrafast")
    out = decode(tmp_path / "4k.mp4", size=(112, 112)).frames
    assert out.shape == (3, 112, 112, 3)
    assert tuple(out[0, 10, 10]) == pytest.approx((255, 0, 0), abs=12)


@pytest.mark.parametrize("fps,duration", [(10, 2.0), (7, 2.0), (25, 1.2), (3, 3.0)])
def test_resampling_counts(tmp_path, fps, duration):
    src_fps = 30
    write_video(
        tmp_path / "v.mp4", moving_square(int(duration * src_fps), 32, 32), src_fps, preset="ultrafast"
    )
    out = decode(tmp_path / "v.mp4", fps=fps)
    assert abs(len(out.frames) - duration * fps) <= 1


def test_variable_frame_rate(tmp_path):
    """Frames shown at 0, 0.1, 0.2, 0.8, 0.9 s: at 10 fps, 0.3–0.7 s hold the frame of 0.2 s."""
    frames = np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(5)])
    pts = [0, 100, 200, 800, 900]  # milliseconds
    write_video(
        tmp_path / "vfr.mkv", frames, 10, codec="ffv1", pix_fmt="bgr0", pts=pts, time_base=Fraction(1, 1000)
    )
    out = decode(tmp_path / "vfr.mkv", fps=10).frames
    levels = [int(f[0, 0, 0]) for f in out]
    assert levels == [0, 40, 80, 80, 80, 80, 80, 80, 120, 160]


def test_timestamps_starting_late(tmp_path):
    frames = moving_square(10, 32, 32)
    pts = [5000 + 100 * i for i in range(10)]  # starts at 5 s
    write_video(
        tmp_path / "late.mkv", frames, 10, codec="ffv1", pix_fmt="bgr0", pts=pts, time_base=Fraction(1, 1000)
    )
    out = decode(tmp_path / "late.mkv", fps=10)
    np.testing.assert_array_equal(out.frames, frames)
    cut = decode(tmp_path / "late.mkv", fps=10, start_sec=0.3, end_sec=0.6).frames
    np.testing.assert_array_equal(cut, frames[3:6])


@pytest.mark.parametrize("rotation,turns", [(90, 1), (-90, -1), (180, 2)])
def test_rotation_metadata_is_applied(tmp_path, rotation, turns):
    frames = quadrants(4, 48, 64)
    write_video(tmp_path / "rot.mp4", frames, 25, rotation=rotation)
    expected = np.rot90(frames[0], turns)
    out = decode(tmp_path / "rot.mp4").frames
    assert out.shape[1:3] == expected.shape[:2]
    assert np.abs(out[0].astype(int) - expected).mean() < 8
    # --size is the size after rotation.
    assert decode(tmp_path / "rot.mp4", size=(20, 30)).frames.shape[1:3] == (30, 20)


def test_max_frames_uniform(tmp_path):
    write_video(tmp_path / "v.mkv", moving_square(30, 16, 16), 30, codec="ffv1", pix_fmt="bgr0")
    full = decode(tmp_path / "v.mkv").frames
    some = decode(tmp_path / "v.mkv", max_frames=4).frames
    np.testing.assert_array_equal(some, full[[0, 10, 19, 29]])
