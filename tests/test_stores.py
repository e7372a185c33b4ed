import json

import numpy as np
import pytest

from pipeline.media.codecs import CodecError
from pipeline.storage.store import FeatureStore, FrameStore, StoreError
from pipeline.storage.writer import StoreWriter

INFO = dict(label="x", split="train", src_fps=25.0, fps=25.0, width=8, height=6, duration_sec=1.0)


def test_round_trip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    videos = {f"v{i}": rng.integers(0, 255, (5 + i, 6, 8, 3), dtype=np.uint8) for i in range(4)}
    # Shards of about 2 videos: the writer flushes a shard once it holds 1,500 bytes.
    with StoreWriter(tmp_path / "store", "frames", shard_bytes=1500) as writer:
        for vid, frames in videos.items():
            writer.add(frames, video_id=vid, **INFO)
        writer.add_error("bad", "/data/bad.mp4", "ValueError: /data/bad.mp4: no video stream\nsecond line")
        writer.finish({"kind": "frames"})
    store = FrameStore(tmp_path / "store")
    assert len({r.shard for r in store.index}) > 1
    for vid, frames in videos.items():
        np.testing.assert_array_equal(store.rows(vid), frames)
    assert store.errors == [
        {
            "video_id": "bad",
            "path": "/data/bad.mp4",
            "error": "ValueError: /data/bad.mp4: no video stream second line",
        }
    ]
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert len(meta["content_hash"]) == 64
    names = {p.name for p in (tmp_path / "store").iterdir()}
    assert {"errors.csv", "index.csv", "meta.json", "frames-00000.npy", "frames-00001.npy"} <= names


def test_failure_leaves_previous_store_untouched(tmp_path):
    out = tmp_path / "store"
    with StoreWriter(out, "frames") as writer:
        writer.add(np.zeros((3, 6, 8, 3), np.uint8), video_id="old", **INFO)
        writer.finish({"kind": "frames"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError), StoreWriter(out, "frames") as writer:
        writer.add(np.ones((3, 6, 8, 3), np.uint8), video_id="new", **INFO)
        raise RuntimeError("killed mid-way")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # no temporary folder left behind (the writers' lock file stays, empty, for the next writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.lock", "store"]


def test_missing_and_truncated_stores_name_the_file(tmp_path):
    with pytest.raises(StoreError, match="index.csv: missing"):
        FeatureStore(tmp_path)
    with StoreWriter(tmp_path / "s", "frames") as writer:
        writer.add(np.zeros((4, 6, 8, 3), np.uint8), video_id="a", **INFO)
        writer.finish({"kind": "frames"})
    np.save(tmp_path / "s" / "frames-00000.npy", np.zeros((2, 6, 8, 3), np.uint8))
    with pytest.raises(StoreError, match="frames-00000.npy: holds 2 rows, index says a ends at 4"):
        FrameStore(tmp_path / "s").rows("a")


def test_jpeg_shard_reads_like_an_array(tmp_path):
    from pipeline.media.codecs import JpegShard, as_stored, decode_jpeg, encode_jpeg

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (5, 4, 6, 3)), np.ones((1, 8, 8, 1))).astype(
        np.uint8
    )  # (5, 32, 48, 3)
    with StoreWriter(tmp_path / "s", "frames", codec="jpeg", quality=95) as writer:
        writer.add(smooth[:3], video_id="a", **INFO)
        writer.add(smooth[3:], video_id="b", **INFO)
        writer.finish({"kind": "frames", "codec": "jpeg", "params": {"codec": "jpeg", "quality": 95}})
    store = FrameStore(tmp_path / "s")
    shard = store.shard(0)
    assert isinstance(shard, JpegShard) and len(shard) == 5 and shard.shape == (5, 32, 48, 3)
    whole = shard[:]
    # random colours in 8x8 blocks: the hardest case for 4:2:0 chroma, still within a few levels
    assert whole.dtype == np.uint8 and np.abs(whole.astype(int) - smooth).mean() < 10
    np.testing.assert_array_equal(shard[np.array([4, 0, 4])], whole[[4, 0, 4]])
    np.testing.assert_array_equal(shard[-1], whole[4])
    np.testing.assert_array_equal(store.rows("b"), whole[3:])
    # the stored bytes are what as_stored gives: inference sees training's pixels
    np.testing.assert_array_equal(as_stored(smooth, store.meta["params"]), whole)
    np.testing.assert_array_equal(decode_jpeg(encode_jpeg(smooth[0], 95)), whole[0])
    data, lengths = store.encoded("b")
    assert len(lengths) == 2 and len(data) == lengths.sum()


