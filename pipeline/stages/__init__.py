"""The data stages of ``dvc.yaml``: ``vpipe extract`` (decoding workers, parts and merges) and ``vpipe features`` (from a frame store or straight from videos)."""
