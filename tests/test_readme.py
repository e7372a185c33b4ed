"""The docs' figures come from committed results: their results tables are what the code prints."""

import json
from pathlib import Path

from pipeline.report import seeds_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "docs" / "results.md").read_text()


def test_the_results_table_is_the_committed_seeds_run():
    table = seeds_table(ROOT / "bench" / "results" / "seeds.json")
    assert table in README, "README's results: paste `vpipe report`'s seeds tables (bench/results/seeds.json)"


def test_the_stage_times_are_the_committed_repro_run():
    repro = json.loads((ROOT / "bench" / "results" / "repro.json").read_text())
    assert f"| **dvc repro** | **{repro['total_s']:.1f}** |" in RESULTS, (
        "docs/results.md: bench/repro.py's table"
    )
    for stage in repro["stages"]:
        assert f"| {stage['stage']} | {stage['seconds']:.1f} |" in RESULTS, stage["stage"]
