"""Quality as mean ± sd over seeds: every head trained on the cached features, in one run.

    python bench/seeds.py                                # every head over cached features, seeds 0 1 2
    python bench/seeds.py --configs gesture_gru --seeds 0 1 2 3 4
    python bench/seeds.py --configs gesture_gru_e2e      # an end-to-end model too (about a minute a seed)

Needs the feature stores of `dvc repro` (data/features/...). Configs not run keep their results in
bench/results/seeds.json (`--configs caption_gru` re-runs one and leaves the others). The default configs are every experiment
of params.yaml over a feature store (the recognition heads and the feature forecaster) and every
captioner. Each seed re-runs `vpipe fit -c configs/NAME.yaml --seed_everything S --data.init_args.seed S`
(initialisation, dropout, and the training clips' sampling) into bench/results/seeds/ (its own models/,
metrics/ and MLflow store, so the pipeline's outputs and runs are untouched), then prints one row per
config and headline metric, and writes bench/results/seeds.json, which `vpipe report` shows as the
results table (mean ± sd) and the README's results table copies.

Why seeds and not the committed single run: another CPU takes other float paths (BLAS and oneDNN
kernels), so training diverges from the same seed; a single run is one sample of that spread.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "seeds"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine  # noqa: E402

# The metrics each kind of experiment is judged by (the first of them a config has names its kind).
HEADLINE = {
    "test/acc": ["test/acc"],
    "test/cider": [
        "test/order",
        "test/cider",
        "test/nn_seq/order",
        "test/nn_seq/cider",
        "test/nn_mean/cider",
    ],
    "test/mse": ["test/mse", "test/copy_last/mse"],
}


def inputs() -> dict[str, str]:
    """``{config: the store it trains on}`` from params.yaml (experiments and captioners)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stores = {name: str(store) for name, store in params.get("experiments", {}).items()}
    stores.update({name: str(item["features"]) for name, item in params.get("captioning", {}).items()})
    return stores


def default_configs(stores: dict[str, str]) -> list[str]:
    """Every config over a feature store, in params.yaml's order."""
    return [name for name, store in stores.items() if "/features/" in store]


def fit(config: str, seed: int, env: dict) -> dict[str, float]:
    name = f"{config}_seed{seed}"
    command = [sys.executable, "-m", "pipeline", "fit", "-c", f"configs/{config}.yaml", "--name", name]
    command += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((OUT / "metrics" / f"{name}.json").read_text())


def _order(stores: dict[str, str]):
    """Sort key: the default configs in params.yaml's order, then the others (end to end, pixel space)
    in that order, then any config params.yaml lacks, by name."""
    defaults = default_configs(stores)
    known = defaults + [name for name in stores if name not in defaults]
    return lambda name: (known.index(name) if name in known else len(known), name)


def headline(metrics: dict[str, float]) -> list[str]:
    return next((names for marker, names in HEADLINE.items() if marker in metrics), sorted(metrics))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=None, help="default: every head over cached features")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "seeds.json"))
    args = parser.parse_args(argv)
    stores = inputs()
    configs = args.configs or default_configs(stores)
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VPIPE_ROOT": str(OUT), "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for config in configs:
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            runs.append(fit(config, seed, env))
            shown = ", ".join(f"{k} {runs[-1][k]:.4f}" for k in headline(runs[-1]) if k in runs[-1])
            print(f"{config} seed {seed}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
        metrics = {}
        for key in headline(runs[0]):
            values = [run[key] for run in runs if key in run]
            if len(values) == len(runs):
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                metrics[key] = {"mean": statistics.mean(values), "sd": sd, "values": values}
        results[config] = {"data": stores.get(config, ""), "seeds": args.seeds, "metrics": metrics}
    command = "python bench/seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if Path(args.out).is_file():  # configs not run this time keep their results (and their command)
        kept = json.loads(Path(args.out).read_text())
        for name, result in kept["results"].items():
            if name not in results:
                results[name] = {**result, "command": result.get("command", kept.get("command"))}
    record = {
        "command": command,
        **machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "results": {name: results[name] for name in sorted(results, key=_order(stores))},
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    from pipeline.report import seeds_table

    print("\n" + seeds_table(Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
