"""The data directory at daemon start: private permissions, and the temp leftovers of a killed daemon removed.

Only the daemon holding the data directory's lock calls these, so no other writer is mid-write there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from pathlib import Path

from .. import paths

log = logging.getLogger("loralabd.datadir")

# What the daemon keeps in the data directory; the privacy fix-up walks only these (LORALAB_HOME may be a
# folder that holds other things too)
OWN_DIRS = ("adapters", "checkpoints", "exports", "logs", "plan", "run")
OWN_FILES = ("jobs.sqlite", "loralabd.lock")  # jobs.sqlite: with its -wal, -shm and any set-aside copy

# Temp names our writers use (a crash between their create and rename leaves them):
#   checkpoint.save_checkpoint  <run>/.tmp-step-NNNNNNNN-PID, <run>/.old-step-NNNNNNNN-PID
#   AdapterStore.save / delete  adapters/.<name>.XXXXXXXX (mkdtemp), .<name>.old-XXXXXXXX (replace_dir),
#                               .<name>.deleted-XXXXXXXX
#   paths.atomic_write_bytes    .<file>.XXXXXXXX.tmp; export writers: .<file>.partial (gguf), .<dir>.XXXXXXXX
_CK_TMP = re.compile(r"^\.tmp-step-\d{8}-\d+$")
_CK_OLD = re.compile(r"^\.old-step-(\d{8})-\d+$")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_STORE_OLD = re.compile(rf"^\.({_NAME})\.old-[0-9a-f]{{8}}$")
_STORE_TMP = re.compile(rf"^\.({_NAME})\.(deleted-[0-9a-f]{{8}}|[a-z0-9_]{{8}})$")
_ATOMIC_TMP = re.compile(rf"^\.{_NAME}\.[a-z0-9_]{{8}}\.tmp$")
_PARTIAL = re.compile(rf"^\.{_NAME}\.partial$")


def make_private(root: Path | None = None) -> int:
    """Data dir 0700; group and other bits off what the daemon keeps in it (an older daemon left 0755/0644).
    Returns how many entries changed. Links are never followed."""
    root = root or paths.data_dir()
    changed = _private(root)
    for p in _entries(root):
        if p.name.startswith(OWN_FILES):
            changed += _private(p)
    for name in OWN_DIRS:
        d = root / name
        if not d.is_dir() or d.is_symlink():
            continue
        changed += _private(d)
        for top, dirs, files in os.walk(d):
            for n in dirs + files:
                changed += _private(Path(top) / n)
    if changed:
        log.info("made %d file(s) and folder(s) in %s private to this user (0700/0600)", changed, root)
    return changed


def _private(p: Path) -> int:
    try:
        st = os.lstat(p)
    except OSError:
        return 0
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077 or st.st_uid != os.getuid():
        return 0
    try:
        os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)
    except OSError as e:
        log.warning("cannot make %s private (%s); fix it with chmod go-rwx", p, e)
        return 0
    return 1


def clean_leftovers(root: Path | None = None) -> list[Path]:
    """Remove the temp files and folders a killed daemon left behind (only our own temp names). Where a
    rename was cut short and only the previous copy is left (.old-*), it is put back instead. Returns what
    was removed."""
    root = root or paths.data_dir()
    removed: list[Path] = []
    ck = root / "checkpoints"
    if ck.is_dir() and not ck.is_symlink():
        for run in _dirs(ck):
            removed += _clean_checkpoints(run)
    for sub in ("adapters", "exports"):
        d = root / sub
        if d.is_dir() and not d.is_symlink():
            removed += _clean_store(d)
    for sub in ("plan",):
        d = root / sub
        if d.is_dir() and not d.is_symlink():
            removed += [_remove(p) for p in _entries(d) if _ATOMIC_TMP.match(p.name)]
    if removed:
        log.warning("removed %d temp leftover(s) of an earlier daemon that was killed: %s", len(removed),
                    ", ".join(str(p.relative_to(root)) for p in removed))
    return removed


def _entries(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except OSError:
        return []


def _dirs(d: Path) -> list[Path]:
    return [p for p in _entries(d) if p.is_dir() and not p.is_symlink()]


def _clean_checkpoints(run: Path) -> list[Path]:
    out = []
    for p in _entries(run):
        m = _CK_OLD.match(p.name)
        if m and not (run / f"step-{m.group(1)}").exists():
            _restore(p, run / f"step-{m.group(1)}")
        elif m or _CK_TMP.match(p.name) or _ATOMIC_TMP.match(p.name):
            out.append(_remove(p))
    return out


def _clean_store(d: Path) -> list[Path]:
    out = []
    for p in _entries(d):
        m = _STORE_OLD.match(p.name)
        if m and not (d / m.group(1)).exists():
            _restore(p, d / m.group(1))
        elif m or _STORE_TMP.match(p.name) or _ATOMIC_TMP.match(p.name) or _PARTIAL.match(p.name):
            out.append(_remove(p))
    return out


def _restore(old: Path, final: Path) -> None:
    """A replace cut between its two renames: the previous copy is complete, so it goes back in place."""
    os.rename(old, final)
    log.warning("put %s back from %s: the daemon was killed while replacing it", final, old.name)


def _remove(p: Path) -> Path:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
    return p
