"""The ``vpipe`` command. Subcommands import their heavy libraries lazily: ``vpipe --help`` needs no torch."""

from __future__ import annotations

import argparse
import os
import sys
import time

TRAINING = ("fit", "validate", "test", "predict")


def _model_options(p: argparse.ArgumentParser, example: str) -> None:
    """The options every command that runs a trained model on files shares: which model, output, device."""
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--ckpt", help=f"checkpoint written by vpipe fit, e.g. {example}")
    m.add_argument("--model", help="registered model: models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--weights", default=None, help="backbone weights file, when the features were computed from one")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="vpipe", description="Video understanding pipeline: extract → features → train → report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="decode the videos of a manifest into a frame store", formatter_class=fmt)
    p.add_argument("--manifest", help="CSV of video_id,path,label,split[,start_sec,end_sec]")
    p.add_argument("--out", required=True, help="frame store folder (replaced atomically)")
    p.add_argument("--fps", type=float, default=0.0, help="output frame rate; 0 keeps every frame")
    p.add_argument("--size", default=None, help="scale whole frames to S×S or WxH (no crop); default keeps the size")
    p.add_argument("--max-frames", type=int, default=None, help="keep at most N frames per video, sampled uniformly")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="skip: record bad videos in errors.csv; fail: stop")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per video before its decoder is killed (0: no limit)")
    p.add_argument("--shard-mb", type=int, default=256, help="approximate size of a frame shard")
    p.add_argument("--num-shards", type=int, default=None, help="split the manifest into N parts (default: $WORLD_SIZE or 1)")
    p.add_argument("--shard-index", type=int, default=None, help="the part this process extracts (default: $RANK or 0)")
    p.add_argument("--merge", nargs="+", metavar="PART", default=None, help="join part stores into --out instead of extracting")
    p.add_argument("--image-fps", type=float, default=12.0, help="frame rate of image-sequence folders without an fps column")
    p.add_argument("--root", default=None, help="dataset root that every path must stay inside (default: the manifest's folder)")

    p = sub.add_parser("check", help="validate a manifest and the files it names before any work", formatter_class=fmt)
    p.add_argument("--manifest", required=True)
    p.add_argument("--root", default=None, help="dataset root that every path must stay inside (default: the manifest's folder)")
    p.add_argument("--min-per-class", type=int, default=2, help="warn about classes with fewer training examples")
    p.add_argument("--show", type=int, default=5, help="offenders named per problem")
    p.add_argument("--captions", default=None,
                   help="reference captions (video_id,caption) to check against the manifest (default: captions.csv beside it, if any)")

    p = sub.add_parser("features", help="cache CNN features of a frame store (Lightning predict job)", formatter_class=fmt)
    p.add_argument("--frames", required=True, help="frame store folder")
    p.add_argument("--out", required=True, help="feature store folder (replaced atomically)")
    p.add_argument("--backbone", default=None,
                   help="timm model name, e.g. resnet18 (default: the one named by the card beside --weights)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", default=None,
                   help="local .safetensors or .pth weights, e.g. the backbone stage's models/backbone_NAME/backbone.safetensors")
    w.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights (offline for tf_efficientnet_lite0; other models need the model hub)")
    p.add_argument("--seed", type=int, default=0, help="random-initialisation seed when no weights are given")
    p.add_argument("--pool", choices=["avg", "grid"], default="avg", help="avg: (N, D); grid: (N, C, G, G)")
    p.add_argument("--grid", type=int, default=4, help="G for --pool grid")
    p.add_argument("--input-size", type=int, default=None,
                   help="side fed to the model; default: the weights' card (backbone.json beside them), else the model's own")
    p.add_argument("--modality", choices=["rgb", "rgb_diff"], default=None,
                   help="rgb: the frames; rgb_diff: each frame's difference to the next (TSN). Default: the weights' card, else rgb")
    p.add_argument("--batch-size", type=int, default=64, help="frames per batch, per device")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, up to 4 on GPU)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, auto, ...")
    p.add_argument("--devices", default="1", help="devices per node (a number, a list such as 0,1, or auto)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines (torchrun or SLURM)")
    p.add_argument("--strategy", default="auto", help="e.g. ddp; auto picks DDP for several devices")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA GPUs with bf16, else 32-true")
    p.add_argument("--overwrite", action="store_true", help="replace a feature store whose cache key differs")
    p.add_argument("--system-metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="log MLflow's system metrics (CPU, memory; GPU when present) into the job's run (experiment `features`)")

    p = sub.add_parser("grids", help="import TaxiBJ-style HDF5 traffic-flow files into a grid store", formatter_class=fmt,
                       description="Join HDF5 files holding data (T, C, H, W) and date (T,) as YYYYMMDDSS (as the TaxiBJ "
                                   "BJ13..BJ16_M32x32_T30_InOut.h5 files do) into one grid store, split by whole days.")
    p.add_argument("files", nargs="+", metavar="H5")
    p.add_argument("--out", required=True, help="grid store folder (replaced atomically)")
    p.add_argument("--val-days", type=int, default=14, help="days before the test days that form the val split")
    p.add_argument("--test-days", type=int, default=14, help="last days of the series: the test split")
    p.add_argument("--slots-per-day", type=int, default=48, help="slots of a day (48: 30 minutes each)")
    p.add_argument("--channels", default="inflow,outflow", help="names of the grid channels, comma-separated")

    for name in TRAINING:
        what = {"fit": "train, test the best checkpoint, write metrics/NAME.json",
                "validate": "evaluate models/NAME/best.ckpt (or --ckpt_path) on the val split",
                "test": "evaluate models/NAME/best.ckpt (or --ckpt_path) on the test split, write metrics/NAME.json",
                "predict": "write predictions/NAME-SPLIT.csv (--predict_split, default test) with models/NAME/best.ckpt"}[name]
        sub.add_parser(name, add_help=False, help=f"{what}: vpipe {name} -c configs/NAME.yaml (see vpipe {name} --help)")

    p = sub.add_parser("report", help="table of every metrics/*.json, also written to metrics/summary.md", formatter_class=fmt)
    p.add_argument("--metrics", default="metrics", help="folder of metrics JSON files")
    p.add_argument("--out", default="metrics/summary.md", help="Markdown copy of the table ('' for none)")
    p.add_argument("--no-timings", action="store_true", help="leave out the run durations read from MLflow")
    p.add_argument("--columns", nargs="+", metavar="PATTERN", default=None, help="only metrics matching these patterns, e.g. 'test/acc*'")
    p.add_argument("--all", action="store_true", help="also the per-step forecasting metrics (test/h01/mse, ...)")

    p = sub.add_parser("ui", help="MLflow UI on this project's store, bound to 127.0.0.1", formatter_class=fmt)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="keep it local: the UI has no authentication")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")

    p = sub.add_parser("classify", help="top-k labels of videos with a trained classifier", formatter_class=fmt,
                       description="Decode each video as the model's frame store was extracted, compute features as its "
                                   "feature store was, and print the top-k classes with probabilities.")
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    _model_options(p, "models/gesture_gru/best.ckpt")
    p.add_argument("--topk", type=int, default=5, help="classes printed per video or window")
    p.add_argument("--window", type=float, default=None, help="classify windows of W seconds (streaming) instead of whole videos")
    p.add_argument("--stride", type=float, default=None, help="seconds between window starts (default: --window)")
    p = sub.add_parser("caption", help="a caption for each video or still image with a trained captioner", formatter_class=fmt,
                       description="Decode each file as the model's frame store was extracted (a PNG/JPEG image is a "
                                   "one-frame video), compute features as its feature store was, and print one caption.")
    p.add_argument("videos", nargs="+", metavar="VIDEO_OR_IMAGE")
    _model_options(p, "models/caption_gru/best.ckpt")
    p.add_argument("--beam", type=int, default=None, help="beam width (1: greedy; default: the model's beam_size)")
    p = sub.add_parser("forecast", help="roll out the next frames of a video or a still image with a trained frame forecaster",
                       formatter_class=fmt,
                       description="Decode the first N frames of VIDEO as the model's frame store was extracted (frame rate, "
                                   "size, grayscale), predict K more, and write the N context frames followed by the K "
                                   "predicted ones. A still image (PNG, JPEG) is one frame of context: a video from one "
                                   "still, e.g. with models/still_convlstm/best.ckpt.")
    p.add_argument("video", metavar="VIDEO_OR_IMAGE")
    p.add_argument("--ckpt", required=True, help="frame forecaster checkpoint, e.g. models/nextframe_convlstm/best.ckpt")
    p.add_argument("--context", type=int, default=None, help="frames read (N); default: the model's training context")
    p.add_argument("--steps", type=int, default=None, help="frames predicted (K); default: the model's training horizon")
    p.add_argument("--out", required=True, help="output video: .mp4 (H.264) or .gif")
    return parser


