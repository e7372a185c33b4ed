"""``vpipe report``: tables of every ``metrics/*.json`` (rows: experiments; columns: metrics), one per kind
of experiment (classification, captioning, traffic flows, forecasting, backbones), each with its own metrics.

Each file is the flat JSON of one experiment's test metrics (``metrics/NAME.json``, written by
``vpipe fit``). Columns are the union of the metric names: classification metrics first
(``test/acc``, ``test/acc_top5``, ``test/f1``, ``test/loss``), the others in name order; an
experiment without a metric leaves its cell empty (a forecaster has no accuracy). The best value of
each column shared by several experiments evaluated on the same data (the same baseline values) is
in bold: lowest for losses and errors, highest otherwise; baselines (``test/copy_last/...``, ``test/historical_average/...``, captioning's
``test/nn_mean/...`` and ``test/nn_seq/...``,
the same for every model on the same data) are never bold. Per-step forecasting metrics (``test/h01/mse``, ...) are left out unless ``--all`` (they are
also in ``plots/NAME/horizons.csv``). ``--columns`` keeps only the metrics matching shell patterns
(e.g. ``'test/acc*'``; ``--all --columns 'test/h*/mse'`` for the per-step MSE).
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

FIRST = ("test/acc", "test/acc_top5", "test/f1", "test/loss")
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "error", "nll", "perplexity")
PER_STEP = re.compile(r"/h\d+/")  # test/h01/mse, test/copy_last/h10/ssim
BASELINES = (
    "/copy_last/",
    "/historical_average/",
    "/nn_mean/",
    "/nn_seq/",
)  # the same for every model on the same data


def read(metrics_dir: Path) -> dict[str, dict[str, float]]:
    """``{experiment: {metric: value}}`` from ``metrics_dir/*.json``; numbers only."""
    results = {}
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise SystemExit(
                f"{path}: expected a JSON object of metric names to numbers, got {type(data).__name__}"
            )
        results[path.stem] = {
            k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return results


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1].lower()
    return any(word in name for word in LOWER_IS_BETTER)


# An experiment's table: the first of these metrics it has names its kind (one table per kind).
KINDS = (
    ("test/acc", "Classification"),
    ("test/cider", "Captioning"),
    ("test/rmse", "Traffic-flow forecasting (flows)"),
    ("test/mse", "Forecasting"),
    ("val/acc", "Backbones (val)"),
)


def kind(row: dict[str, float]) -> str:
    return next((title for marker, title in KINDS if marker in row), "Other")


def table(
    metrics_dir: Path,
    columns: list[str] | None = None,
    every: bool = False,
    spread: dict[tuple[str, str], float] | None = None,
) -> str:
    """Markdown tables of the flat JSON metrics files in ``metrics_dir``, one per kind of experiment
    (:data:`KINDS`), each with the metrics its experiments have: every metric but the per-step ones
    (those too with ``every``), only those matching ``columns`` if given. A best is in bold only when it
    beats the runner-up by more than the larger of their seed spreads (``spread``:
    ``{(experiment, metric): sd}``, from :func:`seed_spread`; 0 where unknown; :func:`best_beyond_spread`)."""
    results = read(Path(metrics_dir))
    if not results:
        return f"no metrics in {metrics_dir}/*.json yet"
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for name, row in results.items():
        groups.setdefault(kind(row), {})[name] = row
    order = [title for _, title in KINDS] + ["Other"]
    tables = [_table(groups[title], columns, every, spread) for title in order if title in groups]
    titled = [(title, t) for title, t in zip([t for t in order if t in groups], tables, strict=True) if t]
    if len(titled) == 1:
        return titled[0][1]
    return "\n\n".join(f"{title}:\n\n{t}" for title, t in titled)


def _table(
    results: dict[str, dict[str, float]],
    columns: list[str] | None,
    every: bool,
    spread: dict[tuple[str, str], float] | None = None,
) -> str:
    names = {k for row in results.values() for k in row}
    if not every:
        names = {k for k in names if not PER_STEP.search(k)}
    if columns:
        names = {k for k in names if any(fnmatch.fnmatchcase(k, pattern) for pattern in columns)}
    if not names:
        return ""
    ordered = [c for c in FIRST if c in names] + sorted(names - set(FIRST))

    def same_data(row: dict) -> tuple:
        # Experiments evaluated on the same windows share their baselines' values: only those compare.
        return tuple(sorted((k, round(v, 6)) for k, v in row.items() if any(b in k for b in BASELINES)))

    best: dict[tuple[str, tuple], float] = {}
    for c in ordered:
        if any(b in c for b in BASELINES):
            continue
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for name, row in results.items():
            if c in row:
                groups.setdefault(same_data(row), []).append((row[c], (spread or {}).get((name, c), 0.0)))
        for key, values in groups.items():
            winner = best_beyond_spread(values, lower_is_better(c))
            if winner is not None:
                best[c, key] = winner

    def cell(row: dict, c: str) -> str:
        if c not in row:
            return ""
        text = f"{row[c]:.4f}"
        return f"**{text}**" if best.get((c, same_data(row))) == row[c] else text

    lines = ["| experiment | " + " | ".join(ordered) + " |", "|---" * (len(ordered) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(row, c) for c in ordered) + " |")
    return "\n".join(lines)


def durations(names: list[str]) -> str:
    """A Markdown table of how long the newest MLflow run of each experiment in ``names`` took
    (``vpipe fit``: from the logger's start to the end of the test, process start-up not included);
    empty when the store has none of them."""
    from pipeline.tracking import runs as tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return ""  # no store yet: nothing to read, and nothing to create
    import mlflow

    client = mlflow.MlflowClient(uri)
    rows = []
    for name in names:
        experiment = client.get_experiment_by_name(name)
        runs = (
            client.search_runs(
                [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
            )
            if experiment
            else []
        )
        if runs and runs[0].info.end_time:
            info = runs[0].info
            rows.append(
                f"| {name} | {info.run_name} | {info.status} | {(info.end_time - info.start_time) / 1000:.1f} |"
            )
    if not rows:
        return ""
    return "\n".join(["| experiment | newest run | status | seconds |", "|---|---|---|---:|", *rows])


def best_beyond_spread(values: list[tuple[float, float]], lower: bool) -> float | None:
    """The best of ``(value, sd)`` pairs (the lowest with ``lower``) when it beats the runner-up by more
    than the larger of their two sds; None when there is no runner-up or it is within the spread."""
    if len(values) < 2:
        return None
    first, second = sorted(values, reverse=not lower)[:2]
    return first[0] if abs(first[0] - second[0]) > max(first[1], second[1]) else None


def _mean_sd(metric: dict) -> str:
    return f"{metric['mean']:.4f} ± {metric['sd']:.4f}"


def seeds_table(path: Path) -> str:
    """Markdown tables of ``bench/results/seeds.json`` (``bench/seeds.py``): each experiment's headline
    metrics as mean ± sd over seeds, one table per kind and training data. A mean is in bold only when
    it beats the next of its table by more than the larger of their two sds
    (:func:`best_beyond_spread`): a best within the seed spread is not a best."""
    return _seeds_tables(json.loads(Path(path).read_text()))


def _seeds_tables(record: dict) -> str:
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for name, result in record["results"].items():
        groups.setdefault((kind(result["metrics"]), result.get("data", "")), {})[name] = result
    out = []
    for (title, data), results in groups.items():
        columns = list(dict.fromkeys(k for r in results.values() for k in r["metrics"]))
        best = {
            c: best_beyond_spread(
                [
                    (r["metrics"][c]["mean"], r["metrics"][c]["sd"])
                    for r in results.values()
                    if c in r["metrics"]
                ],
                lower_is_better(c),
            )
            for c in columns
            if not any(b in c for b in BASELINES)
        }
        seeds = sorted({len(r["seeds"]) for r in results.values()})
        lines = [
            f"{title}, {data or 'its data'} (mean ± sd over {'/'.join(map(str, seeds))} seeds):",
            "",
            "| experiment | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for name, result in results.items():
            cells = []
            for c in columns:
                metric = result["metrics"].get(c)
                text = _mean_sd(metric) if metric else ""
                cells.append(f"**{text}**" if metric and best.get(c) == metric["mean"] else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def seed_spread(record: dict) -> dict[tuple[str, str], float]:
    """``{(experiment, metric): sd over seeds}`` of a ``bench/results/seeds.json`` record."""
    return {(name, k): m["sd"] for name, r in record["results"].items() for k, m in r["metrics"].items()}


def report(
    metrics_dir: str = "metrics",
    out: str | None = "reports/summary.md",
    columns: list[str] | None = None,
    every: bool = False,
    timings: bool = True,
    seeds: str | None = "bench/results/seeds.json",
) -> str:
    """Print-ready tables: the quality over seeds (``seeds``, from ``bench/seeds.py``, when it exists),
    this run's metrics, then (``timings``) each experiment's newest run duration from MLflow; also
    written to ``out`` (Markdown) when there are metrics."""
    record = json.loads(Path(seeds).read_text()) if seeds and Path(seeds).is_file() else None
    text = table(Path(metrics_dir), columns, every, seed_spread(record) if record else None)
    if record and not text.startswith("no metrics"):
        text = (
            f"Quality over seeds ({seeds}):\n\n{_seeds_tables(record)}\n\n"
            f"This run (one seed; metrics/):\n\n{text}"
        )
    if timings and not text.startswith("no metrics"):
        took = durations(sorted(read(Path(metrics_dir))))
        if took:
            text += "\n\nRun durations (MLflow):\n\n" + took
    if out and not text.startswith("no metrics"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text
