"""What a training run read, recorded in MLflow: lineage tags and the input stores as MLflow datasets.

Lineage (:func:`lineage_tags`): every run is tagged with what it was trained on. The stores' own
``meta.json`` content hashes and cache keys describe exactly the data that was read. Inside a DVC
stage the ``dvc.lock`` hashes of the input stores are tagged too: DVC writes a stage's lock entry as
soon as the stage finishes, so while ``train@X`` runs, the entries of the upstream ``features``/
``extract`` stages describe the stores it reads (the train stage's own entry, written after it
finishes, is not there yet). Outside DVC the lock may describe an older repro, so it is not tagged.
Training configs are tracked by DVC as params (values, not hashes): their MD5 is tagged instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pipeline import compat
from pipeline.tracking.workspace import workspace


def data_inputs(datamodule) -> tuple[str | None, str | None]:
    """``(feature store, frame store)`` a data module reads (its ``inputs``, by kind)."""
    inputs = getattr(datamodule, "inputs", {})
    return inputs.get("features"), inputs.get("frames")


def store_dataset(path: str | os.PathLike):
    """An MLflow dataset entity for a frame, feature or grid store: its folder name (``frames/gestures``), the
    content hash as the digest, the absolute path as the source, and a profile of its videos per split,
    frames and classes; the schema is the per-frame shape and dtype. None when ``path`` is not a store."""
    import json

    from mlflow.entities import Dataset

    path = Path(path).resolve()
    meta = read_meta(path)
    if meta.get("kind") == "grids":
        schema = {k: meta.get(k) for k in ("kind", "shape", "channels", "slots_per_day", "slot_minutes")}
        profile = {f"{s}_slots": n for s, n in sorted(meta.get("slots", {}).items())}
    elif meta.get("kind") in ("frames", "features"):
        schema, profile = _video_store_description(path, meta)
    else:
        return None
    # The digest column holds 36 characters: the first 32 of the SHA-256 content hash.
    return Dataset(
        name=f"{meta['kind']}/{path.name}",
        digest=str(meta.get("content_hash") or "")[:32] or "unknown",
        source_type="local",
        source=json.dumps({"uri": path.as_uri()}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )


def _video_store_description(path: Path, meta: dict) -> tuple[dict, dict]:
    """The schema (per-frame shape, dtype, how features were made) and profile (videos per split,
    frames, classes) of a frame or feature store."""
    import csv

    splits: dict[str, int] = {}
    classes: set[str] = set()
    frames = 0
    try:
        with open(path / "index.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                splits[row["split"]] = splits.get(row["split"], 0) + 1
                classes.add(row["label"])
                frames += int(row.get("length") or 0)
    except OSError:
        pass
    profile = {
        "videos": sum(splits.values()),
        **{f"{s}_videos": n for s, n in sorted(splits.items())},
        "frames": frames,
        "classes": sorted(classes),
    }
    schema = {
        "kind": meta["kind"],
        "dtype": meta.get("dtype", "uint8"),
        "shape_per_frame": meta.get("feature_shape") or meta.get("params", {}).get("size"),
    }
    for key in ("backbone", "pool", "modality", "cache_key"):
        if meta.get(key) is not None:
            schema[key] = meta[key]
    return schema, profile


def log_datasets(
    client, run_id: str, stores: list[str | os.PathLike], context: str = "training", with_sources: bool = True
) -> list[str]:
    """Log each store as an input of the run (``mlflow.log_input``'s entity, context tag ``context``); a
    feature store brings the frame store it was computed from (unless not ``with_sources``). Returns the
    dataset names logged."""
    paths, inputs = [], []
    for store in stores:
        if store and store not in paths:
            paths.append(str(store))
            source = (
                read_meta(store).get("frames")
                if with_sources and read_meta(store).get("kind") == "features"
                else None
            )
            if source and Path(source).is_dir() and source not in paths:
                paths.append(source)
    for path in paths:
        dataset = store_dataset(path)
        if dataset is not None:
            inputs.append(compat.dataset_input(dataset, context))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return [i.dataset.name for i in inputs]


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def read_meta(store: str | os.PathLike) -> dict:
    import json

    try:
        return json.loads((Path(store) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def dvc_lock_outs(root: Path) -> dict[str, tuple[str, str]]:
    """``path → (hash, stage)`` for every stage output recorded in ``root/dvc.lock``."""
    lock = root / "dvc.lock"
    try:
        stat = lock.stat()
    except OSError:
        return {}
    return dict(_lock_outs(lock, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _lock_outs(lock: Path, mtime_ns: int, size: int) -> tuple[tuple[str, tuple[str, str]], ...]:
    """The outputs of one version of a ``dvc.lock`` (read once per process: a run's tags and its lineage
    both ask), parsed with libyaml where PyYAML has it (the lock of the whole pipeline is ~100 KB)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    outs = {}
    for stage, entry in ((yaml.load(lock.read_text(), Loader=loader) or {}).get("stages") or {}).items():
        for out in entry.get("outs") or []:
            digest = out.get("md5") or out.get(out.get("hash", ""), "")
            outs[os.path.normpath(out["path"])] = (str(digest), stage)
    return tuple(outs.items())


def lineage_tags(
    features: str | None = None, frames: str | None = None, configs: list[str] = (), grids: str | None = None
) -> dict[str, str]:
    """Tags naming the inputs of a training run: stores (path, content hash, cache key, extraction
    parameters), their ``dvc.lock`` hashes inside a DVC stage, and the config files with their MD5."""
    tags: dict[str, str] = {}
    if grids:
        tags["data.grids"] = str(grids)
        tags["data.grids.content_hash"] = str(read_meta(grids).get("content_hash", ""))
    frames_hash = None
    if features:
        meta = read_meta(features)
        tags["data.features"] = str(features)
        for key, tag in (
            ("content_hash", "content_hash"),
            ("cache_key", "cache_key"),
            ("backbone", "backbone"),
            ("pool", "pool"),
        ):
            if meta.get(key) is not None:
                tags[f"data.features.{tag}"] = str(meta[key])
        frames = frames or meta.get("frames")
        frames_hash = meta.get("frames_hash")  # what the features were computed from
    if frames:
        meta = read_meta(frames)
        tags["data.frames"] = str(frames)
        if frames_hash or meta.get("content_hash"):
            tags["data.frames.content_hash"] = str(frames_hash or meta["content_hash"])
        if meta.get("params"):
            tags["data.frames.params"] = ", ".join(f"{k}={v}" for k, v in meta["params"].items())
    if os.environ.get("DVC_STAGE"):
        root = workspace()
        outs = dvc_lock_outs(root)
        for role, path in (("features", features), ("frames", frames), ("grids", grids)):
            if path:
                rel = os.path.normpath(os.path.relpath(Path(path).resolve(), root))
                if rel in outs:
                    tags[f"dvc.lock.{role}"] = f"{outs[rel][0]} ({outs[rel][1]})"
    if configs:
        files = [Path(c) for c in configs]
        tags["config"] = ", ".join(str(c) for c in configs)
        tags["config.md5"] = ", ".join(_md5(f) if f.is_file() else "?" for f in files)
    return tags
