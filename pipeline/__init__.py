"""vpipe: a video-understanding pipeline (PyAV → timm features → Lightning temporal models → MLflow, via DVC)."""

__version__ = "0.1.0"
