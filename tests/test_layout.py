"""The package layout: subpackages along the data flow, imports one way, and the old import paths."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
FIXTURES = Path(__file__).parent / "fixtures" / "before_layout"

# The subpackages in data-flow order: each imports only from those before it (and itself). The
# top-level modules (the commands) import from any; no subpackage imports a top-level module.
LAYERS = ["media", "storage", "datasets", "models", "systems", "tracking", "stages", "inference"]
# The base modules, below every layer: any module may import them, and they import nothing of the package
# (the old import paths; the adapter of what Lightning and MLflow do not publish).
BASE = {"pipeline.aliases", "pipeline.compat"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``pipeline.media.video``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def layer(module: str) -> str:
    """``media`` … ``inference`` for a subpackage's module, ``base`` for :data:`BASE`, ``top`` for the
    package's other modules."""
    if module in BASE:
        return "base"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "top"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_the_folder_list_is_the_data_flow():
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS)
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == [
        "__init__",
        "__main__",
        "add_dataset",
        "aliases",
        "cli",
        "commands",
        "compat",
        "mlflow_app",
        "options",
        "report",
    ] + [
        "train",
        "ui",
    ]
    for name in LAYERS:  # each subpackage says what it owns
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), name


def test_imports_flow_one_way_between_subpackages():
    rank = {"base": -1} | {name: i for i, name in enumerate(LAYERS)} | {"top": len(LAYERS)}
    backwards = []
    for module, targets in graph().items():
        for target in targets:
            if target == "pipeline":  # the package itself: its docstring and the alias finder
                continue
            if rank[layer(target)] > rank[layer(module)]:
                backwards.append(f"{module} -> {target}")
    assert not backwards, backwards


def test_the_base_modules_import_nothing_of_the_package():
    edges = graph()
    assert BASE <= set(edges)
    assert {name: sorted(edges[name]) for name in BASE} == {name: [] for name in BASE}
    assert layer("pipeline.compat") == "base" and layer("pipeline.cli") == "top"


def test_the_module_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            assert (cycle := visit(node)) is None, " -> ".join(cycle)


def test_the_graph_checks_would_see_a_backward_import(tmp_path):
    """The checks read real imports: a module of ``media`` that imported ``systems`` would be caught."""
    fake = tmp_path / "pipeline" / "media"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('"""x"""\n')
    (fake / "bad.py").write_text("def f():\n    from pipeline.systems import classifier\n")
    known = {"pipeline.media.bad": fake / "bad.py", "pipeline.systems.classifier": Path("x")}
    assert imports(fake / "bad.py", known) == {"pipeline.systems.classifier"}
    assert layer("pipeline.media.bad") == "media" and layer("pipeline.systems.classifier") == "systems"


INFLECTIONS = ("s", "es", "ing", "er", "ers", "ed", "ion", "ions", "ation", "ication", "ications")


def inflected(a: str, b: str) -> bool:
    """Whether ``b`` is the word ``a`` with an inflection: ``forecast``/``forecasting``,
    ``classify``/``classification``, ``caption``/``captions``."""
    return any(b == root + suffix for root in {a, a.rstrip("ey")} for suffix in INFLECTIONS)


def test_no_two_module_names_differ_by_a_suffix():
    """A word and its inflection in two modules (the package tells the layer; the name tells the thing)."""
    stems = sorted({path.stem for path in PACKAGE.rglob("*.py") if not path.stem.startswith("__")})
    assert inflected("forecast", "forecasting") and inflected("classify", "classification")
    assert not inflected("cli", "clips")
    clashes = [(a, b) for a in stems for b in stems if a != b and inflected(a, b)]
    assert not clashes, clashes


