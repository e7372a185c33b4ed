"""Where a ``vpipe`` process spends its wall time, for ``bench/repro.py``: with ``VPIPE_TIMINGS=FILE`` in
the environment, each process appends one JSON line to FILE as it exits:

    {"pid": ..., "argv": [...], "stage": "$DVC_STAGE", "rank": 0, "started": EPOCH_S, "wall_s": ...,
     "phases": {"imports": s, "config": s, "mlflow": s, "work": s, "logging": s, "other": s}}

``started`` is when the operating system started the process (``/proc``; where there is none, when
this module was imported), so ``imports`` counts the interpreter's start too. The phases are exclusive
and add up to ``wall_s``: at any moment the time goes to the innermost open :func:`phase` (an MLflow
call inside the training loop counts as ``mlflow`` or ``logging``, not ``work``; loading a module, where
ever it happens, as ``imports``); time outside every phase after the command began is ``other``. What
runs after the line is written (the interpreter's own shutdown) is not in ``wall_s``.

- ``imports``: the interpreter's start and every module loaded (the top-level imports and the lazy ones
  inside functions, as ``python -X importtime`` counts them);
- ``config``: the training config parsed, the data module and model built;
- ``mlflow``: the MLflow store opened, the run created (imports of ``mlflow`` included);
- ``work``: training, validation, testing; a non-training command's own work;
- ``logging``: what goes into the MLflow run and the report files: params, config, datasets,
  metrics, checkpoints, pictures, the registered model.

Without the variable nothing is recorded and :func:`phase` costs one attribute lookup. Standard
library only: this module is imported before anything heavy.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

ENV = "VPIPE_TIMINGS"
PHASES = ("imports", "config", "mlflow", "work", "logging", "other")


def process_started() -> float | None:
    """When this process started (seconds since the epoch, to the kernel's clock tick), or None where
    ``/proc`` does not say."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    # Field 22 of stat (starttime, clock ticks after boot) is the 20th after the command name.
    return time.time() - (uptime - int(fields[19]) / ticks)


class Recorder:
    """The phase clock of one process: :meth:`switch` gives the time since the last switch to the phase
    that was running and makes another one current."""

    def __init__(self, path: str, started: float | None = None):
        self.path = path
        self.pid = os.getpid()
        now = time.time()
        self.started = min(started, now) if started is not None else now
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.current = "imports"
        self.last = time.perf_counter()
        self.totals["imports"] = now - self.started  # before this module was imported
        self.written = False

    def switch(self, name: str) -> str:
        now = time.perf_counter()
        self.totals[self.current] += now - self.last
        self.last = now
        previous, self.current = self.current, name
        return previous

    def record(self) -> dict:
        self.switch(self.current)
        wall = time.time() - self.started
        totals = {k: round(v, 3) for k, v in self.totals.items()}
        # perf_counter and the wall clock may drift apart by a few milliseconds: the remainder is "other".
        totals["other"] = round(max(0.0, wall - sum(v for k, v in totals.items() if k != "other")), 3)
        return {
            "pid": self.pid,
            "argv": sys.argv,
            "stage": os.environ.get("DVC_STAGE"),
            "rank": _rank(),
            "started": round(self.started, 3),
            "wall_s": round(wall, 3),
            "phases": totals,
        }

    def write(self) -> None:
        """Append this process's line to the file (once; not from a forked child)."""
        if self.written or os.getpid() != self.pid:
            return
        self.written = True
        line = json.dumps(self.record()) + "\n"
        # One write of one line in append mode: lines of processes that end together do not interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


_recorder: Recorder | None = None


def start() -> Recorder | None:
    """Start recording this process if ``$VPIPE_TIMINGS`` names a file (idempotent); the line is written
    at exit. From then until the first :func:`switch` the time is ``imports``."""
    global _recorder
    path = os.environ.get(ENV)
    if path and _recorder is None:
        _recorder = Recorder(path, process_started())
        atexit.register(_recorder.write)
        _time_imports()
    return _recorder


def _time_imports() -> None:
    """Charge module loading to ``imports``: wraps importlib's ``_find_and_load``, which both the import
    statement and ``importlib.import_module`` call for a module not yet loaded (what ``-X importtime``
    times), in the main thread only (the phase clock is the main thread's)."""
    import importlib._bootstrap as bootstrap

    find_and_load = getattr(bootstrap, "_find_and_load", None)
    if find_and_load is None or getattr(find_and_load, "_vpipe_timed", False):
        return
    main = threading.main_thread().ident

    def timed(name, import_):
        if threading.get_ident() != main or _recorder is None or _recorder.current == "imports":
            return find_and_load(name, import_)
        with phase("imports"):
            return find_and_load(name, import_)

    timed._vpipe_timed = True
    bootstrap._find_and_load = timed


def switch(name: str) -> None:
    """From now on the time goes to ``name`` (until the next switch or :func:`phase`)."""
    if _recorder is not None:
        _recorder.switch(name)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """The time inside goes to ``name``; afterwards, back to the phase that was running."""
    if _recorder is None:
        yield
        return
    previous = _recorder.switch(name)
    try:
        yield
    finally:
        _recorder.switch(previous)


def timed(name: str):
    """A decorator: the function's time goes to phase ``name``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


_gc_held = False


def hold_gc() -> None:
    """The start-up of a ``vpipe`` process, with the garbage collector held. Importing torch, Lightning
    and MLflow makes ~0.8M long-lived objects and next to no garbage, yet each of the collector's full
    passes walks them all: ten passes during a one-epoch fit's start-up (~1.5 s on 2 cores) and one more
    as the interpreter exits (~1.6 s). :func:`start_work` freezes what start-up made (no pass walks it
    again) and lets the collector run; at exit everything is frozen, so the last pass has nothing to walk
    (the process's memory goes back to the system with it)."""
    global _gc_held
    if gc.isenabled():
        gc.disable()
        _gc_held = True
    atexit.register(gc.freeze)


def start_work() -> None:
    """The command's own work begins: what start-up made is frozen and the garbage collector runs again
    (a no-op unless ``vpipe``'s ``main`` held it: in a process that only calls ``main(argv)``, e.g. a test)."""
    global _gc_held
    if _gc_held:
        gc.freeze()
        gc.enable()
        _gc_held = False
