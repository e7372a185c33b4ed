"""Where `dvc repro` spends its time: each stage's wall time against its limit, in one run, split into
what the stage's `vpipe` process paid beyond its own work.

    python bench/repro.py                 # dvc repro in this checkout (only what changed runs)
    python bench/repro.py --force         # every stage (dvc repro --force)
    python bench/repro.py --force train@gesture_gru   # given targets only

Streams `dvc repro`, stamps each "Running stage 'X'" line, and prints one row per stage that ran:
seconds (from its start to the next stage's start, or to the end), and the limit it is held to — the
whole repro within 15 minutes on a 2-core machine, each stage over cached features within 60 s.

The run sets VPIPE_TIMINGS (see pipeline/tracking/timings.py): every `vpipe` process a stage starts appends its
phases, which the row splits the stage's seconds into — imports (the interpreter's start and every
module loaded), config (training config parsed, data and model built), mlflow (store opened, run
created), work (training, validation, testing; a command's own work), logging (params, metrics,
artifacts, report files, the registered model) — and other: the rest of the stage's seconds (DVC's own
checks and hashing around the command, the interpreter's exit, a stage run by no `vpipe` process such
as synth). The columns add up to the stage's seconds. Writes the same as JSON to
bench/results/repro.json (the processes' own lines included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_LIMIT_S = 15 * 60
CACHED_HEAD_LIMIT_S = 60
STAGE = re.compile(r"Running stage '([^']+)'")
PHASES = (
    "imports",
    "config",
    "mlflow",
    "work",
    "logging",
)  # pipeline/tracking/timings.py's, less its "other"


def cached_heads() -> set[str]:
    """train@NAME stages whose input is a feature store (params.yaml `experiments`)."""
    import yaml

    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["experiments"]
    return {f"train@{name}" for name, store in experiments.items() if str(store).startswith("data/features/")}


def read_timings(path: Path) -> list[dict]:
    """The JSON lines the stages' processes appended (a torn last line, from a killed process, is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def split_stage(stage: str, seconds: float, records: list[dict]) -> dict[str, float]:
    """``seconds`` of ``stage`` split into the phases of its rank-zero processes (several run one after
    another add up; the other ranks of a DDP job run beside rank zero and are left out), and ``other``,
    the remainder, so that the values add up to ``seconds``."""
    split = dict.fromkeys(PHASES, 0.0)
    for record in records:
        if record.get("stage") == stage and not record.get("rank"):
            for phase in PHASES:
                split[phase] += float(record["phases"].get(phase, 0.0))
    split = {k: round(v, 2) for k, v in split.items()}
    split["other"] = round(seconds - sum(split.values()), 2)
    return split


def table(rows: list[dict], total: float) -> str:
    head = ["stage", "seconds", *PHASES, "other", "limit", "within"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        cells = [r["stage"], f"{r['seconds']:.1f}", *(f"{r['phases'][p]:.1f}" for p in (*PHASES, "other"))]
        cells += [str(r["limit_s"] or ""), "" if r["within"] is None else str(r["within"])]
        lines.append("| " + " | ".join(cells) + " |")
    sums = {p: sum(r["phases"][p] for r in rows) for p in (*PHASES, "other")}
    cells = ["**dvc repro**", f"**{total:.1f}**", *(f"{sums[p]:.1f}" for p in (*PHASES, "other"))]
    lines.append("| " + " | ".join([*cells, str(TOTAL_LIMIT_S), str(total <= TOTAL_LIMIT_S)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="re-run every stage (dvc repro --force)")
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: the whole pipeline)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vpipe-repro-") as tmp:
        timings = Path(tmp) / "timings.jsonl"
        env = {
            **os.environ,
            "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "VPIPE_TIMINGS": str(timings),
        }
        command = ["dvc", "repro", *(["--force"] if args.force else []), *args.targets]
        started = time.perf_counter()
        stamps: list[tuple[str, float]] = []
        with subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                if match := STAGE.search(line):
                    stamps.append((match.group(1), time.perf_counter() - started))
        total = time.perf_counter() - started
        records = read_timings(timings)
    if proc.returncode:
        print(f"dvc repro failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    heads = cached_heads()
    rows = []
    for i, (stage, start) in enumerate(stamps):
        end = stamps[i + 1][1] if i + 1 < len(stamps) else total
        limit = CACHED_HEAD_LIMIT_S if stage in heads else None
        rows.append(
            {
                "stage": stage,
                "seconds": round(end - start, 1),
                "phases": split_stage(stage, round(end - start, 1), records),
                "limit_s": limit,
                "within": None if limit is None else end - start <= limit,
            }
        )
    print("\n" + table(rows, total))
    out = ROOT / "bench" / "results" / "repro.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(command),
                "total_s": round(total, 1),
                "limit_s": TOTAL_LIMIT_S,
                "stages": rows,
                "processes": records,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