def test_decoded_jpeg_frames_are_kept_within_the_budget(tmp_path, monkeypatch):
    from pipeline.media import codecs

    frames = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with StoreWriter(tmp_path / "s", "frames", codec="jpeg") as writer:
        writer.add(frames, video_id="a", **INFO)
        writer.finish({"kind": "frames", "codec": "jpeg"})
    monkeypatch.setattr(codecs, "_cache_left", [4 * 16 * 16 * 3])  # room for exactly this shard
    kept = FrameStore(tmp_path / "s").shard(0)
    first = kept[[3, 1]]
    assert sorted(kept._kept) == [1, 3] and codecs._cache_left == [2 * 16 * 16 * 3]  # only the frames read
    np.testing.assert_array_equal(kept[:], FrameStore(tmp_path / "s").shard(0)[:])
    first[:] = 0  # what a reader gets is its own copy
    np.testing.assert_array_equal(kept[[3, 1]], kept[:][[3, 1]])
    assert kept[[3, 1]].any()
    other = FrameStore(tmp_path / "s").shard(0)  # over the budget: decoded on every read, same frames
    np.testing.assert_array_equal(other[:], kept[:])
    assert codecs._cache_left == [0] and other._kept == {}  # the first shard took the whole budget


def test_torchvisions_batched_decoder_gives_pillows_pixels():
    import torch  # readers decode through torchvision once torch is loaded

    from pipeline.media.codecs import _decode_many, decode_jpeg, encode_jpeg

    rng = np.random.default_rng(4)
    smooth = rng.integers(0, 256, (6, 6, 8, 3)).repeat(8, 1).repeat(8, 2).astype(np.uint8)
    gray = np.repeat(smooth[..., :1], 3, axis=-1)  # grey frames (the digits) decode to three equal channels
    images = [np.frombuffer(encode_jpeg(f, q), np.uint8) for f in (*smooth, *gray) for q in (75, 90)]
    for image, frame in zip(images, _decode_many(images), strict=True):
        assert frame.shape == (3, 48, 64) and frame.dtype == torch.uint8
        np.testing.assert_array_equal(frame.permute(1, 2, 0).numpy(), decode_jpeg(image))


def test_a_damaged_jpeg_frame_is_named_with_its_shard(tmp_path):
    import torch  # noqa: F401  (the batched decoder's error, as readers meet it)

    frames = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    with StoreWriter(tmp_path / "s", "frames", codec="jpeg") as writer:
        writer.add(frames, video_id="a", **INFO)
        writer.finish({"kind": "frames", "codec": "jpeg"})
    shard = tmp_path / "s" / "frames-00000.mjpeg"
    data = bytearray(shard.read_bytes())
    offsets = np.load(tmp_path / "s" / "frames-00000.offsets.npy")
    data[offsets[1] : offsets[1] + 4] = b"\x00" * 4  # frame 1's SOI marker gone
    shard.write_bytes(bytes(data))
    store = FrameStore(tmp_path / "s", keep_decoded=False)
    np.testing.assert_array_equal(store.shard(0)[[0]].shape, (1, 16, 16, 3))  # the others still read
    with pytest.raises(CodecError, match=r"frames-00000\.mjpeg: a frame of rows 0\.\.2 is not a JPEG image"):
        store.shard(0)[0:3]


def test_a_store_opened_to_read_each_frame_once_keeps_no_decoded_frames(tmp_path, monkeypatch):
    from pipeline.datasets.frame_slices import FrameSlices
    from pipeline.media import codecs

    frames = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    with StoreWriter(tmp_path / "s", "frames", codec="jpeg") as writer:
        writer.add(frames, video_id="a", **INFO)
        writer.finish({"kind": "frames", "codec": "jpeg"})
    monkeypatch.setattr(codecs, "_cache_left", [1 << 30])
    once = FrameStore(tmp_path / "s", keep_decoded=False).shard(0)
    np.testing.assert_array_equal(once[:], FrameStore(tmp_path / "s").shard(0)[:])
    assert once._kept == {} and codecs._cache_left[0] == (1 << 30) - frames.nbytes  # only the kept one
    slices = FrameSlices(FrameStore(tmp_path / "s"), batch=2)  # the features stage's reader
    assert [s[2].shape[0] for s in (slices[0], slices[1], slices[2])] == [2, 2, 1]
    assert slices._store.shard(0)._kept == {} and codecs._cache_left[0] == (1 << 30) - frames.nbytes


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_jpeg_frames_decode_on_the_gpu_as_on_the_cpu(tmp_path):
    from pipeline.media.codecs import decode_batch_cuda, decode_jpeg, encode_jpeg

    frames = np.random.default_rng(1).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    images = [np.frombuffer(encode_jpeg(f), np.uint8) for f in frames]
    on_gpu = decode_batch_cuda(images).permute(0, 2, 3, 1).cpu().numpy()
    on_cpu = np.stack([decode_jpeg(i) for i in images])
    assert on_gpu.shape == on_cpu.shape and np.abs(on_gpu.astype(int) - on_cpu).max() <= 2
