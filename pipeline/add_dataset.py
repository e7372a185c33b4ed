"""``vpipe add-dataset`` and ``vpipe remove-dataset``: a dataset of one's own and its experiments in the
pipeline, in one change.

``add-dataset NAME --manifest M.csv`` checks the manifest (``vpipe check``'s rules:
:func:`pipeline.media.manifest.validate`), then writes

- three entries in ``params.yaml``: ``datasets.NAME`` (root, manifest, fps, size, codec),
  ``NAME`` in ``features.datasets``, and one experiment ``NAME_HEAD: data/features/NAME`` per head;
- ``configs/backbone_NAME.yaml`` from a template's backbone recipe (``configs/backbone_TEMPLATE.yaml``)
  and ``configs/NAME_HEAD.yaml`` per head from the template's head configs (``gesture_HEAD.yaml`` for
  ``gestures``, ``action_HEAD.yaml`` for ``actions``, the other template's where it has none), every
  path pointing at NAME's stores (``data/frames/NAME``, ``data/features/NAME``);
- one comparison plot in ``dvc.yaml`` (the val accuracy of NAME's backbone and heads) and the
  confusion matrix of its first head. The report stage needs nothing: it depends on the whole
  ``metrics/`` folder.

The files are edited as text, lines inserted where the entries belong, so every comment stays; each is
written to a temporary file beside it and renamed only when all are written (a failure changes
nothing). The change is printed as a unified diff. ``remove-dataset NAME`` removes exactly those lines
and files (``params.yaml``, ``dvc.yaml`` and ``configs/`` come back byte for byte); the stores, models,
metrics and plots stay unless ``--purge``.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.media.errors import UserError

HEADS = ("lstm", "gru", "transformer", "meanpool", "rnn")
# A template's head configs are named after it (gestures → gesture_gru.yaml, actions → action_lstm.yaml).
PREFIXES = {"gestures": "gesture", "actions": "action"}
NAME = re.compile(r"[a-z][a-z0-9_]*")


class DatasetError(ValueError, UserError):
    """The change cannot be made; the message is one line and nothing was written."""


@dataclass
class Change:
    """New contents per file (relative to the project root); ``None`` deletes the file."""

    root: Path
    files: dict[str, str | None]

    def diff(self) -> str:
        """The change as a unified diff (``/dev/null`` for files created or deleted)."""
        out = []
        for rel, new in self.files.items():
            path = self.root / rel
            old = path.read_text() if path.is_file() else None
            out += difflib.unified_diff(
                (old or "").splitlines(keepends=True),
                (new or "").splitlines(keepends=True),
                f"a/{rel}" if old is not None else "/dev/null",
                f"b/{rel}" if new is not None else "/dev/null",
            )
        return "".join(out)

    def apply(self) -> None:
        """Every new file written to a temporary beside it first; renamed (and deletions done) only
        once all are written, so a failure while writing leaves the project as it was."""
        temps: dict[Path, Path] = {}
        try:
            for rel, new in self.files.items():
                if new is None:
                    continue
                path = self.root / rel
                temp = path.with_name(f".{path.name}.add-dataset-{os.getpid()}")
                temps[path] = temp
                temp.write_text(new)
                if path.exists():
                    shutil.copymode(path, temp)
        except BaseException:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
            raise
        for path, temp in temps.items():
            os.replace(temp, path)
        for rel, new in self.files.items():
            if new is None:
                (self.root / rel).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# params.yaml and dvc.yaml as text: the block of a top-level key, lines inserted at its end


def _block_end(lines: list[str], key: str, indent: str = "") -> int:
    """Index after the last indented line of the mapping ``key:`` (at ``indent``)."""
    head = f"{indent}{key}:"
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == head)
    except StopIteration:
        raise DatasetError(f"no block `{head.strip()}` (a line of its own) to add to") from None
    end = start + 1
    for i in range(start + 1, len(lines)):
        text = lines[i].rstrip("\n")
        if not text.strip():
            continue
        if len(text) - len(text.lstrip()) <= len(indent):
            break
        end = i + 1
    return end


FEATURES_LIST = re.compile(r"^(  datasets: \[)([^\]]*)(\].*)$")


def _features_line(lines: list[str]) -> int:
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == "features:"), None)
    for i in range(start + 1 if start is not None else len(lines), len(lines)):
        if FEATURES_LIST.match(lines[i].rstrip("\n")):
            return i
        if lines[i].strip() and not lines[i].startswith(" "):
            break
    raise DatasetError("params.yaml: no `features:` block with a `  datasets: [...]` line")


def _quote(value: str) -> str:
    """A YAML plain scalar where it is one, else double-quoted."""
    import yaml

    return value if yaml.safe_load(f"k: {value}") == {"k": value} else f'"{value}"'


def dataset_line(name: str, root: str, manifest: str, fps: float, size: str, codec: str) -> str:
    return (
        f"  {name}: {{root: {_quote(root)}, manifest: {_quote(manifest)}, fps: {fps:g}, "
        f"size: {size}, codec: {codec}}}\n"
    )


def experiment_lines(name: str, heads: list[str]) -> list[str]:
    return [f"  {name}_{head}: data/features/{name}\n" for head in heads]


def plots_text(name: str, heads: list[str]) -> str:
    """The dvc.yaml plots of NAME: its backbone's and heads' val accuracy, its first head's confusion."""
    curves = "".join(
        f"        plots/{n}/epochs.csv: val/acc\n"
        for n in [f"backbone_{name}"] + [f"{name}_{h}" for h in heads]
    )
    return (
        f"  - {name}_val_accuracy:  # vpipe add-dataset {name}\n"
        "      template: linear\n"
        "      x: epoch\n"
        "      y:\n"
        f"{curves}"
        f"  - plots/{name}_{heads[0]}/predictions.csv:\n"
        "      template: confusion\n"
        "      x: predicted\n"
        "      y: actual\n"
    )


