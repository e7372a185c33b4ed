"""Trained checkpoints as ready models: a ``vpipe fit`` checkpoint (or a registered MLflow version of
one) rebuilt with the preprocessing it was trained with.

A checkpoint carries an inference recipe (see :class:`pipeline.tracking.lineage.InferenceRecipe`): the model's
config, the class names, the clip length, and the ``meta.json`` of the frame store and of the feature
store it was trained on. :func:`load` rebuilds the model and, for a model over cached features, the
timm backbone of the feature store (weights identity, input size, normalisation, pooling), so that
new videos are decoded and encoded as the training data was. ``vpipe classify``, ``vpipe caption`` and
the served models use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.media.errors import UserError


class ClassifyError(RuntimeError, UserError):
    """A model or a video cannot be used; the message names the file and the reason."""


@dataclass
class LoadedModel:
    """A loaded classifier and what it needs: decoding parameters and, for feature models, the backbone."""

    model: torch.nn.Module
    classes: list[str]
    num_segments: int
    fps: float  # extraction frame rate (0: every frame)
    size: tuple[int, int] | None  # (width, height) after extraction scaling
    encoder: torch.nn.Module | None  # uint8 frames → features; None when the model takes frames
    source: str
    modality: str = "rgb"  # what an end-to-end model reads per step: frames or their differences (pipeline.datasets.clips.clip_frames)
    frame_params: dict | None = None  # the frame store's extraction parameters (its codec among them)

    @torch.inference_mode()
    def inputs(self, frames: np.ndarray) -> torch.Tensor:
        """What the model reads of one clip of uint8 frames ``(T, H, W, 3)``: ``(1, T', ...)``, features
        computed as the feature store's were, or the sampled frames themselves."""
        from pipeline.datasets.clips import clip_frames
        from pipeline.media.codecs import as_stored

        device = next(self.model.parameters()).device
        frames = as_stored(frames, self.frame_params)  # JPEG-stored frames: the same round trip
        clip = torch.from_numpy(
            np.ascontiguousarray(clip_frames(frames, self.num_segments, self.modality))
        ).to(device)
        if self.encoder is not None:
            # Features are stored as float16: round the same way, so the head sees what it was trained on.
            return self.encoder(clip).half().float().flatten(1)[None]  # (1, T, D)
        return clip[None]  # (1, T, H, W, 3) uint8: the model encodes frames itself

    @torch.inference_mode()
    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Class probabilities ``(C,)`` of one clip of uint8 frames ``(T, H, W, 3)``."""
        return torch.softmax(self.model(self.inputs(frames)).float(), -1)[0].cpu().numpy()


def fetch(uri: str, folder: Path) -> Path:
    """Download the checkpoint of a registered model version (``models:/NAME/VERSION``,
    ``models:/NAME/latest`` or ``models:/NAME@ALIAS``) from this project's MLflow store into ``folder``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import runs as tracking

    uri_tracking = tracking.tracking_uri()
    name, _, version = uri.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    if not uri.startswith("models:/") or not name or bool(version) == bool(alias):
        raise ClassifyError(
            f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"
        )
    try:
        tracking.ensure_store(uri_tracking)
        client = tracking.registry_client()  # explicit URIs: no global MLflow state
        if alias:
            version = client.get_model_version_by_alias(name, alias).version
        elif version.lower() == "latest":
            versions = [int(v.version) for v in client.search_model_versions(f"name = '{name}'")]
            if not versions:
                raise ClassifyError(f"{uri}: no version of registered model {name!r} in {uri_tracking}")
            version = str(max(versions))
        source = client.get_model_version_download_uri(name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(folder), tracking_uri=uri_tracking
            )
        )
    except (MlflowException, OSError, tracking.TrackingError) as err:
        raise ClassifyError(
            f"{uri}: cannot be fetched from {uri_tracking} ({getattr(err, 'message', err)})"
        ) from err
    found = sorted(local.rglob("*.ckpt")) if local.is_dir() else [local]
    if not found:
        raise ClassifyError(f"{uri}: the registered files hold no checkpoint")
    return found[0]


