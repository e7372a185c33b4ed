"""Seed spread of the headline heads: test accuracy as mean ± sd over seeds, in one run.

    python bench/seeds.py                                   # gesture_gru and action_lstm, seeds 0 1 2
    python bench/seeds.py --configs gesture_gru --seeds 0 1 2 3 4

Needs the feature stores of `dvc repro` (data/features/...). Each seed re-runs `vpipe fit -c
configs/NAME.yaml` with `--seed_everything S --data.init_args.seed S` (initialisation, and the
training clips' segment jitter) into bench/results/seeds/ (its own models/, metrics/ and MLflow
store, so the pipeline's outputs and runs are untouched), then prints one row per config and
writes bench/results/seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "seeds"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["gesture_gru", "action_lstm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--metric", default="test/acc")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VPIPE_ROOT": str(OUT), "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    results = {}
    for config in args.configs:
        values = []
        for seed in args.seeds:
            name = f"{config}_seed{seed}"
            started = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "fit",
                    "-c",
                    f"configs/{config}.yaml",
                    "--name",
                    name,
                    "--seed_everything",
                    str(seed),
                    "--data.init_args.seed",
                    str(seed),
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            value = json.loads((OUT / "metrics" / f"{name}.json").read_text())[args.metric]
            values.append(value)
            print(
                f"{config} seed {seed}: {args.metric} {value:.4f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        results[config] = {
            "seeds": args.seeds,
            "values": values,
            "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    print(f"\n| config | {args.metric} mean ± sd | seeds |\n|---|---|---|")
    for config, r in results.items():
        print(
            f"| {config} | {r['mean']:.4f} ± {r['sd']:.4f} | {', '.join(f'{v:.4f}' for v in r['values'])} |"
        )
    (ROOT / "bench" / "results" / "seeds.json").write_text(
        json.dumps({"metric": args.metric, "results": results}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
