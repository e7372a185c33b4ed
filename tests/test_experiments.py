"""`dvc exp run` in a temporary copy of the repository: `-S` on a training config and on params.yaml,
in the workspace and queued (temporary directories), each experiment one MLflow run named and tagged
after it, in the repository's store."""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_e2e import copy_repository, run
from test_training import feature_store

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = "configs/gesture_gru.yaml:model.init_args.head.init_args.hidden_size"


@pytest.mark.slow
def test_dvc_experiments_land_in_mlflow(tmp_path):
    repo = tmp_path / "repo"
    copy_repository(repo)
    # Only train@gesture_gru, over a tiny feature store put where the config reads it; one short epoch.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["experiments"] = {"gesture_gru": "data/features/gestures"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {"train": dvc_yaml["stages"]["train"]}
    dvc_yaml.pop("plots", None)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    config = yaml.safe_load(
        (repo / "tests/configs/gru_features.yaml").read_text()
    )  # features, whatever configs/ say
    config["trainer"].update(max_epochs=1)
    (repo / "configs/gesture_gru.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    feature_store(repo / "data/features/gestures")

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VPIPE_ROOT", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "tiny"], repo, env)
    run(["dvc", "repro"], repo, env)  # the baseline
    run(["git", "add", "dvc.lock"], repo, env)
    run([*git, "commit", "-qm", "baseline"], repo, env)

    # In the workspace: a training-config key. DVC leaves the change in the workspace: restore it.
    run(["dvc", "exp", "run", "-n", "narrow", "-S", f"{HIDDEN}=8"], repo, env)
    run(["git", "checkout", "--", "configs/gesture_gru.yaml", "dvc.lock"], repo, env)
    # Queued: a sweep over a config key plus a params.yaml key (`seed`: set, though no stage of this
    # cut-down pipeline reads it), each run in a temporary copy of the repository (the store copied
    # in: here it is no DVC output; after `dvc repro` it would come from the DVC cache).
    run(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-C",
            "data/features/gestures",
            "-S",
            f"{HIDDEN}=12,24",
            "-S",
            "seed=3",
        ],
        repo,
        env,
    )
    run(["dvc", "exp", "run", "--run-all", "-j", "1"], repo, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for revision in exp["revs"]:
                data = revision["data"]
                hidden = data["params"]["configs/gesture_gru.yaml"]["data"]["model"]["init_args"]["head"][
                    "init_args"
                ]["hidden_size"]
                seed = data["params"]["params.yaml"]["data"]["seed"]
                assert seed == (0 if exp["name"] == "narrow" else 3), exp["name"]
                experiments[exp["name"]] = (
                    hidden,
                    data["metrics"]["metrics/gesture_gru.json"]["data"]["test/acc"],
                )
    assert experiments["narrow"][0] == 8 and sorted(hidden for hidden, _ in experiments.values()) == [
        8,
        12,
        24,
    ]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gesture_gru")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"gesture_gru-fit", *experiments}  # the baseline and one run per DVC experiment
    for name, (hidden, test_acc) in experiments.items():
        mlflow_run = runs[name]
        assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["dvc_exp_name"] == name
        assert mlflow_run.data.tags["dvc_stage"] == "train@gesture_gru"
        assert mlflow_run.data.params["model/head/hidden_size"] == str(hidden)
        assert mlflow_run.data.metrics["test/acc"] == pytest.approx(test_acc, abs=1e-6)
        assert mlflow_run.data.tags["data.features"] == "data/features/gestures"
    # Every run's artifacts are in the repository's folder, also those trained in temporary copies.
    for mlflow_run in runs.values():
        assert mlflow_run.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
    assert len(client.search_model_versions("name='gesture_gru'")) == 4
    assert not list((repo / ".dvc" / "tmp").glob("exps/**/mlflow.db"))
    shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)


