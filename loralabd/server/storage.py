"""Writes that fail: a full disk, an I/O error, a read-only mount. Free space is checked before a request
writes, and a failed write becomes an error that names the disk, its free space and what is needed."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

from .. import faults
from ..protocol import ErrorCode
from .errors import DomainError

FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
SQLITE_IOERR, SQLITE_READONLY, SQLITE_FULL = 10, 8, 13  # sqlite3.Error.sqlite_errorcode's low byte
MARGIN = 1 << 20  # the journal, logs and metadata beside what a request writes


def existing(path: Path) -> Path:
    """path, or its nearest ancestor that exists (what an output path not yet created will live on)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def mount_of(path: Path) -> Path:
    p = existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int | None:
    try:
        free = shutil.disk_usage(existing(path)).free
    except OSError:
        return None
    return faults.free_bytes(free) if faults.active() else free  # a test's simulated full disk (faults.py)


def human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk(path: Path) -> str:
    """'the disk holding PATH (mount M, F free)': where a write goes, in the user's words."""
    return f"the disk holding {path} (mount {mount_of(path)}, {human(free_bytes(path))} free)"


def dir_bytes(path: Path) -> int:
    """Bytes of the files under path (0 when it is missing)."""
    total = 0
    for top, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(top, f)).st_size
            except OSError:
                pass
    return total


def is_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in FULL
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == SQLITE_FULL) or "disk is full" in str(e)
    return False


def is_write_fault(e: BaseException) -> bool:
    """A fault of the disk rather than of the daemon: full, an I/O error, read-only (OSError or SQLite's)."""
    if isinstance(e, OSError):
        return e.errno in FULL | {errno.EIO, errno.EROFS}
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        return is_full(e) or (code is not None and code & 0xFF in (SQLITE_IOERR, SQLITE_READONLY))
    return False


def check_space(path: Path, need: int, what: str) -> None:
    """Refuse a write of about `need` bytes under path before it starts, when the disk has less free."""
    free = free_bytes(path)
    if free is not None and free < need + MARGIN:
        raise DomainError(ErrorCode.StorageError,
                          f"not enough free space for {what}: {disk(path)} has less than the "
                          f"{human(need + MARGIN)} needed; free space there (or point LORALAB_HOME at another disk), "
                          "then retry")


def write_failed(e: BaseException, path: Path, what: str, need: int | None = None) -> str:
    """Why a write failed, and what to do: for a message, or a job's error."""
    where = Path(e.filename) if isinstance(e, OSError) and isinstance(e.filename, str) else path
    if is_full(e):
        more = f"; about {human(need + MARGIN)} is needed" if need else ""
        return f"{what} failed: {disk(where)} is full{more}; free space there"
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{what} failed: cannot write {where} ({reason}, on {disk(where)}); check the disk and its permissions"


def storage_error(e: BaseException, path: Path, what: str, need: int | None = None) -> DomainError:
    return DomainError(ErrorCode.StorageError, write_failed(e, path, what, need) + ", then retry")