# ---------------------------------------------------------------------------------------------------------
# configs from the templates


def _template_config(configs: Path, template: str, head: str) -> Path:
    own = PREFIXES.get(template, template.rstrip("s"))
    for prefix in [own, *(p for p in PREFIXES.values() if p != own)]:
        path = configs / f"{prefix}_{head}.yaml"
        if path.is_file():
            return path
    raise DatasetError(f"no head config for {head!r} (configs/{own}_{head}.yaml or another template's)")


def _body(text: str) -> str:
    """A config without its leading comment block (the template's description)."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def _retarget(text: str, name: str, experiment: str, epochs: int | None) -> str:
    text = re.sub(r"(?m)^name: .*$", f"name: {experiment}", text)
    text = re.sub(r"(?m)^(\s+frames:) data/frames/\S+", rf"\1 data/frames/{name}", text)
    text = re.sub(r"(?m)^(\s+features:) data/features/\S+", rf"\1 data/features/{name}", text)
    if epochs is not None:
        text = re.sub(r"(?m)^(  max_epochs:) .*$", rf"\1 {epochs}", text)
    return text


def backbone_config(configs: Path, template: str, name: str, epochs: int | None) -> str:
    source = configs / f"backbone_{template}.yaml"
    head = (
        f"# The backbone stage for `{name}` (vpipe add-dataset, from configs/backbone_{template}.yaml): the timm\n"
        f"# CNN trained once on the train split of data/frames/{name}; features@{name} then runs it over every frame.\n"
        f"#   vpipe fit -c configs/backbone_{name}.yaml\n"
        f"#   → models/backbone_{name}/{{backbone.safetensors,backbone.json}}, metrics/backbone_{name}.json (val)\n"
    )
    return head + _retarget(_body(source.read_text()), name, f"backbone_{name}", epochs)


def head_config(configs: Path, template: str, name: str, head: str, epochs: int | None) -> str:
    source = _template_config(configs, template, head)
    top = (
        f"# `{name}` with the {head} head (vpipe add-dataset, from configs/{source.name}), over the cached\n"
        f"# per-frame features of the `{name}` backbone (data/features/{name}).\n"
        f"#   vpipe fit -c configs/{name}_{head}.yaml\n"
    )
    return top + _retarget(_body(source.read_text()), name, f"{name}_{head}", epochs)


# ---------------------------------------------------------------------------------------------------------


def _load(root: Path) -> tuple[str, str, dict]:
    import yaml

    params_path, dvc_path = root / "params.yaml", root / "dvc.yaml"
    if not params_path.is_file() or not dvc_path.is_file():
        raise DatasetError(f"{root}: no params.yaml and dvc.yaml here (run it in the project's folder)")
    params_text = params_path.read_text()
    return params_text, dvc_path.read_text(), yaml.safe_load(params_text) or {}


def _project_path(path: Path, root: Path) -> str:
    """``path`` relative to the project when inside it (as DVC wants its deps), else absolute."""
    path = path.resolve()
    return path.relative_to(root.resolve()).as_posix() if path.is_relative_to(root.resolve()) else str(path)


def check_manifest(manifest: Path) -> str:
    """``vpipe check``'s rules; a one-line refusal on any error, else a one-line summary."""
    from pipeline.media.manifest import ManifestError, read_manifest, validate

    try:
        entries = read_manifest(manifest)
    except ManifestError as err:
        raise DatasetError(" ".join(str(err).split())) from None
    report = validate(entries, manifest)
    if not report.ok:
        problems = [line for line in report.lines() if line.startswith("error")]
        raise DatasetError(
            f"{manifest}: {len(problems)} error(s) (vpipe check --manifest {manifest}): {problems[0]}"
        )
    labels = {e.label for e in entries}
    return f"{manifest}: {len(entries)} videos, {len(labels)} classes" + "".join(
        f"; {line}" for line in report.lines()
    )


