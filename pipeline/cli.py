"""The ``vpipe`` command. Subcommands import their heavy libraries lazily: ``vpipe --help`` needs no torch.

An error the user can fix (a project error, :class:`pipeline.media.errors.UserError`, or an option or
config that does not parse) ends the command with one line on stderr, ``vpipe COMMAND: MESSAGE``, and
status 1 (2 for options and configs); ``--debug`` (anywhere on the command line) or ``VPIPE_DEBUG=1``
shows the full traceback instead. The subcommands and their options are in :mod:`pipeline.options`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import compat
from pipeline.options import DEBUG, TRAINING, Parser, build_parser
from pipeline.tracking import timings


def _debug(argv: list[str]) -> tuple[list[str], bool]:
    """The command line without ``--debug`` (before any ``--``), and whether it or ``VPIPE_DEBUG`` asks
    for tracebacks."""
    end = argv.index("--") if "--" in argv else len(argv)
    asked = DEBUG in argv[:end] or os.environ.get("VPIPE_DEBUG", "").lower() not in ("", "0", "false", "no")
    return [a for a in argv[:end] if a != DEBUG] + argv[end:], asked


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions behind it (``__cause__``, else ``__context__``), outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def one_line(text: str) -> str:
    """A message on one line: its first line, then the others (a list of problems) joined by ``; ``."""
    head, *rest = [line.strip() for line in str(text).splitlines() if line.strip()] or ["(no message)"]
    return f"{head.rstrip(':')}: {'; '.join(rest)}" if rest else head


def _config_message(chain: list[BaseException], argv: list[str]) -> str:
    """One line for jsonargparse's error (LightningCLI's options and configs): the option and the
    innermost reason, without the dump of every union member tried (``--trainer.max_epochs: expected
    int, got abc``); a class that does not exist is named with the configs that give it."""
    keys, class_path = compat.jsonargparse_keys(chain)
    leaf = chain[-1]
    reason = compat.jsonargparse_reason(one_line(str(leaf)))
    if class_path and isinstance(leaf, (ImportError, AttributeError)):  # the class itself is not there
        keys = keys[: len(keys) - keys[::-1].index("init_args") - 1]
        configs = [
            c
            for i, c in enumerate(argv[1:])
            if argv[i] in ("-c", "--config") and os.path.isfile(c) and class_path in Path(c).read_text()
        ]
        where = f" (in {', '.join(configs)})" if configs else ""
        reason = f"class_path {class_path}{where} does not exist: {reason}"
    return f"--{'.'.join(keys)}: {reason}" if keys else reason


def _user_error(err: BaseException, argv: list[str]) -> tuple[str, int] | None:
    """The line to print for an error the user can fix, and the exit status; None for any other error.
    A project error anywhere in the chain wins (LightningCLI wraps the one a data module raised);
    jsonargparse's parse errors come next."""
    from pipeline.media.errors import UserError

    chain = _chain(err)
    for e in chain:
        if isinstance(e, UserError):
            return one_line(str(e)), 1
    if isinstance(err, argparse.ArgumentError):
        return _config_message(chain, argv), 2
    return None


def main(argv: list[str] | None = None) -> None:
    """``vpipe ARGS`` (``argv``; default: the process's command line). A known user error ends it with
    one line on stderr and a non-zero status; with ``--debug`` or ``VPIPE_DEBUG=1``, the traceback."""
    own = argv is None
    argv, debug = _debug(sys.argv[1:] if argv is None else list(argv))
    Parser.debug = debug
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        _run(argv, own)
    except SystemExit as stop:
        # A command's own `sys.exit(message)` from inside an `except`: with --debug, what it caught.
        if debug and isinstance(stop.code, str) and stop.__context__ is not None:
            import traceback

            traceback.print_exception(stop.__context__)
        raise
    except Exception as err:
        found = None if debug else _user_error(err, argv)
        if found is None:
            raise
        message, status = found
        prefix = f"vpipe {command}" if command else "vpipe"
        if status == 1:
            sys.exit(f"{prefix}: {message}")  # as the commands' own exits: the message is the exit's code
        print(f"{prefix}: {message} (see {prefix} --help)", file=sys.stderr)
        sys.exit(status)


def _run(argv: list[str], own: bool) -> None:
    timings.start()  # with $VPIPE_TIMINGS set: this process's phases, appended to that file at exit
    if own:  # the process's own command line (console script, python -m pipeline)
        timings.hold_gc()
    # The project runs offline and sends nothing anywhere by default: MLflow's usage telemetry stays off
    # (in this process and those it starts) unless the environment says otherwise.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if argv and argv[0] in TRAINING:
        import logging

        from pytorch_lightning.utilities.exceptions import SIGTERMException

        from pipeline.train import cli_main

        # "Seed set to 0" on every run: the seed is in the config and the run's parameters.
        logging.getLogger("lightning_fabric.utilities.seed").setLevel(logging.WARNING)
        if own:
            sys.argv[1:] = argv  # without --debug: LightningCLI reads sys.argv itself
        try:
            # From the console script LightningCLI reads sys.argv itself (given both, it warns on every run).
            cli_main(None if own else argv, exit_on_error=False)
        except SIGTERMException:
            # Lightning stops at the end of the epoch with a bare SystemExit (status 0): DVC and schedulers
            # would take the stage for finished. Exit as a process killed by SIGTERM does.
            print(f"vpipe {argv[0]}: stopped by SIGTERM (run marked FAILED)", file=sys.stderr)
            sys.exit(128 + 15)
        return
    args = build_parser().parse_args(argv)
    from pipeline.commands import COMMANDS

    timings.start_work()
    timings.switch("work")
    COMMANDS[args.command](args)
