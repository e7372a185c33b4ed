"""What each ``vpipe`` command does once its arguments are parsed (:mod:`pipeline.options` defines them, :mod:`pipeline.cli` parses them).
Heavy libraries are imported inside each command, so ``vpipe --help`` needs no torch. The project's
errors (:class:`pipeline.media.errors.UserError`) are left to :func:`pipeline.cli.main`, which prints
them as one line."""

from __future__ import annotations

import argparse
import os
import sys
import time


def run_extract(args: argparse.Namespace) -> None:
    from pipeline.stages.extract import extract
    from pipeline.stages.parts import parse_part

    if not args.manifest:
        sys.exit("vpipe extract: give --manifest (parts are joined by vpipe merge)")
    extract(
        args.manifest,
        args.out,
        **_decoding(args),
        shard_mb=args.shard_mb,
        part=parse_part(args.part) if args.part else None,
        codec=args.codec,
        quality=args.quality,
    )


def run_merge(args: argparse.Namespace) -> None:
    from pipeline.stages.parts import merge

    merge(args.parts, args.out, link=args.link, remove_parts=args.remove_parts)


def run_check(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pipeline.media.manifest import read_manifest, validate
    from pipeline.storage.captions import CAPTIONS, check_captions

    entries = read_manifest(args.manifest)
    report = validate(
        entries, args.manifest, root=args.root, min_per_class=args.min_per_class, show=args.show
    )
    counts = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
    print(
        f"{args.manifest}: {len(entries)} videos ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
        f"{len({e.label for e in entries})} classes"
    )
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


def run_add_dataset(args: argparse.Namespace) -> None:
    import subprocess
    from pathlib import Path

    from pipeline.add_dataset import check_manifest, plan_add

    root, manifest = Path.cwd(), Path(args.manifest)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    try:
        # Everything that does not need the manifest first: a wrong name or template costs no import.
        plan_add(root, args.name, manifest, template=args.template, heads=heads, size=args.size, check=False)
        if args.importer:
            if len(args.importer) < 2:
                sys.exit("vpipe add-dataset: --import KIND ROOT [importer options...]")
            done = subprocess.run(
                [sys.executable, "-m", "data_scripts.importers", *args.importer, "--out", str(manifest)]
            )
            if done.returncode:
                sys.exit(
                    f"vpipe add-dataset: the {args.importer[0]} importer failed (exit {done.returncode}); nothing changed"
                )
        summary = check_manifest(manifest)
        change = plan_add(
            root,
            args.name,
            manifest,
            fps=args.fps,
            size=args.size,
            codec=args.codec,
            template=args.template,
            heads=heads,
            epochs=args.epochs,
        )
        print(change.diff(), end="")
        if args.dry_run:
            print("(--dry-run: nothing written)")
            return
        change.apply()
    except OSError as err:
        sys.exit(f"vpipe add-dataset: {err}")
    targets = " ".join(f"train@{args.name}_{h}" for h in dict.fromkeys(heads))
    print(
        f"\n{summary}\nAdded {args.name}. Run its pipeline (extract, backbone, features, heads) and the report:"
    )
    print(f"  make repro TARGETS='{targets}'")


def run_remove_dataset(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pipeline.add_dataset import plan_remove, purge

    root = Path.cwd()
    try:
        change, outputs = plan_remove(root, args.name)
        print(change.diff(), end="")
        change.apply()
        if args.purge:
            purge(root, outputs)
    except OSError as err:
        sys.exit(f"vpipe remove-dataset: {err}")
    if outputs:
        kept = "deleted" if args.purge else "kept (--purge deletes them)"
        print(f"{', '.join(outputs)}: {kept}")


def run_features(args: argparse.Namespace) -> None:
    from pipeline.stages.features import compute
    from pipeline.tracking import inputs
    from pipeline.tracking import runs as tracking

    if args.manifest and args.num_workers:
        sys.exit("vpipe features: --num-workers reads a frame store; with --manifest, --workers decodes")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    # The decoding options count with --manifest only.
    unused = {"num_workers"} if args.manifest else set(DECODING)
    params = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "system_metrics", *unused) and v is not None
    }
    backbone = dict(
        name=args.backbone,
        weights=args.weights,
        pretrained=args.pretrained,
        pool=args.pool,
        grid=args.grid,
        input_size=args.input_size,
        modality=args.modality,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    with tracking.job_run(
        "features",
        f"features-{os.path.basename(os.path.normpath(args.out))}",
        params,
        [args.frames] if args.frames else [],
        "features",
        args.system_metrics,
    ) as run:
        started = time.perf_counter()
        if args.manifest:
            from pipeline.stages.video_features import compute_from_videos

            meta = compute_from_videos(args.manifest, args.out, **_decoding(args), **backbone)
        else:
            meta = compute(args.frames, args.out, num_workers=args.num_workers, **backbone)
        if run is not None and meta:
            client, run_id = run
            client.log_metric(run_id, "seconds", time.perf_counter() - started)
            client.set_tag(run_id, "data.features.cache_key", meta.get("cache_key", ""))
            inputs.log_datasets(client, run_id, [args.out], "output", with_sources=False)


# The options of options._decoding_options and options._root_option, as attributes of the parsed arguments.
DECODING = ("fps", "size", "max_frames", "workers", "on_error", "timeout", "image_fps", "root")


def _decoding(args: argparse.Namespace) -> dict:
    """How ``vpipe extract`` and ``vpipe features --manifest`` decode: their shared options as keyword
    arguments (``--timeout 0``: no limit)."""
    return {k: getattr(args, k) for k in DECODING}


def run_grids(args: argparse.Namespace) -> None:
    from pipeline.storage.grids import import_grids

    meta = import_grids(
        args.files,
        args.out,
        args.val_days,
        args.test_days,
        args.slots_per_day,
        tuple(args.channels.split(",")),
    )
    counts = ", ".join(f"{n} {split}" for split, n in meta["slots"].items())
    print(
        f"{args.out}: {sum(meta['slots'].values())} slots of {'×'.join(map(str, meta['shape']))} grids ({counts})"
    )


def run_forecast(args: argparse.Namespace) -> None:
    from pipeline.inference.rollout import forecast

    done = forecast(args.video, args.ckpt, args.out, context=args.context, steps=args.steps)
    if done["note"]:
        print(f"vpipe forecast: note: {done['note']}", file=sys.stderr)
    print(
        f"{done['out']}: {done['context']} context + {done['steps']} predicted frames at {done['fps']:g} fps"
    )


def run_report(args: argparse.Namespace) -> None:
    from pipeline.report import report

    print(
        report(
            args.metrics,
            args.out or None,
            args.columns,
            args.all,
            timings=not args.no_timings,
            seeds=args.seeds or None,
        )
    )


def run_ui(args: argparse.Namespace) -> None:
    from pipeline import ui

    ui.serve(args.host, args.port, args.workers)


def _on_files(run, args: argparse.Namespace, **options) -> None:
    """A trained model over the files of ``args.videos`` with the options every such command shares
    (``options._model_options``); exits with its status."""
    status = run(
        args.videos,
        ckpt=args.ckpt,
        model_uri=args.model,
        as_json=args.json,
        weights=args.weights,
        device=args.device,
        **options,
    )
    sys.exit(status)


def run_caption(args: argparse.Namespace) -> None:
    from pipeline.inference.describe import run

    _on_files(run, args, beam=args.beam)


def run_classify(args: argparse.Namespace) -> None:
    from pipeline.inference.classify import run

    _on_files(run, args, topk=args.topk, window=args.window, stride=args.stride)


COMMANDS = {
    "add-dataset": run_add_dataset,
    "remove-dataset": run_remove_dataset,
    "extract": run_extract,
    "merge": run_merge,
    "check": run_check,
    "features": run_features,
    "grids": run_grids,
    "forecast": run_forecast,
    "report": run_report,
    "ui": run_ui,
    "caption": run_caption,
    "classify": run_classify,
}
