"""Where `dvc repro` spends its time: each stage's wall time against its limit, in one run.

    python bench/repro.py                 # dvc repro in this checkout (only what changed runs)
    python bench/repro.py --force         # every stage (dvc repro --force)

Streams `dvc repro`, stamps each "Running stage 'X'" line, and prints one row per stage that ran:
seconds (from its start to the next stage's start, or to the end), and the limit it is held to — the
whole repro within 15 minutes on a 2-core machine, each stage over cached features within 60 s.
Writes the same as JSON to bench/results/repro.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_LIMIT_S = 15 * 60
CACHED_HEAD_LIMIT_S = 60
STAGE = re.compile(r"Running stage '([^']+)'")


def cached_heads() -> set[str]:
    """train@NAME stages whose input is a feature store (params.yaml `experiments`)."""
    import yaml

    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["experiments"]
    return {f"train@{name}" for name, store in experiments.items() if str(store).startswith("data/features/")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="re-run every stage (dvc repro --force)")
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = ["dvc", "repro", *(["--force"] if args.force else [])]
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
                "limit_s": limit,
                "within": None if limit is None else end - start <= limit,
            }
        )
    print("\n| stage | seconds | limit | within |\n|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['seconds']:.1f} | {r['limit_s'] or ''} | {'' if r['within'] is None else r['within']} |"
        )
    print(f"| **dvc repro** | **{total:.1f}** | {TOTAL_LIMIT_S} | {total <= TOTAL_LIMIT_S} |")
    out = ROOT / "bench" / "results" / "repro.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(command),
                "total_s": round(total, 1),
                "limit_s": TOTAL_LIMIT_S,
                "stages": rows,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
