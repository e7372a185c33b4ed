"""The import paths of the flat ``pipeline/`` layout, kept for what recorded them: checkpoints name their
model and data classes by path (``pipeline.classification.Classifier``) and registered pyfunc models
pickle ``pipeline.serving.VideoModel``. Importing ``pipeline.OLD`` gives the module it became: the
same module object, so classes compare equal. ``pipeline.tracking`` is now a package (its functions
are in :mod:`pipeline.tracking.runs`) and the caption scores of ``pipeline.captions`` are in
:mod:`pipeline.systems.caption_scores`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

MOVED = {
    "video": "media.video",
    "resample": "media.resample",
    "images": "media.images",
    "pictures": "media.pictures",
    "codecs": "media.codecs",
    "manifest": "media.manifest",
    "atomic": "storage.atomic",
    "stores": "storage.store",
    "store_writer": "storage.writer",
    "sources": "storage.sources",
    "grids": "storage.grids",
    "captions": "storage.captions",
    "data": "datasets.clips",
    "loaders": "datasets.loaders",
    "caption_data": "datasets.caption_clips",
    "grid_data": "datasets.flows",
    "sequences": "datasets.sequences",
    "frame_slices": "datasets.frame_slices",
    "heads": "models.heads",
    "cores": "models.cores",
    "caption_head": "models.caption_decoder",
    "backbone": "models.backbone",
    "weights": "models.weights",
    "classification": "systems.classifier",
    "captioning": "systems.captioner",
    "forecasting": "systems.forecaster",
    "conv_forecasting": "systems.conv_forecaster",
    "optim": "systems.optim",
    "inputs": "tracking.inputs",
    "lineage": "tracking.lineage",
    "callbacks": "tracking.callbacks",
    "timings": "tracking.timings",
    "extract": "stages.extract",
    "workers": "stages.workers",
    "parts": "stages.parts",
    "features": "stages.features",
    "video_features": "stages.video_features",
    "feature_job": "stages.encoding",
    "checkpoints": "inference.checkpoints",
    "classify": "inference.classify",
    "forecast": "inference.rollout",
    "serving": "inference.serving",
}
"""Old module name under ``pipeline`` → its module now, under ``pipeline``."""


class OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``pipeline.OLD`` for each name of :data:`MOVED` and loads it as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != "pipeline" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module("pipeline." + MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module) -> None:
        """Nothing to run: the module it moved to was run when it was imported."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the finders of real modules: a module that exists
    under an old name is never shadowed)."""
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(OldPaths())
