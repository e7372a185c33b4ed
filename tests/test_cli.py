import re
import subprocess
import sys

import pytest

from pipeline.cli import main


def test_help_lists_every_command_and_the_extract_options_without_importing_torch():
    """`vpipe --help` names every subcommand in its COMMAND list (not merely somewhere in the text: the
    description alone says extract, features, train and report), `vpipe extract --help` lists its own
    options, and neither imports torch."""
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        "for args in (['--help'], ['extract', '--help']):\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        "    print('=' * 20)\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    top, extract, imported = done.stdout.split("=" * 20 + "\n")
    listing = top.split("\n  COMMAND\n")[1].split("\noptions:")[0]
    assert re.findall(r"^    (\S+)", listing, re.M) == [
        "extract",
        "merge",
        "check",
        "add-dataset",
        "remove-dataset",
        "features",
        "grids",
        "fit",
        "validate",
        "test",
        "predict",
        "report",
        "ui",
        "classify",
        "caption",
        "forecast",
    ]
    assert extract.startswith("usage: vpipe extract ")
    assert set(re.findall(r"^  (--[\w-]+)", extract, re.M)) == {
        "--manifest",
        "--out",
        "--fps",
        "--size",
        "--max-frames",
        "--workers",
        "--on-error",
        "--timeout",
        "--shard-mb",
        "--part",
        "--codec",
        "--quality",
        "--image-fps",
        "--root",
    }
    assert imported.strip() == "False"


def test_extract_error_exits_nonzero_naming_the_manifest(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["extract", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")])
    assert "nope.csv: manifest not found" in str(err.value)


def test_report_table(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"test/acc": 0.5, "test/loss": 1.25}')
    (tmp_path / "b.json").write_text('{"test/acc": 0.75}')
    main(["report", "--metrics", str(tmp_path), "--out", str(tmp_path / "summary.md")])
    out = capsys.readouterr().out
    assert (
        "| a | 0.5000 | 1.2500 |" in out and "| b | **0.7500** |  |" in out
    )  # the best of a shared column in bold
    assert (tmp_path / "summary.md").read_text().strip() == out.strip()


def test_report_orders_columns_marks_the_best_and_filters(tmp_path, capsys):
    (tmp_path / "gru.json").write_text('{"test/loss": 0.4, "test/f1": 0.8, "test/acc": 0.9, "epoch": 3}')
    (tmp_path / "meanpool.json").write_text('{"test/loss": 0.9, "test/f1": 0.5, "test/acc": 0.6}')
    (tmp_path / "forecast.json").write_text('{"test/mse": 0.01, "test/mse_t1": 0.002, "test/ssim": 0.7}')
    main(["report", "--metrics", str(tmp_path), "--out", "", "--seeds", ""])  # this run's tables only
    out = capsys.readouterr().out.splitlines()
    # One table per kind of experiment, each with its own columns.
    assert out[0] == "Classification:" and out.index("Forecasting:") > out.index("Classification:")
    header, _, *rows = out[2:6]
    assert header == "| experiment | test/acc | test/f1 | test/loss | epoch |"
    assert rows[0] == "| gru | **0.9000** | **0.8000** | **0.4000** | 3.0000 |"  # loss: lowest is best
    forecast = out[out.index("Forecasting:") + 2 :]
    assert forecast[0] == "| experiment | test/mse | test/mse_t1 | test/ssim |"
    assert forecast[2] == "| forecast | 0.0100 | 0.0020 | 0.7000 |"  # nothing to compare: no bold
    main(
        [
            "report",
            "--metrics",
            str(tmp_path),
            "--out",
            "",
            "--seeds",
            "",
            "--columns",
            "test/acc",
            "test/mse*",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| experiment | test/acc |" and "| experiment | test/mse | test/mse_t1 |" in out
    (tmp_path / "forecast2.json").write_text(
        '{"test/mse": 0.02, "test/h01/mse": 0.001, "test/copy_last/mse": 0.05}'
    )
    (tmp_path / "forecast.json").write_text(
        '{"test/mse": 0.01, "test/h01/mse": 0.002, "test/copy_last/mse": 0.05}'
    )
    main(["report", "--metrics", str(tmp_path), "--out", "", "--seeds", "", "--columns", "test/*mse"])
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert header == "| experiment | test/copy_last/mse | test/mse |"  # per-step columns left out by default
    assert rows[0] == "| forecast | 0.0500 | **0.0100** |"  # a baseline is never the best
    main(["report", "--metrics", str(tmp_path), "--out", "", "--seeds", "", "--all"])
    assert "| test/copy_last/mse | test/h01/mse | test/mse |" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="broken.json: expected a JSON object"):
        main(["report", "--metrics", str(tmp_path), "--out", ""])


# Each option that mirrors a parameter of the function its command calls: (command, function, renames
# {option dest: parameter}); every other option whose dest is a parameter's name mirrors that parameter.
MIRRORS = [
    ("extract", "pipeline.stages.extract:extract", {}),
    ("merge", "pipeline.stages.parts:merge", {}),
    ("check", "pipeline.media.manifest:validate", {}),
    ("add-dataset", "pipeline.add_dataset:plan_add", {}),
    ("features", "pipeline.stages.features:compute", {"backbone": "name"}),
    ("features", "pipeline.stages.video_features:compute_from_videos", {"backbone": "name"}),
    ("grids", "pipeline.storage.grids:import_grids", {}),
    ("report", "pipeline.report:report", {"metrics": "metrics_dir", "all": "every"}),
    ("ui", "pipeline.ui:serve", {}),
    ("classify", "pipeline.inference.classify:run", {"json": "as_json", "model": "model_uri"}),
    ("caption", "pipeline.inference.describe:run", {"json": "as_json", "model": "model_uri"}),
    ("forecast", "pipeline.inference.rollout:forecast", {}),
]
# Options given as text where the function takes another type.
AS_TEXT = {"devices": str, "channels": ",".join, "heads": ",".join}


@pytest.mark.parametrize("command,function,renames", MIRRORS, ids=[f"{c}-{f}" for c, f, _ in MIRRORS])
def test_each_option_defaults_to_its_function_parameters_default(command, function, renames):
    """One source per default: `vpipe COMMAND`'s option and the library function's parameter agree, so a
    library caller gets what the command line gets (e.g. extract's 600 s decoder timeout)."""
    import argparse
    import importlib
    import inspect

    from pipeline.options import build_parser as _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    options = sub.choices[command]
    options.format_help()  # the defaults read from the signatures
    module, _, name = function.partition(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    pairs = {
        action.dest: (action.default, parameters[renames.get(action.dest, action.dest)].default)
        for action in options._actions
        if renames.get(action.dest, action.dest) in parameters
        and parameters[renames.get(action.dest, action.dest)].default is not inspect.Parameter.empty
    }
    assert pairs, f"vpipe {command} mirrors no parameter of {function}"
    drift = {
        dest: (cli, AS_TEXT.get(dest, lambda v: v)(default))
        for dest, (cli, default) in pairs.items()
        if cli != AS_TEXT.get(dest, lambda v: v)(default)
    }
    assert not drift, f"vpipe {command} option defaults differ from {function}'s: {drift}"
