"""Where LoRA Lab keeps things: one data directory (adapters, checkpoints, the job journal, logs) and a
runtime directory for the connection file of the running daemon.

LORALAB_HOME overrides both (the runtime dir is then $LORALAB_HOME/run), which is what tests use.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from . import faults

APP = "loralab"


def data_dir() -> Path:
    """XDG data dir on Linux, Application Support on macOS, %LOCALAPPDATA% on Windows."""
    if os.environ.get("LORALAB_HOME"):
        p = Path(os.environ["LORALAB_HOME"]).expanduser()
    elif sys.platform == "darwin":
        p = Path.home() / "Library" / "Application Support" / "LoRA Lab"
    elif os.name == "nt":
        p = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "LoRALab"
    else:
        p = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / APP
    p.mkdir(parents=True, exist_ok=True, mode=0o700)  # private: the daemon keeps it 0700 (server/datadir.py)
    return p.resolve()


def runtime_dir() -> Path:
    """Private (0700) directory for the connection file: $XDG_RUNTIME_DIR/loralab where there is one."""
    if os.environ.get("LORALAB_HOME"):
        p = data_dir() / "run"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        p = Path(os.environ["XDG_RUNTIME_DIR"]) / APP
    else:
        p = data_dir() / "run"
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(p, 0o700)
    except OSError:
        pass
    return p


def adapters_dir() -> Path:
    return _sub("adapters")


def checkpoints_dir() -> Path:
    return _sub("checkpoints")


def exports_dir() -> Path:
    return _sub("exports")


def logs_dir() -> Path:
    return _sub("logs")


def _sub(name: str) -> Path:
    p = data_dir() / name
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def connection_file() -> Path:
    """One connection file per data directory, so daemons on different data dirs never collide."""
    tag = hashlib.sha256(str(data_dir()).encode()).hexdigest()[:12]
    return runtime_dir() / f"loralabd-{tag}.json"


def lock_file() -> Path:
    return data_dir() / "loralabd.lock"


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: readers never see half a
    file, and a crash leaves the old file or the new one. `mode` (e.g. 0o600) is set before any byte."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        if mode is not None and hasattr(os, "fchmod"):  # POSIX; Windows profile dirs are private already
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            faults.write(f, data, faults.kind_of(path))  # f.write(data), unless a test injects a fault
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power cut only once the directory is synced
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_private_json(path: Path, obj) -> None:
    """Atomic write of a JSON file only the user can read (mode 0600)."""
    atomic_write_bytes(path, json.dumps(obj).encode("utf-8"), mode=0o600)


def read_connection() -> dict | None:
    """The running daemon's connection info, or None when there is no file or its process is gone."""
    p = connection_file()
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(info.get("pid", 0))):
        return None
    return info


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
