"""`vpipe report` with the seed spread of bench/seeds.py: mean ± sd tables, bold only beyond the spread."""

import json

from pipeline.report import report, seeds_table, table


def _seeds(path, results):
    path.write_text(json.dumps({"command": "python bench/seeds.py", "results": results}))
    return path


def _result(data, metrics):
    return {
        "data": data,
        "seeds": [0, 1, 2],
        "metrics": {
            k: {"mean": sum(v) / 3, "sd": (sum((x - sum(v) / 3) ** 2 for x in v) / 2) ** 0.5, "values": v}
            for k, v in metrics.items()
        },
    }


def test_seeds_table_groups_by_data_and_bolds_only_a_best_beyond_the_spread(tmp_path):
    path = _seeds(
        tmp_path / "seeds.json",
        {
            "gru": _result("data/features/gestures", {"test/acc": [0.95, 0.96, 0.97]}),
            "lstm": _result("data/features/gestures", {"test/acc": [0.94, 0.96, 0.98]}),  # within the spread
            "meanpool": _result("data/features/gestures", {"test/acc": [0.55, 0.56, 0.57]}),
            "action_lstm": _result("data/features/actions", {"test/acc": [0.97, 0.98, 0.99]}),
        },
    )
    text = seeds_table(path)
    _, gestures, actions = text.split("Classification, ")
    assert gestures.startswith("data/features/gestures (mean ± sd over 3 seeds):")
    assert "| gru | 0.9600 ± 0.0100 |" in gestures and "| lstm | 0.9600 ± 0.0200 |" in gestures
    assert "**" not in gestures  # gru and lstm tie within their spread: no best
    assert "| action_lstm | 0.9800 ± 0.0100 |" in actions  # alone in its table: nothing to beat

    path = _seeds(
        tmp_path / "seeds.json",
        {
            "gru": _result("f", {"test/acc": [0.95, 0.96, 0.97]}),
            "meanpool": _result("f", {"test/acc": [0.55, 0.56, 0.57]}),
        },
    )
    assert "| gru | **0.9600 ± 0.0100** |" in seeds_table(path)


def test_report_puts_the_seeds_first_and_bolds_this_runs_best_only_beyond_the_spread(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "gru.json").write_text(json.dumps({"test/acc": 0.97}))
    (metrics / "lstm.json").write_text(json.dumps({"test/acc": 0.96}))
    assert "**0.9700**" in table(metrics)  # no spread known: the higher one
    seeds = _seeds(
        tmp_path / "seeds.json",
        {
            "gru": _result("f", {"test/acc": [0.95, 0.96, 0.97]}),
            "lstm": _result("f", {"test/acc": [0.94, 0.96, 0.98]}),
        },
    )
    text = report(str(metrics), str(tmp_path / "summary.md"), timings=False, seeds=str(seeds))
    assert text.startswith(f"Quality over seeds ({seeds}):")
    assert "This run (one seed; metrics/):" in text and "| gru | 0.9700 |" in text
    assert "**" not in text  # 0.01 apart, spread 0.02: neither is bold
    assert (tmp_path / "summary.md").read_text() == text + "\n"
    without = report(str(metrics), None, timings=False, seeds=str(tmp_path / "none.json"))
    assert not without.startswith("Quality over seeds") and "**0.9700**" in without
