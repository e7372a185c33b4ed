"""Registered versions MLflow itself can load and serve: a pyfunc model around a ``vpipe fit`` checkpoint.

A version holds the checkpoint (its inference recipe inside: decoding, features, classes or
vocabulary) and, for models over cached features, the backbone weights those features came from.
``mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(df)`` takes a DataFrame with one video per
row, as a path (column ``video``) or as the file's bytes in base64 (``video_b64``, what a REST client
sends to ``mlflow models serve``), and returns per row what ``vpipe classify`` prints (``label``,
``probability`` and the ``top_k`` as JSON) or, for a captioner, what ``vpipe caption`` prints
(``caption``). A still image (PNG/JPEG) is a one-frame video.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from pipeline import compat
from pipeline.tracking import runs as tracking

TOP_K = 5


class VideoModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavor of a classifier or captioner checkpoint (artifacts ``checkpoint`` and, when its
    features came from a weights file, ``backbone``)."""

    def load_context(self, context) -> None:
        from pipeline.inference.checkpoints import load

        checkpoint = context.artifacts["checkpoint"]
        self.task = str(_recipe(Path(checkpoint)).get("task", "")).rpartition(".")[2]
        command = "vpipe caption" if self.task == "Captioner" else "vpipe classify"
        self.model = load(
            checkpoint,
            weights=context.artifacts.get("backbone"),
            task=self.task or "Classifier",
            command=command,
        )

    def _frames(self, row: dict, folder: Path):
        from pipeline.inference.checkpoints import ClassifyError
        from pipeline.inference.runner import windows

        video = row.get("video")
        encoded = row.get("video_b64")
        if isinstance(encoded, str) and encoded:
            suffix = Path(str(video or row.get("filename") or "clip.mp4")).suffix or ".mp4"
            path = folder / f"input{suffix}"
            try:
                path.write_bytes(base64.b64decode(encoded, validate=True))
            except ValueError as err:
                raise ClassifyError(f"{video or 'video_b64'}: not base64 ({err})") from err
        elif isinstance(video, str) and video:
            path = Path(video)
            if not path.exists():
                raise ClassifyError(f"{video}: no such file")
        else:
            raise ClassifyError("each row needs `video` (a path) or `video_b64` (the file's bytes, base64)")
        ((_, _, frames),) = windows(path, self.model.fps, self.model.size, None, None)
        return frames

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        from pipeline.inference.classify import top

        k = int((params or {}).get("top_k", TOP_K))
        rows = []
        for i, row in enumerate(model_input.to_dict("records")):
            with tempfile.TemporaryDirectory(prefix="vpipe-serve-") as tmp:
                frames = self._frames(row, Path(tmp))
            name = str(row.get("video") or row.get("filename") or f"row {i}")
            if self.task == "Captioner":
                with torch.inference_mode():
                    caption = self.model.model.generate(self.model.inputs(frames))[0]
                rows.append({"video": name, "caption": caption})
            else:
                best = top(self.model.probabilities(frames), self.model.classes, k)
                rows.append(
                    {
                        "video": name,
                        "label": best[0][0],
                        "probability": best[0][1],
                        "top_k": json.dumps(
                            [{"label": label, "probability": round(p, 6)} for label, p in best]
                        ),
                    }
                )
        return pd.DataFrame(rows)