def rebuild_backbone(meta: dict, weights: str | None, source: str) -> torch.nn.Module:
    """The feature store's backbone, rebuilt from its ``meta.json``: name, weights identity, preprocessing, pooling."""
    from pipeline.models import backbone
    from pipeline.storage.store import file_sha256

    identity = meta.get("weights") or {}
    if not weights and meta.get("weights_path") and Path(meta["weights_path"]).is_file():
        weights = meta["weights_path"]  # where the features stage read them (checked by hash below)
    try:
        if "weights_sha256" in identity:
            if not weights:
                raise ClassifyError(
                    f"{source}: its features were computed with weights {identity['weights_file']}; "
                    "pass them with --weights FILE"
                )
            if file_sha256(weights) != identity["weights_sha256"]:
                raise ClassifyError(
                    f"{weights}: not the weights the features were computed with "
                    f"({identity['weights_file']}, sha256 {identity['weights_sha256'][:12]}…)"
                )
            model, _ = backbone.create(meta["backbone"], weights=weights)
        elif "pretrained" in identity:
            model, _ = backbone.create(meta["backbone"], pretrained=True)
        else:
            model, _ = backbone.create(meta["backbone"], seed=int(identity.get("random_init_seed", 0)))
    except backbone.BackboneError as err:
        raise ClassifyError(f"{source}: {err}") from err
    prep = meta["preprocessing"]
    prep = backbone.Preprocessing(
        tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]), prep["interpolation"]
    )
    return backbone.FrameEncoder(model, prep, meta.get("pool", "avg"), int(meta.get("grid") or 4))


def load(
    path: str | Path,
    weights: str | None = None,
    device: str = "cpu",
    source: str | None = None,
    task: str = "Classifier",
    command: str = "vpipe classify",
) -> LoadedModel:
    """A model of ``task`` (the LightningModule's class name) from a ``vpipe fit`` checkpoint, with its
    decoding and feature recipe.

    Raises:
        ClassifyError: not a checkpoint, no inference recipe, a model of another task, or its backbone
            cannot be rebuilt; the message names ``source`` (default: the path).
    """
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise ClassifyError(f"{source}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise ClassifyError(
            f"{source}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err
    recipe = checkpoint.get("vpipe") if isinstance(checkpoint, dict) else None
    if not recipe:
        raise ClassifyError(f"{source}: no inference recipe in the checkpoint (write it with `vpipe fit`)")
    found = recipe.get("task", "?")
    if not recipe.get("classes") or found.rpartition(".")[2] != task:
        raise ClassifyError(f"{source}: a checkpoint of {found}, not of a {task}; `{command}` needs a {task}")
    if not recipe.get("frames_meta"):
        frames = (recipe.get("features_meta") or {}).get("frames", "?")
        raise ClassifyError(
            f"{source}: the checkpoint does not record how frames were extracted (the frame store "
            f"{frames} was not readable when the model was trained)"
        )

    from jsonargparse import ArgumentParser
    from pytorch_lightning import LightningModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=LightningModule)
    try:
        model = parser.instantiate_classes(parser.parse_object({"model": recipe["model"]})).model
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as err:  # noqa: BLE001 - config and state-dict errors come in many types
        raise ClassifyError(
            f"{source}: the model cannot be rebuilt from its recipe ({type(err).__name__}: {err})"
        ) from err
    encoder, modality = None, recipe.get("modality", "rgb")
    if recipe.get("input") == "features":
        encoder = rebuild_backbone(recipe["features_meta"], weights, source).to(device)
        modality = recipe["features_meta"].get(
            "modality", "rgb"
        )  # what the cached features were computed from
    params = recipe["frames_meta"].get("params") or {}
    size = params.get("size")
    return LoadedModel(
        model.eval().to(device),
        list(recipe["classes"]),
        int(recipe["num_segments"]),
        float(params.get("fps") or 0.0),
        tuple(size) if size else None,
        encoder,
        source,
        modality,
        params,
    )
