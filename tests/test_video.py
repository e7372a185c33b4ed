import av
import numpy as np
import pytest

from pipeline.media import video
from pipeline.media.resample import parse_size


def test_decode_keeps_every_frame_at_fps_0(make_video):
    path = make_video(frames=15, fps=25)
    out = video.decode(path)
    assert out.frames.shape == (15, 48, 64, 3) and out.frames.dtype == np.uint8
    assert out.src_fps == pytest.approx(25) and out.fps == pytest.approx(25)
    assert out.duration_sec == pytest.approx(15 / 25, abs=1e-3)


def test_decode_resamples_by_presentation_time(make_video):
    full = video.decode(make_video(frames=30, fps=30)).frames
    ten = video.decode(make_video(frames=30, fps=30), fps=10)
    assert len(ten.frames) == 10 and ten.fps == 10
    # Output k stands for t = k/10 s, served by source frame 3k (shown at exactly that time).
    np.testing.assert_array_equal(ten.frames, full[::3])


def test_decode_upsamples_by_holding_frames(make_video):
    full = video.decode(make_video(frames=10, fps=10)).frames
    up = video.decode(make_video(frames=10, fps=10), fps=20).frames
    assert len(up) == 20
    np.testing.assert_array_equal(up[0::2], full)
    np.testing.assert_array_equal(up[1::2], full)


def test_decode_scales_whole_frame(make_video):
    out = video.decode(make_video(height=48, width=64), size=parse_size("32x16"))
    assert out.frames.shape[1:] == (16, 32, 3)


def test_decode_cuts_start_and_end(make_video):
    full = video.decode(make_video(frames=25, fps=25)).frames
    cut = video.decode(make_video(frames=25, fps=25), start_sec=0.2, end_sec=0.6).frames
    np.testing.assert_array_equal(cut, full[5:15])


@pytest.mark.parametrize(
    "text,expected", [("112", (112, 112)), ("160x120", (160, 120)), (None, None), ("0", None)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_negative():
    with pytest.raises(ValueError):
        parse_size("-3x4")


def test_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "not_a_video.mp4"
    bad.write_text("hello, I am text")
    with pytest.raises((av.FFmpegError, ValueError)) as err:
        video.decode(bad)
    assert "not_a_video.mp4" in str(err.value)


def test_write_video_is_deterministic(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    video.write_video(tmp_path / "a.mp4", frames, 25)
    video.write_video(tmp_path / "b.mp4", frames, 25)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
