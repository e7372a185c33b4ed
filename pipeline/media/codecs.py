"""How a frame store keeps its frames: ``raw`` or ``jpeg`` (``meta.json`` says which, as ``codec``).

- ``raw``: a shard is ``frames-0000k.npy``, uint8 ``(N, H, W, 3)``, memory-mapped: the fastest to
  read, and about 8× the bytes of the videos it came from at 112 px.
- ``jpeg``: a shard is ``frames-0000k.mjpeg``, the frames' JPEG images one after another (a Motion
  JPEG stream: ``ffplay -f mjpeg`` shows it), and ``frames-0000k.offsets.npy``, int64 ``(N + 1,)``:
  frame ``i`` is bytes ``offsets[i]:offsets[i + 1]``. Encoded and decoded by Pillow (libjpeg-turbo),
  so extraction never imports torch; :func:`decode_batch_cuda` decodes a batch on a GPU through
  torchvision's nvJPEG. At quality 90 a 112 px store is about half its videos' bytes
  (``bench/scale.py`` measures it), at a mean absolute error of about 2 grey levels.

:class:`JpegShard` reads a ``jpeg`` shard as a read-only array: ``len``, ``shape``, ``dtype``, and
indexing by an integer, a slice or an integer array give uint8 frames, decoded on the way. Every
reader of a frame store (data modules, the features stage, ``vpipe classify``) indexes shards, so
they read either codec the same way. :class:`JpegAppender` writes one, frame by frame or by copying
already encoded frames (incremental re-runs and merged parts copy bytes, never re-encode).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np

from pipeline.media.errors import UserError

CODECS = ("raw", "jpeg")
DEFAULT_CODEC = "jpeg"
DEFAULT_QUALITY = 90


class CodecError(ValueError, UserError):
    """A store names a codec this version does not know, or a shard's files disagree."""


def check_codec(codec: str, where: str | os.PathLike = "") -> str:
    if codec not in CODECS:
        place = f"{where}: " if where else ""
        raise CodecError(f"{place}unknown frame codec {codec!r} (known: {', '.join(CODECS)})")
    return codec


def shard_files(prefix: str, k: int, codec: str) -> list[str]:
    """The file names of shard ``k``: what a store holds, hashes and links."""
    if codec == "jpeg":
        return [f"{prefix}-{k:05d}.mjpeg", f"{prefix}-{k:05d}.offsets.npy"]
    return [f"{prefix}-{k:05d}.npy"]