def test_dvc_yaml_names_exactly_the_experiments_of_params_yaml():
    """params.yaml is the experiment list; the report stage's inputs and the plots in dvc.yaml follow it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    names = {
        *params["experiments"],
        *params["captioning"],
        *(f"backbone_{d}" for d in params["features"]["datasets"]),
    }
    assert all((ROOT / "configs" / f"{name}.yaml").is_file() for name in names)
    # The report stage depends on the folder every training stage writes its metrics file into: an
    # experiment added to params.yaml is reported with no edit of dvc.yaml (and none is listed by name).
    report = dvc_yaml["stages"]["report"]
    assert "metrics" in report["deps"] and not [d for d in report["deps"] if d.startswith("metrics/")]
    assert not any(
        Path(str(next(iter(o)) if isinstance(o, dict) else o)).parts[0] == "metrics" for o in report["outs"]
    )
    for stage in ("backbone", "train", "caption"):  # the stages that write each name's metrics file
        [metrics] = dvc_yaml["stages"][stage]["do"]["metrics"]
        assert Path(next(iter(metrics))).parent == Path("metrics"), stage
    plotted = set()
    for entry in dvc_yaml["plots"]:
        for key, spec in entry.items() if isinstance(entry, dict) else [(entry, None)]:
            files = list(spec["y"]) if isinstance(spec, dict) and isinstance(spec.get("y"), dict) else [key]
            plotted |= {Path(f).parts[1] for f in files if str(f).startswith("plots/")}
    assert plotted and plotted <= names, plotted - names


# The command line, model registration and the phase clock of bench/repro.py: they start a stage,
# register its model and time it, but what the stage writes does not depend on them (a change to them
# re-runs nothing).
NOT_STAGE_CODE = {
    "pipeline.cli",
    "pipeline.commands",
    "pipeline.inference.serving",
    "pipeline.inference.checkpoints",
    "pipeline.inference.classify",
    "pipeline.inference.runner",
    "pipeline.ui",
    "pipeline.tracking.timings",
}
ENTRY = {
    "vpipe fit": "pipeline.train",
    "vpipe report": "pipeline.report",
    "vpipe grids": "pipeline.storage.grids",
    "vpipe extract": "pipeline.stages.extract",
    "vpipe features": "pipeline.stages.features",
}


def project_imports(module: str) -> set[str]:
    """The project modules ``module`` imports, at the top or inside a function."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pipeline", "data_scripts"):
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("pipeline.", "data_scripts.")
        ):  # a module, or a package and modules of it
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(("pipeline.", "data_scripts."))}
    return {m for m in found if (ROOT / (m.replace(".", "/") + ".py")).is_file()}


def code_of(entries: set[str], skip: set[str]) -> set[str]:
    """The files of ``entries`` and of every project module they import, transitively, less ``skip``."""
    seen, todo = set(), list(entries)
    while todo:
        module = todo.pop()
        if module not in seen and module not in NOT_STAGE_CODE and module not in skip:
            seen.add(module)
            todo += project_imports(module)
    return {m.replace(".", "/") + ".py" for m in seen}


def stage_instances(dvc_yaml: dict, params: dict):
    """``(name, cmd, deps, configs)`` of every stage, ``foreach`` expanded as DVC does."""
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" not in stage:
            yield name, stage["cmd"], stage["deps"], []
            continue
        items = params
        for part in stage["foreach"].strip("${}").split("."):
            items = items[part]
        for key, item in items.items() if isinstance(items, dict) else ((i, i) for i in items):

            def expand(text: str, key=key, item=item) -> str:
                text = text.replace("${key}", str(key)).replace("${item}", str(item))
                for field, value in item.items() if isinstance(item, dict) else []:
                    text = text.replace(f"${{item.{field}}}", str(value))
                return text

            cmd = " ".join(expand(stage["do"]["cmd"]).split())
            deps = [expand(d) for d in stage["do"]["deps"]]
            yield f"{name}@{key}", cmd, deps, [c for c in cmd.split() if c.startswith("configs/")]


def class_modules(config: Path) -> set[str]:
    """The project modules a training config names (``class_path``), at any depth."""
    found, todo = set(), [yaml.safe_load(config.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            path = node.get("class_path", "")
            if isinstance(path, str) and path.startswith("pipeline."):
                found.add(path.rpartition(".")[0])
            todo += node.values()
        elif isinstance(node, list):
            todo += node
    return found


def test_every_stage_depends_on_exactly_the_code_it_runs():
    """Each stage's ``pipeline/`` and ``data_scripts/`` deps are the modules its command runs (its entry
    module, the classes its config names, and all they import): a change to one re-runs the stages
    whose outputs it can change, and no other (a ``foreach`` stage's list serves all its instances)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    generators = {f"data_scripts.{name}" for name in params["synthetic"]}
    missing, used = {}, {}
    for name, cmd, deps, configs in stage_instances(dvc_yaml, params):
        words = cmd.split()
        # Stage commands run through the project's launchers (bin/python, bin/vpipe: no PATH needed).
        assert words[0] in ("bin/python", "bin/vpipe"), f"{name}: {cmd}"
        words[0] = words[0].removeprefix("bin/")
        if words[:2] == ["python", "-m"]:
            entries = {words[2]} | (
                {f"data_scripts.{words[3]}"} if words[2] == "data_scripts.synth" else set()
            )
        else:
            entries = {ENTRY[" ".join(words[:2])]}
        for config in configs:
            entries |= class_modules(ROOT / config)
        expected = code_of(entries, skip=generators - entries)
        listed = {d for d in deps if d.startswith(("pipeline/", "data_scripts/"))}
        stage = name.partition("@")[0]
        used.setdefault(stage, (listed, set()))[1].update(expected)
        if expected - listed:
            missing[name] = sorted(expected - listed)
    needless = {
        stage: sorted(listed - expected) for stage, (listed, expected) in used.items() if listed - expected
    }
    assert not missing and not needless, f"missing: {missing}; needless: {needless}"
    assert len(used) == len(dvc_yaml["stages"])
