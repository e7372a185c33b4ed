"""The ``vpipe`` command line: every subcommand and its options (argparse; the training commands are
LightningCLI's, :mod:`pipeline.train`). :mod:`pipeline.cli` parses with it and runs the command.

An option that mirrors a parameter of the function its command calls takes that parameter's default
(:class:`Signature`), read when the command is parsed: each default is written once, in the function.
Building the parser imports none of the commands' modules: ``vpipe --help`` needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

TRAINING = ("fit", "validate", "test", "predict")
DEBUG = "--debug"  # global: anywhere before `--`, training commands included


class Signature:
    """An option's default: that of parameter ``name`` (default: the option's dest) of ``function``
    (``module:function``), passed through ``convert``. The module is imported when the option's
    subcommand is parsed or its help shown, so ``vpipe --help`` imports none of them."""

    def __init__(self, function: str, name: str | None = None, convert=None):
        self.function, self.name, self.convert = function, name, convert

    def value(self, dest: str):
        module, _, qualname = self.function.partition(":")
        parameter = inspect.signature(getattr(importlib.import_module(module), qualname)).parameters
        default = parameter[self.name or dest].default
        return self.convert(default) if self.convert else default

    def __repr__(self) -> str:  # in `vpipe --help` of an unparsed subcommand, were it ever shown
        return f"{self.function}'s {self.name or 'default'}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``vpipe extract: argument --fps: invalid float value: 'abc'``; the
    usage too with ``debug``) and :class:`Signature` defaults resolved when a parser is used."""

    debug = False  # set by main()

    def _resolve_defaults(self) -> None:
        for action in self._actions:
            if isinstance(action.default, Signature):
                action.default = action.default.value(action.dest)

    def parse_known_args(self, args=None, namespace=None):
        self._resolve_defaults()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._resolve_defaults()
        return super().format_help()

    def error(self, message: str):
        if self.debug:
            super().error(message)
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def _model_options(p: argparse.ArgumentParser, example: str, function: str) -> None:
    """The options every command that runs a trained model on files shares: which model, output, device."""
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--ckpt", help=f"checkpoint written by vpipe fit, e.g. {example}")
    m.add_argument(
        "--model", help="registered model: models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument(
        "--weights",
        default=Signature(function),
        help="backbone weights file, when the features were computed from one",
    )
    p.add_argument("--device", default=Signature(function), help="torch device, e.g. cuda")


def _root_option(p: argparse.ArgumentParser, function: str) -> None:
    p.add_argument(
        "--root",
        default=Signature(function),
        help="dataset root that every path must stay inside (default: the manifest's folder)",
    )