def plan_add(
    root: Path,
    name: str,
    manifest: Path,
    *,
    fps: float = 10.0,
    size: str = "112",
    codec: str = "jpeg",
    template: str = "gestures",
    heads: list[str] | tuple[str, ...] = ("lstm", "gru"),
    epochs: int | None = None,
    check: bool = True,
) -> Change:
    """What ``vpipe add-dataset`` writes (nothing is written yet); :class:`DatasetError` if it cannot."""
    root = Path(root)
    params_text, dvc_text, params = _load(root)
    configs = root / "configs"
    heads = list(dict.fromkeys(heads))
    if not NAME.fullmatch(name):
        raise DatasetError(f"dataset name {name!r}: lower-case letters, digits and _ (a letter first)")
    templates = sorted(p.name[len("backbone_") : -5] for p in configs.glob("backbone_*.yaml"))
    if not (configs / f"backbone_{template}.yaml").is_file():
        raise DatasetError(
            f"unknown template {template!r} (no configs/backbone_{template}.yaml; templates: {', '.join(templates)})"
        )
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise DatasetError(f"unknown head(s) {', '.join(unknown) or '(none)'} (heads: {', '.join(HEADS)})")
    experiments = [f"{name}_{h}" for h in heads]
    taken = [
        what
        for what, there in (
            (f"datasets.{name} in params.yaml", name in (params.get("datasets") or {})),
            (f"{name} in features.datasets", name in ((params.get("features") or {}).get("datasets") or [])),
            (f"configs/backbone_{name}.yaml", (configs / f"backbone_{name}.yaml").exists()),
            *((f"experiment {e}", e in (params.get("experiments") or {})) for e in experiments),
            *((f"configs/{e}.yaml", (configs / f"{e}.yaml").exists()) for e in experiments),
        )
        if there
    ]
    if taken:
        raise DatasetError(
            f"dataset {name!r} exists ({', '.join(taken)}): choose another name, or vpipe remove-dataset {name}"
        )
    if not re.fullmatch(r"\d+(x\d+)?", str(size)):
        raise DatasetError(f"--size {size!r}: S or WxH in pixels")
    if check:
        check_manifest(manifest)

    lines = params_text.splitlines(keepends=True)
    at = _features_line(lines)
    match = FEATURES_LIST.match(lines[at].rstrip("\n"))
    listed = match.group(2).strip()
    lines[at] = f"{match.group(1)}{listed + ', ' if listed else ''}{name}{match.group(3)}\n"
    # Inserted from the bottom up, so the earlier block's position holds.
    inserts = sorted(
        [
            (
                _block_end(lines, "datasets"),
                [
                    dataset_line(
                        name,
                        _project_path(manifest.parent, root),
                        _project_path(manifest, root),
                        fps,
                        size,
                        codec,
                    )
                ],
            ),
            (_block_end(lines, "experiments"), experiment_lines(name, heads)),
        ],
        reverse=True,
    )
    for index, new in inserts:
        lines[index:index] = new
    dvc_lines = dvc_text.splitlines(keepends=True)
    if dvc_lines and not dvc_lines[-1].endswith("\n"):
        dvc_lines[-1] += "\n"
    end = _block_end(dvc_lines, "plots")
    dvc_lines[end:end] = [plots_text(name, heads)]

    files: dict[str, str | None] = {"params.yaml": "".join(lines), "dvc.yaml": "".join(dvc_lines)}
    files[f"configs/backbone_{name}.yaml"] = backbone_config(configs, template, name, epochs)
    for head in heads:
        files[f"configs/{name}_{head}.yaml"] = head_config(configs, template, name, head, epochs)
    _check_plan(files, name, template, heads)
    return Change(root, files)