def main(argv: list[str] | None = None) -> None:
    # The project runs offline and sends nothing anywhere by default: MLflow's usage telemetry stays off
    # (in this process and those it starts) unless the environment says otherwise.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINING:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        from pipeline.tracking import TrackingError
        from pipeline.train import CommandError, cli_main

        try:
            # From the console script LightningCLI reads sys.argv itself (given both, it warns on every run).
            cli_main(None if argv == sys.argv[1:] else argv)
        except (TrackingError, CommandError) as err:
            sys.exit(f"vpipe {argv[0]}: {err}")
        except SIGTERMException:
            # Lightning stops at the end of the epoch with a bare SystemExit (status 0): DVC and schedulers
            # would take the stage for finished. Exit as a process killed by SIGTERM does.
            print(f"vpipe {argv[0]}: stopped by SIGTERM (run marked FAILED)", file=sys.stderr)
            sys.exit(128 + 15)
        return
    args = _parser().parse_args(argv)
    if args.command == "extract":
        from pipeline.extract import ExtractError, extract, merge
        from pipeline.manifest import ManifestError
        from pipeline.stores import StoreError

        try:
            if args.merge:
                merge(args.merge, args.out)
            elif not args.manifest:
                sys.exit("vpipe extract: give --manifest (or --merge PART...)")
            else:
                extract(args.manifest, args.out, fps=args.fps, size=args.size, max_frames=args.max_frames, workers=args.workers,
                        on_error=args.on_error, timeout=args.timeout or None, shard_mb=args.shard_mb, num_shards=args.num_shards,
                        shard_index=args.shard_index, image_fps=args.image_fps, root=args.root)
        except (ExtractError, ManifestError, StoreError) as err:
            sys.exit(f"vpipe extract: {err}")
    elif args.command == "check":
        from pathlib import Path

        from pipeline.captions import CAPTIONS, check_captions
        from pipeline.manifest import ManifestError, read_manifest, validate

        try:
            entries = read_manifest(args.manifest)
        except ManifestError as err:
            sys.exit(f"vpipe check: {err}")
        report = validate(entries, args.manifest, root=args.root, min_per_class=args.min_per_class, show=args.show)
        counts = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
        print(f"{args.manifest}: {len(entries)} videos ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
              f"{len({e.label for e in entries})} classes")
        for line in report.lines():
            print(f"  {line}")
        ok = report.ok
        captions = Path(args.captions) if args.captions else Path(args.manifest).with_name(CAPTIONS)
        if args.captions or captions.is_file():
            errors, warnings = check_captions(captions, {e.video_id: e.label for e in entries}, show=args.show)
            print(f"{captions}: {f'{len(errors)} problem(s)' if errors else 'ok'}")
            for line in [*(f"error: {e}" for e in errors), *(f"warning: {w}" for w in warnings)]:
                print(f"  {line}")
            ok = ok and not errors
        if not ok:
            sys.exit(1)
    elif args.command == "features":
        from pipeline import tracking
        from pipeline.backbone import BackboneError
        from pipeline.features import FeatureCacheError, compute
        from pipeline.stores import StoreError

        devices = int(args.devices) if args.devices.isdigit() else args.devices
        params = {k: v for k, v in vars(args).items() if k not in ("command", "system_metrics") and v is not None}
        try:
            with tracking.job_run("features", f"features-{os.path.basename(os.path.normpath(args.out))}", params,
                                  [args.frames], "features", args.system_metrics) as run:
                started = time.perf_counter()
                meta = compute(args.frames, args.out, name=args.backbone, weights=args.weights, pretrained=args.pretrained,
                               pool=args.pool, grid=args.grid, input_size=args.input_size, modality=args.modality,
                               batch_size=args.batch_size, num_workers=args.num_workers, accelerator=args.accelerator,
                               devices=devices, num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision,
                               seed=args.seed, overwrite=args.overwrite)
                if run is not None and meta:
                    client, run_id = run
                    client.log_metric(run_id, "seconds", time.perf_counter() - started)
                    client.set_tag(run_id, "data.features.cache_key", meta.get("cache_key", ""))
                    tracking.log_datasets(client, run_id, [args.out], "output", with_sources=False)
        except (BackboneError, StoreError, FeatureCacheError, tracking.TrackingError) as err:
            sys.exit(f"vpipe features: {err}")
    elif args.command == "grids":
        from pipeline.grids import import_grids
        from pipeline.stores import StoreError

        try:
            meta = import_grids(args.files, args.out, args.val_days, args.test_days, args.slots_per_day,
                                tuple(args.channels.split(",")))
        except StoreError as err:
            sys.exit(f"vpipe grids: {err}")
        counts = ", ".join(f"{n} {split}" for split, n in meta["slots"].items())
        print(f"{args.out}: {sum(meta['slots'].values())} slots of {'×'.join(map(str, meta['shape']))} grids ({counts})")
    elif args.command == "forecast":
        from pipeline.forecast import ForecastError, forecast

        try:
            done = forecast(args.video, args.ckpt, args.out, context=args.context, steps=args.steps)
        except ForecastError as err:
            sys.exit(f"vpipe forecast: {err}")
        if done["note"]:
            print(f"vpipe forecast: note: {done['note']}", file=sys.stderr)
        print(f"{done['out']}: {done['context']} context + {done['steps']} predicted frames at {done['fps']:g} fps")
    elif args.command == "report":
        from pipeline.report import report

        print(report(args.metrics, args.out or None, args.columns, args.all, timings=not args.no_timings))
    elif args.command == "ui":
        from pipeline import ui

        ui.serve(args.host, args.port, args.workers)
    elif args.command == "caption":
        from pipeline.captioning import run as caption
        from pipeline.classify import ClassifyError

        try:
            status = caption(args.videos, ckpt=args.ckpt, model_uri=args.model, beam=args.beam, as_json=args.json,
                             weights=args.weights, device=args.device)
        except ClassifyError as err:
            sys.exit(f"vpipe caption: {err}")
        sys.exit(status)
    elif args.command == "classify":
        from pipeline.classify import ClassifyError, run

        try:
            status = run(args.videos, ckpt=args.ckpt, model_uri=args.model, topk=args.topk, as_json=args.json, window=args.window,
                         stride=args.stride, weights=args.weights, device=args.device)
        except ClassifyError as err:
            sys.exit(f"vpipe classify: {err}")
        sys.exit(status)