def _decoding_options(p: argparse.ArgumentParser, function: str, workers_help: str) -> None:
    """How videos are decoded: the options vpipe extract and vpipe features --manifest share, with the
    defaults of ``function`` (:func:`pipeline.stages.extract.extract`, ``compute_from_videos``)."""
    default = Signature(function)
    p.add_argument("--fps", type=float, default=default, help="output frame rate; 0 keeps every frame")
    p.add_argument(
        "--size", default=default, help="scale whole frames to S×S or WxH (no crop); default keeps the size"
    )
    p.add_argument(
        "--max-frames", type=int, default=default, help="keep at most N frames per video, sampled uniformly"
    )
    p.add_argument("--workers", type=int, default=default, help=workers_help)
    p.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        default=default,
        help="skip: record bad videos in errors.csv; fail: stop",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=default,
        help="seconds per video before its decoder is killed (0: no limit)",
    )
    p.add_argument(
        "--image-fps",
        type=float,
        default=default,
        help="frame rate of image-sequence folders without an fps column",
    )


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = Parser(
        prog="vpipe", description="Video understanding pipeline: extract → features → train → report."
    )
    parser.add_argument(
        DEBUG,
        action="store_true",
        default=argparse.SUPPRESS,  # main() takes it out of the command line: never in the parsed arguments
        help="on an error, the full traceback instead of one line (also VPIPE_DEBUG=1); anywhere on "
        "the command line, training commands included",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "extract", help="decode the videos of a manifest into a frame store", formatter_class=fmt
    )
    p.add_argument("--manifest", help="CSV of video_id,path,label,split[,start_sec,end_sec]")
    p.add_argument("--out", required=True, help="frame store folder (replaced atomically)")
    extract = "pipeline.stages.extract:extract"
    _decoding_options(p, extract, "decoding processes (default: one per core)")
    p.add_argument(
        "--shard-mb", type=int, default=Signature(extract), help="approximate size of a frame shard"
    )
    p.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="extract part I (from 0) of N into the part store OUT.part-I-of-N; default: a SLURM "
        "job array's task ($SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT), else $RANK of $WORLD_SIZE, else all",
    )
    p.add_argument(
        "--codec",
        choices=["jpeg", "raw"],
        default=Signature(extract),
        help="jpeg: frames as JPEG images (about half the videos' bytes at 112 px); raw: uint8 arrays (8x more)",
    )
    p.add_argument(
        "--quality", type=int, default=Signature(extract), help="JPEG quality (1-100) of --codec jpeg"
    )
    _root_option(p, extract)

    p = sub.add_parser(
        "merge",
        help="join the part stores of vpipe extract --part into one store",
        formatter_class=fmt,
        description="Join OUT.part-0000-of-000N ... (four-digit part numbers; or the PART folders given) into OUT, "
        "atomically; the result is byte for byte what one process extracting the whole manifest writes.",
    )
    p.add_argument(
        "parts", nargs="*", metavar="PART", help="part stores, in order (default: every OUT.part-I-of-N)"
    )
    p.add_argument("--out", required=True, help="the store the parts were extracted for")
    p.add_argument(
        "--link", action="store_true", help="hard-link the parts' shard files instead of copying frames"
    )
    p.add_argument("--remove-parts", action="store_true", help="delete the part stores once merged")

    p = sub.add_parser(
        "check", help="validate a manifest and the files it names before any work", formatter_class=fmt
    )
    p.add_argument("--manifest", required=True)
    validate = "pipeline.media.manifest:validate"
    _root_option(p, validate)
    p.add_argument(
        "--min-per-class",
        type=int,
        default=Signature(validate),
        help="warn about classes with fewer training examples",
    )
    p.add_argument("--show", type=int, default=Signature(validate), help="offenders named per problem")
    p.add_argument(
        "--captions",
        default=None,
        help="reference captions (video_id,caption) to check against the manifest (default: captions.csv beside it, if any)",
    )

    p = sub.add_parser(
        "add-dataset",
        help="add your own dataset and its experiments to params.yaml, configs/ and dvc.yaml (one change, printed as a diff)",
        formatter_class=fmt,
        description="Check the manifest (vpipe check's rules), then add, in one change printed as a unified "
        "diff: datasets.NAME, NAME in features.datasets and an experiment NAME_HEAD per head in params.yaml; "
        "configs/backbone_NAME.yaml and configs/NAME_HEAD.yaml from the template's configs, pointing at "
        "NAME's stores; NAME's plots in dvc.yaml. Nothing changes when anything is wrong.",
    )
    p.add_argument("name", metavar="NAME", help="the dataset's name: data/frames/NAME, experiments NAME_HEAD")
    p.add_argument("--manifest", required=True, help="CSV of video_id,path,label,split (written by --import)")
    plan = "pipeline.add_dataset:plan_add"
    p.add_argument(
        "--fps", type=float, default=Signature(plan), help="extraction frame rate (0 keeps every frame)"
    )
    p.add_argument("--size", default=Signature(plan), help="extracted frame size: S (S×S) or WxH")
    p.add_argument("--codec", choices=["jpeg", "raw"], default=Signature(plan), help="frame store codec")
    p.add_argument(
        "--template",
        default=Signature(plan),
        help="backbone recipe: configs/backbone_TEMPLATE.yaml (gestures, actions)",
    )
    p.add_argument(
        "--heads",
        default=Signature(plan, convert=",".join),
        help="experiments to add, comma-separated: lstm, gru, transformer, meanpool, rnn",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=Signature(plan),
        help="max_epochs of every new config (default: the templates')",
    )
    p.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    p.add_argument(
        "--import",
        dest="importer",
        nargs=argparse.REMAINDER,
        metavar="KIND ROOT ...",
        help="last: run python -m data_scripts.importers KIND ROOT ... --out MANIFEST first (tree, ucf101, ...)",
    )
    p = sub.add_parser(
        "remove-dataset",
        help="undo vpipe add-dataset NAME (the stores, models and metrics stay unless --purge)",
        formatter_class=fmt,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--purge", action="store_true", help="also delete NAME's stores, models, metrics and plots"
    )

    p = sub.add_parser(
        "features",
        help="cache CNN features of a frame store, or straight from videos (Lightning predict job)",
        formatter_class=fmt,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", help="frame store folder")
    source.add_argument(
        "--manifest",
        help="CSV of videos: decode them (as vpipe extract would) straight into the backbone, no frame store",
    )
    p.add_argument("--out", required=True, help="feature store folder (replaced atomically)")
    compute = "pipeline.stages.features:compute"  # compute_from_videos (--manifest) has the same defaults
    p.add_argument(
        "--backbone",
        default=Signature(compute, "name"),
        help="timm model name, e.g. resnet18 (default: the one named by the card beside --weights)",
    )
    w = p.add_mutually_exclusive_group()
    w.add_argument(
        "--weights",
        default=Signature(compute),
        help="local .safetensors or .pth weights, e.g. the backbone stage's models/backbone_NAME/backbone.safetensors",
    )
    w.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's pretrained weights (offline for tf_efficientnet_lite0; other models need the model hub)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=Signature(compute),
        help="random-initialisation seed when no weights are given",
    )
    p.add_argument(
        "--pool", choices=["avg", "grid"], default=Signature(compute), help="avg: (N, D); grid: (N, C, G, G)"
    )
    p.add_argument("--grid", type=int, default=Signature(compute), help="G for --pool grid")
    p.add_argument(
        "--input-size",
        type=int,
        default=Signature(compute),
        help="side fed to the model; default: the weights' card (backbone.json beside them), else the model's own",
    )
    p.add_argument(
        "--modality",
        choices=["rgb", "rgb_diff"],
        default=Signature(compute),
        help="rgb: the frames; rgb_diff: each frame's difference to the next (TSN). Default: the weights' card, else rgb",
    )
    p.add_argument("--batch-size", type=int, default=Signature(compute), help="frames per batch, per device")
    p.add_argument(
        "--num-workers",
        type=int,
        default=Signature(compute),
        help="DataLoader workers (default: 0 on CPU, up to 4 on GPU)",
    )
    p.add_argument("--accelerator", default=Signature(compute), help="cpu, gpu, auto, ...")
    p.add_argument(
        "--devices",
        default=Signature(compute, convert=str),
        help="devices per node (a number, a list such as 0,1, or auto)",
    )
    p.add_argument("--num-nodes", type=int, default=Signature(compute), help="machines (torchrun or SLURM)")
    p.add_argument(
        "--strategy", default=Signature(compute), help="e.g. ddp; auto picks DDP for several devices"
    )
    p.add_argument(
        "--precision",
        default=Signature(compute),
        help="default: bf16-mixed on CUDA GPUs with bf16, else 32-true",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a feature store whose cache key differs")
    g = p.add_argument_group("decoding (--manifest only; as vpipe extract)")
    videos = "pipeline.stages.video_features:compute_from_videos"
    _decoding_options(
        g,
        videos,
        "decoding processes per device (default: the device's share of the cores; half of it on the CPU, "
        "the model's threads taking the rest)",
    )
    _root_option(g, videos)
    p.add_argument(
        "--system-metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log MLflow's system metrics (CPU, memory; GPU when present) into the job's run (experiment `features`)",
    )

    p = sub.add_parser(
        "grids",
        help="import TaxiBJ-style HDF5 traffic-flow files into a grid store",
        formatter_class=fmt,
        description="Join HDF5 files holding data (T, C, H, W) and date (T,) as YYYYMMDDSS (as the TaxiBJ "
        "BJ13..BJ16_M32x32_T30_InOut.h5 files do) into one grid store, split by whole days.",
    )
    p.add_argument("files", nargs="+", metavar="H5")
    p.add_argument("--out", required=True, help="grid store folder (replaced atomically)")
    grids = "pipeline.storage.grids:import_grids"
    p.add_argument(
        "--val-days",
        type=int,
        default=Signature(grids),
        help="days before the test days that form the val split",
    )
    p.add_argument(
        "--test-days", type=int, default=Signature(grids), help="last days of the series: the test split"
    )
    p.add_argument(
        "--slots-per-day",
        type=int,
        default=Signature(grids),
        help="slots of a day (48: 30 minutes each)",
    )
    p.add_argument(
        "--channels",
        default=Signature(grids, convert=",".join),
        help="names of the grid channels, comma-separated",
    )

    for name in TRAINING:
        what = {
            "fit": "train, test the best checkpoint, write metrics/NAME.json",
            "validate": "evaluate models/NAME/best.ckpt (or --ckpt_path) on the val split",
            "test": "evaluate models/NAME/best.ckpt (or --ckpt_path) on the test split, write metrics/NAME.json",
            "predict": "write predictions/NAME-SPLIT.csv (--predict_split, default test) with models/NAME/best.ckpt",
        }[name]
        sub.add_parser(
            name, add_help=False, help=f"{what}: vpipe {name} -c configs/NAME.yaml (see vpipe {name} --help)"
        )

    p = sub.add_parser(
        "report",
        help="table of every metrics/*.json, also written to reports/summary.md",
        formatter_class=fmt,
    )
    report = "pipeline.report:report"
    p.add_argument("--metrics", default=Signature(report, "metrics_dir"), help="folder of metrics JSON files")
    p.add_argument("--out", default=Signature(report), help="Markdown copy of the table ('' for none)")
    p.add_argument("--no-timings", action="store_true", help="leave out the run durations read from MLflow")
    p.add_argument(
        "--seeds",
        default=Signature(report),
        help="bench/seeds.py's results: the quality as mean ± sd over seeds, shown first ('' for none)",
    )
    p.add_argument(
        "--columns",
        nargs="+",
        metavar="PATTERN",
        default=Signature(report),
        help="only metrics matching these patterns, e.g. 'test/acc*'",
    )
    p.add_argument(
        "--all", action="store_true", help="also the per-step forecasting metrics (test/h01/mse, ...)"
    )

    p = sub.add_parser(
        "ui", help="MLflow UI on this project's store, bound to 127.0.0.1", formatter_class=fmt
    )
    serve = "pipeline.ui:serve"
    p.add_argument("--port", type=int, default=Signature(serve))
    p.add_argument("--host", default=Signature(serve), help="keep it local: the UI has no authentication")
    p.add_argument("--workers", type=int, default=Signature(serve), help="server worker processes")

    p = sub.add_parser(
        "classify",
        help="top-k labels of videos with a trained classifier",
        formatter_class=fmt,
        description="Decode each video as the model's frame store was extracted, compute features as its "
        "feature store was, and print the top-k classes with probabilities.",
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    classify = "pipeline.inference.classify:run"
    _model_options(p, "models/gesture_gru/best.ckpt", classify)
    p.add_argument(
        "--topk", type=int, default=Signature(classify), help="classes printed per video or window"
    )
    p.add_argument(
        "--window",
        type=float,
        default=Signature(classify),
        help="classify windows of W seconds (streaming) instead of whole videos",
    )
    p.add_argument(
        "--stride",
        type=float,
        default=Signature(classify),
        help="seconds between window starts (default: --window)",
    )
    p = sub.add_parser(
        "caption",
        help="a caption for each video or still image with a trained captioner",
        formatter_class=fmt,
        description="Decode each file as the model's frame store was extracted (a PNG/JPEG image is a "
        "one-frame video), compute features as its feature store was, and print one caption.",
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO_OR_IMAGE")
    caption = "pipeline.inference.describe:run"
    _model_options(p, "models/caption_gru/best.ckpt", caption)
    p.add_argument(
        "--beam",
        type=int,
        default=Signature(caption),
        help="beam width (1: greedy; default: the model's beam_size)",
    )
    p = sub.add_parser(
        "forecast",
        help="roll out the next frames of a video or a still image with a trained frame forecaster",
        formatter_class=fmt,
        description="Decode the first N frames of VIDEO as the model's frame store was extracted (frame rate, "
        "size, grayscale), predict K more, and write the N context frames followed by the K "
        "predicted ones. A still image (PNG, JPEG) is one frame of context: a video from one "
        "still, e.g. with models/still_convlstm/best.ckpt.",
    )
    p.add_argument("video", metavar="VIDEO_OR_IMAGE")
    p.add_argument(
        "--ckpt", required=True, help="frame forecaster checkpoint, e.g. models/nextframe_convlstm/best.ckpt"
    )
    forecast = "pipeline.inference.rollout:forecast"
    p.add_argument(
        "--context",
        type=int,
        default=Signature(forecast),
        help="frames read (N); default: the model's training context",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=Signature(forecast),
        help="frames predicted (K); default: the model's training horizon",
    )
    p.add_argument("--out", required=True, help="output video: .mp4 (H.264) or .gif")
    return parser
