"""Trained models on new files: checkpoints rebuilt with their preprocessing, ``vpipe classify``, ``vpipe caption``, ``vpipe forecast`` and the pyfunc model MLflow serves."""
