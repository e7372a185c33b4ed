"""Replacing a store folder without ever losing the finished one: flush to disk, swap atomically
(:func:`replace_dir`), and finish or undo what a killed writer left behind (:func:`clean_stale`).
``VPIPE_FAULT=STEP[,STEP...]`` kills the process at the named steps (:func:`fault`): the crash tests."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if sys.platform != "linux" or "no-exchange" in os.environ.get("VPIPE_FAULT", "").split(","):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(src: Path, dst: Path) -> None:
    """Put the finished folder ``src`` at ``dst``, replacing an existing ``dst``; crash-safe.

    ``src`` is flushed to disk first. An existing ``dst`` is swapped with ``src`` in one atomic
    exchange, then the old store (now under ``src``'s temporary name) is removed. Without the
    exchange, ``dst`` is renamed aside and ``src`` renamed in; a kill between the two is finished by
    :func:`clean_stale`, and a failing second rename puts the old store back.
    """
    _fsync_tree(src)
    fault("store-written")
    if not dst.exists():
        os.rename(src, dst)
        _fsync_dir(dst.parent)
        return
    if _exchange(src, dst):
        _fsync_dir(dst.parent)
        fault("store-swapped")
        shutil.rmtree(src, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{os.getpid()}-", dir=dst.parent))
    os.rmdir(old)
    os.rename(dst, old)
    fault("store-moved-old")
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _fsync_dir(dst.parent)
    fault("store-swapped")
    shutil.rmtree(old, ignore_errors=True)


def fault(step: str) -> None:
    """Fault injection for the crash tests: ``VPIPE_FAULT=step[,step…]`` kills this process with
    SIGKILL when it reaches one of the named steps. Unset in normal use."""
    if step in os.environ.get("VPIPE_FAULT", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(out: Path) -> list[Path]:
    """Temporary folders of ``out`` whose process is gone: ``.NAME.tmp-PID-…`` and ``.NAME.old-PID-…``."""
    found = []
    for path in out.parent.glob(f".{out.name}.*-*"):
        parts = path.name[len(out.name) + 2 :].split("-")
        if (
            len(parts) >= 2
            and parts[0] in ("tmp", "old")
            and parts[1].isdigit()
            and not _pid_alive(int(parts[1]))
        ):
            found.append(path)
    return found


def _finished(folder: Path) -> bool:
    """A store folder whose writer got to the end (meta.json is written last, after the data)."""
    return (folder / "meta.json").is_file() and (folder / "index.csv").is_file()


def clean_stale(out: Path) -> None:
    """Remove temporary folders of ``out`` left by runs that were killed (their process is gone).

    A replacement killed between its two renames (only where the atomic exchange is unavailable)
    left no store under ``out``: the finished new store is moved into place (or, without one, the old
    store moved back) before anything is removed.
    """
    stale = _stale(out)
    if not out.exists():
        finished = sorted(
            (p for p in stale if _finished(p)),
            key=lambda p: (p.name[len(out.name) + 2 :].startswith("tmp"), p.stat().st_mtime),
        )
        if finished:
            os.rename(finished[-1], out)
            _fsync_dir(out.parent)
            stale.remove(finished[-1])
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