def example_video(folder: Path, size: tuple[int, int] | None) -> Path:
    """A tiny real H.264 clip (a grey square moving right) for the logged input example."""
    import numpy as np

    from pipeline.media.video import write_video

    width, height = size or (64, 48)
    frames = np.full((8, height, width, 3), 40, np.uint8)
    side = max(4, min(width, height) // 4)
    for t in range(8):
        x = t * (width - side) // 7
        frames[t, height // 2 - side // 2 : height // 2 + side // 2, x : x + side] = 200
    path = folder / "example.mp4"
    write_video(path, frames, 10.0)
    return path


SERVED_TASKS = ("Classifier", "Captioner")


def _recipe(checkpoint: Path) -> dict:
    import torch

    # mmap: the recipe only; the weights are not read.
    return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("vpipe") or {}


def servable(checkpoint: Path) -> bool:
    """Whether the pyfunc model can serve the checkpoint: a classifier or a captioner that records how its
    frames were extracted (a model trained on a store without a frame store's recipe cannot decode videos)."""
    recipe = _recipe(checkpoint)
    return str(recipe.get("task", "")).rpartition(".")[2] in SERVED_TASKS and bool(recipe.get("frames_meta"))


def log_model(checkpoint: Path, run_id: str) -> mlflow.models.model.ModelInfo:
    """Log ``checkpoint`` as the pyfunc model ``model`` of run ``run_id`` (with its backbone weights when the
    features were computed from a file), with a signature and an input example; returns its info."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    recipe = _recipe(checkpoint)
    artifacts = {"checkpoint": str(checkpoint)}
    features = recipe.get("features_meta") or {}
    weights = features.get("weights_path")
    if weights and Path(weights).is_file():
        artifacts["backbone"] = str(weights)
    captioner = str(recipe.get("task", "")).endswith("Captioner")
    outputs = (
        [ColSpec("string", "video"), ColSpec("string", "caption")]
        if captioner
        else [
            ColSpec("string", "video"),
            ColSpec("string", "label"),
            ColSpec("double", "probability"),
            ColSpec("string", "top_k"),
        ]
    )
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "video", required=False),
                ColSpec("string", "video_b64", required=False),
                ColSpec("string", "filename", required=False),
            ]
        ),
        outputs=Schema(outputs),
        params=None if captioner else ParamSchema([ParamSpec("top_k", "long", TOP_K)]),
    )
    size = ((recipe.get("frames_meta") or {}).get("params") or {}).get("size")
    with tempfile.TemporaryDirectory(prefix="vpipe-example-") as tmp:
        clip = example_video(Path(tmp), tuple(size) if size else None)
        example = pd.DataFrame(
            [{"video_b64": base64.b64encode(clip.read_bytes()).decode(), "filename": "example.mp4"}]
        )
        # What mlflow.pyfunc.log_model does, less its check of the input example: loading the model and
        # running it on the clip (the backbone, the decoder: seconds per fit). The signature is given, so
        # nothing is inferred from the example either; the tests serve and predict registered versions.
        # Inside the run: the logged model belongs to the run's experiment (without an active run MLflow
        # files it under the default experiment, which a team server may not let the user write).
        # MLflow compares every requirement of a model it saves with the installed packages, to warn of a
        # mismatch; the first comparison maps every installed distribution's files to its modules (~0.4 s
        # of a one-epoch fit). The requirements logged here are this installed package's own dependencies
        # (`requirements()`), which pip checked when it installed it: the comparison is skipped.
        with compat.skip_requirement_check(), mlflow.start_run(run_id=run_id):
            return mlflow.models.Model.log(
                artifact_path=None,  # deprecated for `name`, yet a required argument
                name="model",
                flavor=_Pyfunc,
                flavor_name="mlflow.pyfunc",
                run_id=run_id,
                python_model=VideoModel(),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                pip_requirements=requirements(),
                validate_serving_input=False,
            )


class _Pyfunc:
    """``mlflow.pyfunc`` as the flavor ``mlflow.models.Model.log`` saves with: it hands ``save_model`` its
    own options too (``validate_serving_input``), which ``mlflow.pyfunc.save_model`` does not take."""

    @staticmethod
    def save_model(path, validate_serving_input: bool = True, **kwargs) -> None:
        mlflow.pyfunc.save_model(path, **kwargs)


def requirements() -> list[str]:
    """The project's own dependencies (``vpipe`` itself is installed from its repository: serve with
    ``--env-manager local`` in the project's environment). Given explicitly, so MLflow does not infer them
    by loading the model in a subprocess."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in requires("vpipe") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []


def register_best(
    client,
    name: str,
    run_id: str,
    checkpoint: Path,
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
) -> str:
    """Log ``checkpoint`` as the run's pyfunc model ``model`` (this module's pyfunc model: MLflow can load and
    serve it; a forecaster's checkpoint as the artifact folder ``model/``) and register it as a new version of the registered model ``name``, tagged with its headline
    test metrics; returns the version.

    ``models:/NAME/VERSION`` (or ``models:/NAME/latest``) downloads the model folder, whose checkpoint
    carries everything ``vpipe classify`` and ``vpipe caption`` need.
    """
    from mlflow.exceptions import MlflowException

    if servable(checkpoint):
        info = log_model(checkpoint, run_id)
        source, model_id = info.model_uri, info.model_id
    else:  # forecasters: the checkpoint as is (`vpipe forecast` is its loader)
        client.log_artifact(run_id, str(checkpoint), "model")
        source, model_id = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model", None
    client = tracking.registry_client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            description=f"Best checkpoints of the `{name}` training config "
            "(vpipe fit -c configs/{name}.yaml).".replace("{name}", name),
        )
    # The headline metrics (test/acc, test/mse, ...); per-horizon and baseline ones stay on the run.
    headline = {k: v for k, v in metrics.items() if k.count("/") == 1}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in headline.items())
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        model_id=model_id,
        description=f"Test metrics of the best checkpoint: {summary}",
        tags={**{k: str(v) for k, v in headline.items()}, **(tags or {})},
    )
    if model_id:  # the logged model lists its versions (the tag mlflow.register_model sets)
        compat.link_model_version(client, model_id, version.name, version.version)
    return version.version
