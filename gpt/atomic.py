"""Atomic file writes: readers see the old file or the complete new one, never a prefix.

>>> import tempfile; from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> atomic_write_bytes(d / "notes.txt", b"hello")
>>> (d / "notes.txt").read_bytes(), remove_stale_temps(d)
(b'hello', [])

A writer killed mid-write (SIGKILL, power loss) leaves its temp file
``.<name>.tmp-<pid>-<random>`` behind; :func:`remove_stale_temps` deletes those
of processes that no longer run.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterable, Optional, Union

__all__ = ["atomic_write_bytes", "remove_stale_temps", "fsync_dir"]

# A temp name is ".<target name>.tmp-<pid>-<random>". Older versions used
# ".<target name>.tmp-<pid>" (predictable, hence no longer created); both are cleaned.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d{1,12})(?:-[0-9a-f]{16})?")

# Temp files carrying our own pid but older than this module's import were left by an
# earlier process that had the same pid (pids repeat, e.g. pid 1 in every container start).
_IMPORTED_AT = time.time()
_CLOCK_SLACK_S = 2.0  # filesystem timestamps may be coarse or slightly behind time.time()

# O_EXCL: fail rather than open anything already there (a file, or a symlink someone
# planted, even a dangling one); O_NOFOLLOW: never write through a symlink regardless.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
    | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every OS can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Exclusively create an unpredictable temp file beside ``path``: (fd, temp path).

    Mode 0o666 lets the kernel apply the umask (and a directory's default ACL), so
    the final file gets the same permissions as any other file the user creates.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o666), tmp
        except FileExistsError:
            continue  # 64 random bits taken: someone planted it; draw another name
    raise FileExistsError(f"could not create a temporary file beside {path}: 100 random names were taken")


def atomic_write_bytes(path: Union[str, os.PathLike], data) -> None:
    """Write ``data`` (bytes-like) to a new temp file beside ``path``, fsync it, then
    rename it over ``path``.

    >>> atomic_write_bytes("/tmp/tinytensor-doctest.txt", b"complete or absent")  # doctest: +SKIP

    The temp file is in the same directory, so the rename stays on one filesystem
    (atomic). Its name is random and it is created exclusively, so a symlink planted
    at a guessable name is never followed. On any error, Ctrl-C included, it is removed
    and the previous ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)  # replaces a symlink at `path` itself, never its target
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _pid_is_gone(pid: int, mtime: float) -> bool:
    if os.name == "nt":
        return False  # os.kill(pid, 0) would terminate the process on Windows: keep the file
    if pid == os.getpid():
        return mtime < _IMPORTED_AT - _CLOCK_SLACK_S  # an earlier process with our pid
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    except (OverflowError, ValueError):
        return True  # not a pid this system can have
    except OSError:
        return False  # cannot tell: keep the file
    return False


def remove_stale_temps(directory: Union[str, os.PathLike],
                       names: Optional[Iterable[str]] = None) -> list[Path]:
    """Delete temp files that killed writers left in ``directory``; returns what was removed.

    >>> remove_stale_temps("out")  # doctest: +SKIP
    [PosixPath('out/.ckpt.safetensors.tmp-4242-9f86d081884c7d65')]

    Only names of the form ``.<name>.tmp-<pid>[-<random>]`` whose writer process no
    longer exists are removed (restricted to the target ``names`` when given). Links are
    unlinked, never followed; directories and other files are left alone. Only one
    machine's processes are visible: a directory shared between machines must be
    guarded by a lock (the trainer holds one on its out-dir before calling this).
    """
    wanted = None if names is None else set(names)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or (wanted is not None and m["name"] not in wanted):
            continue
        try:
            if not (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
            if _pid_is_gone(int(m["pid"]), mtime):
                os.unlink(entry.path)  # unlink never follows a symlink
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue  # its writer finished (renamed it) or another cleaner got there first
        except OSError:
            continue  # e.g. replaced by a directory meanwhile, or no permission: leave it
    return removed