def encode_jpeg(frame: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """One uint8 ``(H, W, 3)`` RGB frame as a baseline JPEG (4:2:0, as video codecs sample colour)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decode_jpeg(data) -> np.ndarray:
    """One JPEG image (bytes or a uint8 array) as uint8 ``(H, W, 3)`` RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as image:
        return np.asarray(image.convert("RGB"))


def _decode_many(images: list) -> list:
    """JPEG images (uint8 arrays, or uint8 tensors where torch is loaded) as uint8 frames: ``(H, W, 3)``
    arrays, or ``(3, H, W)`` tensors where torch is loaded. In a process that has imported torch (every
    reader of a store) torchvision's batched libjpeg-turbo decoder, about 2× Pillow's per-image call on
    small frames and the same pixels; elsewhere (extraction, which never imports torch) Pillow."""
    tv_decode = _torchvision_decoder()
    if tv_decode is not None:
        import torch
        from torchvision.io import ImageReadMode

        tensors = [
            image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
            for image in images
        ]
        return tv_decode(tensors, mode=ImageReadMode.RGB) if tensors else []
    return [decode_jpeg(image) for image in images]


def _torchvision_decoder():
    """torchvision's ``decode_jpeg`` where torch is already loaded and torchvision is installed."""
    if "torch" not in sys.modules:
        return None
    try:
        from torchvision.io import decode_jpeg as tv_decode
    except ImportError:
        return None
    return tv_decode


def as_stored(frames: np.ndarray, params: dict | None) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` as a frame store made with ``params`` (its ``meta.json`` ``params``)
    gives them back: through JPEG and back for the ``jpeg`` codec, unchanged for ``raw``. Models see at
    inference what they saw in training."""
    params = params or {}
    if params.get("codec", "raw") != "jpeg":
        return frames
    quality = int(params.get("quality", DEFAULT_QUALITY))
    return np.stack([decode_jpeg(encode_jpeg(f, quality)) for f in frames]) if len(frames) else frames


def decode_batch_cuda(images: list[np.ndarray], device: str = "cuda"):
    """JPEG images (uint8 arrays, as :meth:`JpegShard.encoded` gives) decoded on a GPU by nvJPEG:
    a uint8 ``(N, 3, H, W)`` tensor on ``device``."""
    import torch
    from torchvision.io import decode_jpeg as tv_decode

    tensors = [torch.from_numpy(np.asarray(image)) for image in images]
    return torch.stack(tv_decode(tensors, device=device))


class JpegAppender:
    """A ``jpeg`` shard written frame by frame; the offsets file is written on close."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | os.PathLike, row_shape: tuple[int, ...], quality: int = DEFAULT_QUALITY):
        self.path = Path(path)  # frames-0000k.mjpeg
        self.row_shape, self.quality = tuple(int(n) for n in row_shape), quality
        self.offsets = [0]
        self._fh = open(self.path, "wb")

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]

    def append(self, block: np.ndarray) -> None:
        """Encode and append uint8 frames ``(n, H, W, 3)``."""
        if tuple(block.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.path}: frames of {self.row_shape} expected, got {block.shape[1:]}")
        for frame in block:
            self._write(encode_jpeg(frame, self.quality))

    def append_encoded(self, data, lengths: np.ndarray) -> None:
        """Append frames already encoded: ``data`` holds them back to back, ``lengths`` their sizes."""
        self._fh.write(memoryview(np.ascontiguousarray(data, dtype=np.uint8)))
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths, dtype=np.int64)).tolist())

    def _write(self, image: bytes) -> None:
        self._fh.write(image)
        self.offsets.append(self.offsets[-1] + len(image))

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.close()
        np.save(offsets_path(self.path), np.asarray(self.offsets, np.int64))


def offsets_path(mjpeg: Path) -> Path:
    return mjpeg.with_name(mjpeg.name[: -len(".mjpeg")] + ".offsets.npy")


# Decoded frames a process keeps, over all its JPEG shards (MiB): a shard that fits is decoded once and
# later epochs read it as fast as a raw store; one that does not is decoded on every read.
DECODED_CACHE_MB = int(os.environ.get("VPIPE_DECODED_CACHE_MB", 2048))
_cache_left = [DECODED_CACHE_MB << 20]


class JpegShard:
    """A ``jpeg`` shard read as a uint8 ``(N, H, W, 3)`` array; frames are decoded when indexed.

    Decoded frames are kept, so each frame is decoded once per process, while the process's decoded
    frames fit in ``VPIPE_DECODED_CACHE_MB`` (2048 by default; 0 turns it off): training reads the same
    frames every epoch. Only the frames read are kept, one array each (a buffer for the whole shard
    would cost the first epoch the zeroing of memory for frames never read). ``keep=False`` keeps
    none, for a reader that reads each frame once (the features stage)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: str | os.PathLike, keep: bool = True):
        self.path, self.keep = Path(path), keep
        self.offsets = np.load(offsets_path(self.path))
        size = self.path.stat().st_size
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != size:
            raise CodecError(
                f"{self.path}: {size} bytes, but {offsets_path(self.path).name} ends at {self.offsets[-1]}"
            )
        self.data = np.memmap(self.path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._shape: tuple[int, ...] | None = None
        self._kept: dict[int, np.ndarray] = {}  # row → its decoded frame, within the budget
        self._tensor = None  # the memory map as a torch tensor, made on first decode in a torch process

    def __getstate__(self) -> dict:  # a copy sent to another process keeps a cache of its own
        return {**self.__dict__, "_kept": {}, "_tensor": None}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int, ...]:
        if self._shape is None:
            self._shape = (len(self), *(self._frame(0).shape if len(self) else (0, 0, 3)))
        return self._shape

    def _frame(self, i: int) -> np.ndarray:
        return decode_jpeg(self.data[self.offsets[i] : self.offsets[i + 1]])

    def _decode(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Decode frames ``rows`` into ``out`` (``(len(rows), H, W, 3)``), checking each one's size."""
        data, starts, stops = self._bytes(), self.offsets[rows], self.offsets[np.asarray(rows) + 1]
        try:
            frames = _decode_many([data[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
        except (RuntimeError, OSError, ValueError) as err:  # torchvision's and Pillow's decode errors
            raise CodecError(
                f"{self.path}: a frame of rows {rows[0]}..{rows[-1]} is not a JPEG image ({err})"
            ) from err
        if frames and not isinstance(frames[0], np.ndarray):  # (3, H, W) tensors
            frames = [frame.numpy().transpose(1, 2, 0) for frame in frames]
        for i, frame in zip(rows, frames, strict=True):
            if tuple(frame.shape) != out.shape[1:]:
                raise CodecError(
                    f"{self.path}: frame {i} is {tuple(frame.shape)}, the shard's frames {out.shape[1:]}"
                )
        for n, frame in enumerate(frames):  # numpy's copy: no torch threads woken for small copies
            out[n] = frame

    def _bytes(self):
        """The shard's bytes: a read-only tensor over the memory map where torch decodes, else the map."""
        if self._tensor is None and _torchvision_decoder() is not None and len(self.data):
            import warnings

            import torch

            with warnings.catch_warnings():  # read-only memory: decode_jpeg only reads its input
                warnings.simplefilter("ignore", UserWarning)
                self._tensor = torch.frombuffer(self.data, dtype=torch.uint8)
        return self.data if self._tensor is None else self._tensor

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([int(range(len(self))[key])])][0]
        picked = np.arange(len(self))[key]
        if picked.ndim != 1:
            raise IndexError(f"{self.path}: index frames with an int, a slice or a 1-D array")
        out = np.empty((len(picked), *self.shape[1:]), np.uint8)
        if not self.keep:
            self._decode(picked, out)
            return out
        missing = np.array(sorted({int(i) for i in picked} - self._kept.keys()), np.int64)
        fresh: dict[int, np.ndarray] = {}
        if len(missing):
            decoded = np.empty((len(missing), *self.shape[1:]), np.uint8)
            self._decode(missing, decoded)
            fresh = dict(zip(missing.tolist(), decoded, strict=True))
            if decoded.nbytes <= _cache_left[0]:  # kept: views into this block, one per frame
                _cache_left[0] -= decoded.nbytes
                self._kept.update(fresh)
        for n, i in enumerate(picked.tolist()):
            out[n] = self._kept[i] if i in self._kept else fresh[i]
        return out

    def encoded(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Frames ``start:stop`` as they are stored: their bytes back to back and each one's length."""
        return self.data[self.offsets[start] : self.offsets[stop]], np.diff(self.offsets[start : stop + 1])
