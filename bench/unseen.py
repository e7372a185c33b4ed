"""Captions and classes of gesture clips no model has seen: another generator seed, side by side.

    python bench/unseen.py                      # seed 1, 8 clips per class, the models of `dvc repro`
    python bench/unseen.py --seed 7 --count 20

Generates gesture clips with ``data_scripts.synth gestures --seed S`` (the pipeline's data use seed
0: other shapes, colours, speeds and paths), then runs the trained models on the videos as a user
would: ``vpipe classify`` with the cached-feature GRU and ``vpipe caption`` with the captioner, both
decoding each video and computing its features as their stores were made. Prints, over the same
clips, the classifier's accuracy and the share of captions that name the clip's motion (the order
metric: the motion word of its class and of no other), and writes bench/results/unseen.json.

Needs the models of `dvc repro` (``models/gesture_gru``, ``models/caption_gru``,
``models/backbone_gestures``); ``--classifier``/``--captioner`` name other checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine  # noqa: E402

from pipeline.storage.captions import read_keywords  # noqa: E402
from pipeline.systems.caption_scores import named_motion  # noqa: E402

VPIPE = [sys.executable, "-m", "pipeline"]


def run_json(args: list[str]) -> list[dict]:
    done = subprocess.run([*VPIPE, *args, "--json"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"vpipe {args[0]} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1, help="generator seed (the pipeline's data: 0)")
    parser.add_argument("--count", type=int, default=8, help="clips per class")
    parser.add_argument("--classifier", default="models/gesture_gru/best.ckpt")
    parser.add_argument("--captioner", default="models/caption_gru/best.ckpt")
    parser.add_argument("--weights", default="models/backbone_gestures/backbone.safetensors")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "unseen.json"))
    args = parser.parse_args(argv)
    for path in (args.classifier, args.captioner, args.weights):
        if not (ROOT / path).is_file():
            raise SystemExit(f"{path}: missing; run `dvc repro` first (or name another checkpoint)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gestures"
        subprocess.run(
            [sys.executable, "-m", "data_scripts.synth", "gestures", "--out", str(data),
             "--count", str(args.count), "--seed", str(args.seed)],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        with open(data / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        labels = {str((data / r["path"]).resolve()): r["label"] for r in rows}
        keywords = read_keywords(data / "caption_keywords.json")
        videos = sorted(labels)
        started = time.perf_counter()
        classes = run_json(
            ["classify", "--ckpt", args.classifier, "--weights", args.weights, "--topk", "1", *videos]
        )
        captions = run_json(["caption", "--ckpt", args.captioner, "--weights", args.weights, *videos])
        seconds = time.perf_counter() - started
    predicted = {str(Path(r["video"]).resolve()): r["top"][0]["label"] for r in classes}
    written = {str(Path(r["video"]).resolve()): r["caption"] for r in captions}
    if set(predicted) != set(labels) or set(written) != set(labels):
        raise SystemExit("vpipe classify/caption did not answer for every video")
    right = [predicted[v] == labels[v] for v in videos]
    named = [named_motion(written[v], keywords) == labels[v] for v in videos]
    result = {
        "command": "python bench/unseen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **machine(torch_threads=False),
        "seed": args.seed,
        "clips": len(videos),
        "classifier": args.classifier,
        "captioner": args.captioner,
        "classifier_accuracy": sum(right) / len(videos),
        "caption_motion_accuracy": sum(named) / len(videos),
        "seconds": round(seconds, 1),
        "wrong_captions": {Path(v).name: written[v] for v, ok in zip(videos, named, strict=True) if not ok},
    }
    result["gap"] = result["classifier_accuracy"] - result["caption_motion_accuracy"]
    print(f"{len(videos)} unseen clips (generator seed {args.seed}, {args.count} per class)")
    print(f"  classifier ({args.classifier}) accuracy:          {result['classifier_accuracy']:.3f}")
    print(f"  captions naming the clip's motion ({args.captioner}): {result['caption_motion_accuracy']:.3f}")
    print(f"  gap: {result['gap']:+.3f} (target: within 0.05)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
