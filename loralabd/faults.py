"""Fault injection for the test suite only (tests/test_daemon_faults.py). Never set these variables in normal use.

The hooks sit in the real write paths (checkpoints, the adapter store, exports, paths.atomic_write_bytes) and do
nothing unless one of two test-only environment variables is set in the daemon's environment:

LORALAB_TEST_KILL=<kind>:<n>   the process SIGKILLs itself at the n-th point of that kind it reaches:
    step        before an optimizer step (server/training.py)
    checkpoint  each file of a checkpoint, killed with half of it written, and the rename into place
    adapter     each file of an adapter saved into the store, half written, and the rename into place
LORALAB_TEST_DISK=<file>       a disk that fills, for where a small tmpfs cannot be mounted. <file> holds lines
    `left=<bytes>`: what writes through write() may still put down; a write that does not fit puts down what
    fits, then raises OSError(ENOSPC) as a full disk does. `free=<bytes>` (optional): what the free-space checks
    (server/storage.py) see; without it they see the real disk, as when another program fills it after the
    check. No file: no limit (a test removes it to "free space").
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path
from typing import BinaryIO, NoReturn

KILL, DISK = "LORALAB_TEST_KILL", "LORALAB_TEST_DISK"
KINDS = ("step", "checkpoint", "adapter")

_lock = threading.Lock()
_seen: dict[str, int] = {}


def active() -> bool:
    return bool(os.environ.get(KILL) or os.environ.get(DISK))


def point(kind: str) -> None:
    """A place a test may kill the process at (LORALAB_TEST_KILL)."""
    if os.environ.get(KILL) and _kill_here(kind):
        _die()


def write(f: BinaryIO, data: bytes, kind: str = "file") -> None:
    """f.write(data), cut short where a test asks: by a SIGKILL halfway (LORALAB_TEST_KILL) or a full disk
    (LORALAB_TEST_DISK)."""
    if not active():
        f.write(data)
        return
    if os.environ.get(KILL) and _kill_here(kind):
        f.write(data[: len(data) // 2])
        f.flush()
        _die()
    fits = _take(len(data))
    if fits < len(data):
        f.write(data[:fits])
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    f.write(data)


def kind_of(path: Path) -> str:
    """"adapter" for a file of the adapter store (<data>/adapters/...), else "file"."""
    if not os.environ.get(KILL):
        return "file"
    from .paths import data_dir

    return "adapter" if Path(path).absolute().is_relative_to(data_dir() / "adapters") else "file"


def free_bytes(real: int) -> int:
    """What a free-space check sees: the real free space, or less where LORALAB_TEST_DISK says `free=`."""
    free = _disk().get("free")
    return real if free is None else min(real, free)


def _kill_here(kind: str) -> bool:
    want, _, n = os.environ.get(KILL, "").partition(":")
    if want != kind:
        return False
    with _lock:
        _seen[kind] = _seen.get(kind, 0) + 1
        return _seen[kind] == int(n)


def _die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    while True:  # the signal is on its way: this thread does nothing more meanwhile
        time.sleep(1)


def _disk() -> dict[str, int]:
    p = os.environ.get(DISK)
    if not p:
        return {}
    try:
        text = Path(p).read_text()
    except FileNotFoundError:
        return {}
    return {k.strip(): int(v) for k, _, v in (ln.partition("=") for ln in text.splitlines() if "=" in ln)}


def _take(n: int) -> int:
    """Bytes of n the simulated disk still takes (all of them without LORALAB_TEST_DISK); what it took is used up."""
    with _lock:
        d = _disk()
        if "left" not in d:
            return n
        fits = max(0, min(n, d["left"]))
        if fits:
            d["left"] -= fits
            Path(os.environ[DISK]).write_text("".join(f"{k}={v}\n" for k, v in d.items()))
        return fits
