"""vpipe: a video-understanding pipeline (PyAV → timm features → Lightning temporal models → MLflow, via DVC).

The subpackages follow the data flow, each importing only those before it: :mod:`pipeline.media` →
:mod:`pipeline.storage` → :mod:`pipeline.datasets` → :mod:`pipeline.models` → :mod:`pipeline.systems` →
:mod:`pipeline.tracking` → :mod:`pipeline.stages` → :mod:`pipeline.inference`; the commands (``cli``,
``commands``, ``train``, ``report``, ``ui``, ``add_dataset``, ``mlflow_app``) sit on top. See
``docs/architecture.md``.
"""

from pipeline import aliases

__version__ = "0.1.0"

aliases.install()