def _check_plan(files: dict[str, str | None], name: str, template: str, heads: list[str]) -> None:
    """The new files parse, and every store path of NAME's configs is NAME's."""
    import yaml

    params = yaml.safe_load(files["params.yaml"])
    if not (
        params["datasets"].get(name)
        and name in params["features"]["datasets"]
        and all(params["experiments"].get(f"{name}_{h}") == f"data/features/{name}" for h in heads)
    ):
        raise DatasetError(f"params.yaml: the entries of {name!r} could not be placed (edit it by hand)")
    yaml.safe_load(files["dvc.yaml"])
    for rel, text in files.items():
        if rel.startswith("configs/"):
            stores = re.findall(r"data/(?:frames|features)/(\w+)", text)
            if not stores or any(s != name for s in stores):
                raise DatasetError(f"{rel}: store paths {stores} do not all point at {name!r}'s stores")
            yaml.safe_load(text)


def plan_remove(root: Path, name: str) -> tuple[Change, list[str]]:
    """What ``vpipe remove-dataset`` changes, and what it leaves behind (the outputs, for ``--purge``)."""
    root = Path(root)
    params_text, dvc_text, params = _load(root)
    if name not in (params.get("datasets") or {}):
        raise DatasetError(f"no dataset {name!r} in params.yaml")
    heads = [
        h
        for h in [
            key[len(name) + 1 :] for key in params.get("experiments") or {} if key.startswith(f"{name}_")
        ]
        if h in HEADS and params["experiments"][f"{name}_{h}"] == f"data/features/{name}"
    ]
    backbone = root / "configs" / f"backbone_{name}.yaml"
    if backbone.is_file() and "(vpipe add-dataset" not in backbone.read_text().split("\n", 1)[0]:
        raise DatasetError(
            f"{name!r} was not added by vpipe add-dataset (see {backbone.name}): edit params.yaml by hand"
        )
    lines = params_text.splitlines(keepends=True)
    end = _block_end(lines, "datasets")
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == "datasets:")
    added = {e.rstrip("\n") for e in experiment_lines(name, heads)}
    kept = [
        line
        for i, line in enumerate(lines)
        if not (start < i < end and line.startswith(f"  {name}: {{")) and line.rstrip("\n") not in added
    ]
    try:
        at = _features_line(kept)
    except DatasetError:
        at = None
    if at is not None:
        match = FEATURES_LIST.match(kept[at].rstrip("\n"))
        items = [i.strip() for i in match.group(2).split(",") if i.strip() and i.strip() != name]
        kept[at] = f"{match.group(1)}{', '.join(items)}{match.group(3)}\n"
    files: dict[str, str | None] = {"params.yaml": "".join(kept)}
    if heads and plots_text(name, heads) in dvc_text:
        files["dvc.yaml"] = dvc_text.replace(plots_text(name, heads), "", 1)
    for rel in [f"configs/backbone_{name}.yaml", *(f"configs/{name}_{h}.yaml" for h in heads)]:
        if (root / rel).exists():
            files[rel] = None
    outputs = [
        f"data/frames/{name}",
        f"data/features/{name}",
        *(
            f"{kind}/{n}"
            for n in [f"backbone_{name}", *(f"{name}_{h}" for h in heads)]
            for kind in ("models", "plots")
        ),
        *(f"metrics/{n}.json" for n in [f"backbone_{name}", *(f"{name}_{h}" for h in heads)]),
    ]
    return Change(root, files), [o for o in outputs if (root / o).exists()]


def purge(root: Path, outputs: list[str]) -> None:
    for rel in outputs:
        path = Path(root) / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