def test_old_import_paths_are_the_new_modules():
    from pipeline.aliases import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"pipeline.{old}") is importlib.import_module(f"pipeline.{new}"), old
    # The classes the configs named before the move, by their old paths.
    old_class_paths = [
        "pipeline.caption_data.CaptionDataModule",
        "pipeline.captioning.Captioner",
        "pipeline.classification.Classifier",
        "pipeline.conv_forecasting.FrameForecaster",
        "pipeline.conv_forecasting.GridForecaster",
        "pipeline.data.FeatureDataModule",
        "pipeline.data.FrameDataModule",
        "pipeline.forecasting.FeatureForecaster",
        "pipeline.grid_data.GridDataModule",
        "pipeline.heads.GRUHead",
        "pipeline.heads.LSTMHead",
        "pipeline.heads.MeanPoolHead",
        "pipeline.heads.RNNHead",
        "pipeline.heads.RowLSTMHead",
        "pipeline.heads.TransformerHead",
        "pipeline.sequences.SequenceDataModule",
        "pipeline.serving.VideoModel",
    ]
    for path in old_class_paths:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert cls.__module__.count(".") == 2 and cls.__module__.split(".")[1] in LAYERS, path
    # A name that never was a module is still an ImportError.
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pipeline.no_such_module")


def test_configs_name_classes_by_their_new_paths():
    found = set()
    for config in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("tests/configs/*.yaml")]:
        found |= set(re.findall(r"class_path:\s*(pipeline\.[\w.]+)", config.read_text()))
    assert found
    for path in found:
        module, _, name = path.rpartition(".")
        assert module.split(".")[1] in LAYERS, path  # not an old flat path
        assert hasattr(importlib.import_module(module), name), path


def test_a_checkpoint_written_before_the_move_classifies_as_it_did(tmp_path, capsys):
    """``classifier.ckpt`` was written by ``vpipe fit`` with the flat layout (its recipe names
    ``pipeline.classification.Classifier`` and ``pipeline.heads.GRUHead``); ``expected.json`` is what
    ``vpipe classify`` printed for ``right5.mp4`` then."""
    import torch

    from pipeline.cli import main

    recipe = torch.load(FIXTURES / "classifier.ckpt", map_location="cpu", weights_only=True)["vpipe"]
    assert recipe["model"]["class_path"] == "pipeline.classification.Classifier"
    expected = json.loads((FIXTURES / "expected.json").read_text())
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "classify",
                str(FIXTURES / "right5.mp4"),
                "--ckpt",
                str(FIXTURES / "classifier.ckpt"),
                "--topk",
                "2",
                "--json",
            ]
        )
    assert exit_.value.code in (0, None)
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["label"] for t in got["top"]] == [t["label"] for t in expected["top"]]
    assert [t["probability"] for t in got["top"]] == pytest.approx(
        [t["probability"] for t in expected["top"]], abs=1e-5
    )


def test_a_model_registered_before_the_move_loads_and_predicts(tmp_path):
    """The registered version's ``python_model.pkl`` pickles ``pipeline.serving.VideoModel`` by its old path."""
    import mlflow.pyfunc
    import pandas as pd

    model_dir = tmp_path / "registered"
    shutil.copytree(FIXTURES / "registered", model_dir)
    (model_dir / "artifacts").mkdir(exist_ok=True)
    shutil.copy(FIXTURES / "classifier.ckpt", model_dir / "artifacts" / "best.ckpt")
    assert b"pipeline.serving" in (model_dir / "python_model.pkl").read_bytes()
    model = mlflow.pyfunc.load_model(str(model_dir))
    out = model.predict(pd.DataFrame([{"video": str(FIXTURES / "right5.mp4")}]), params={"top_k": 2})
    expected = json.loads((FIXTURES / "expected.json").read_text())
    assert out["label"][0] == expected["top"][0]["label"]
    assert out["probability"][0] == pytest.approx(expected["top"][0]["probability"], abs=1e-5)
    assert type(model.unwrap_python_model()).__module__ == "pipeline.inference.serving"
    assert "pipeline.serving" in sys.modules
