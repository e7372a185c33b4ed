"""timm backbones: the only module of the package that imports ``timm``.

A backbone brings its own preprocessing (timm's data config: input size, mean/std, interpolation)
and a cache key that identifies the features it computes: model name, weights identity (file hash,
pretrained tag or random-init seed), preprocessing and pooling.
"""

from __future__ import annotations

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

from pipeline.stores import file_sha256


class BackboneError(ValueError):
    pass


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]  # (height, width) fed to the model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # resize of whole frames, no crop (cropping is a training-time augmentation)


def _check_name(name: str) -> None:
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest timm names: {', '.join(close)}" if close else ""
    raise BackboneError(f"unknown timm backbone {name!r}{hint}")


def create(name: str, *, weights: str | None = None, pretrained: bool = False, seed: int = 0) -> tuple[nn.Module, dict]:
    """The model (no classifier, eval mode) and its weights identity.

    Without ``weights`` or ``pretrained`` the model is randomly initialised with ``seed``: it works
    offline, and the seed is part of the cache key.
    """
    _check_name(name)
    if weights and pretrained:
        raise BackboneError("give --weights FILE or --pretrained, not both")
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:  # noqa: BLE001 - hub errors come in many types
            raise BackboneError(f"{name}: pretrained weights could not be fetched ({type(err).__name__}: {err}); "
                                "download them where the hub is reachable and pass --weights FILE") from err
        identity = {"pretrained": model.pretrained_cfg.get("tag") or model.pretrained_cfg.get("hf_hub_id") or name}
    else:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0)
        identity = {"random_init_seed": seed}
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise BackboneError(f"{path}: weights file not found")
            try:
                timm.models.load_checkpoint(model, str(path), strict=False)
            except Exception as err:  # noqa: BLE001
                raise BackboneError(f"{path}: cannot load weights into {name} ({type(err).__name__}: {err})") from err
            identity = {"weights_file": path.name, "weights_sha256": file_sha256(path)}
    return model.eval(), identity


def preprocessing(model: nn.Module, input_size: int | None = None) -> Preprocessing:
    """The model's own preprocessing from timm's data config; ``input_size`` overrides its side."""
    cfg = timm.data.resolve_model_data_config(model)
    size = (input_size, input_size) if input_size else tuple(cfg["input_size"][1:])
    interpolation = cfg.get("interpolation", "bilinear")
    return Preprocessing(size, tuple(cfg["mean"]), tuple(cfg["std"]), interpolation if interpolation in ("bilinear", "bicubic") else "bilinear")


class FrameEncoder(nn.Module):
    """uint8 frames ``(B, H, W, 3)`` → features ``(B, D)`` (avg) or ``(B, C, G, G)`` (grid).

    Normalisation runs on the device the module is on, so only uint8 crosses the bus.
    """

    def __init__(self, model: nn.Module, prep: Preprocessing, pool: Literal["avg", "grid"] = "avg", grid: int = 4):
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
            x = F.interpolate(x.float(), size=self.prep.input_size, mode=self.prep.interpolation, align_corners=False,
                              antialias=True)
        # One kernel converts uint8 to float and normalises (type promotion inside addcmul).
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=torch.channels_last)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(self.normalise(frames))
        if self.pool == "grid":
            return F.adaptive_avg_pool2d(fmap, self.grid)
        return self.model.forward_head(fmap, pre_logits=True)


def cache_key(name: str, identity: dict, prep: Preprocessing, pool: str, grid: int, frames_hash: str) -> tuple[str, dict]:
    """Everything the features depend on, and its hash."""
    parts = {"backbone": name, "weights": identity, "preprocessing": asdict(prep), "pool": pool,
             "grid": grid if pool == "grid" else None, "frames_hash": frames_hash}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts
