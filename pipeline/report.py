"""``vpipe report``: one table of every ``metrics/*.json`` (rows: experiments; columns: metrics)."""

from __future__ import annotations

import json
from pathlib import Path


def table(metrics_dir: Path) -> str:
    """A Markdown table of the flat JSON metrics files in ``metrics_dir``."""
    results = {}
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err})") from err
        results[path.stem] = {k: v for k, v in data.items() if isinstance(v, int | float)}
    if not results:
        return f"no metrics in {metrics_dir}/*.json yet"
    columns = sorted({k for row in results.values() for k in row})
    lines = ["| experiment | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" if c in row else "" for c in columns) + " |")
    return "\n".join(lines)


def report(metrics_dir: str = "metrics", out: str | None = "metrics/summary.md") -> str:
    text = table(Path(metrics_dir))
    if out and not text.startswith("no metrics"):
        Path(out).write_text(text + "\n")
    return text
