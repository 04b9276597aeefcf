"""Where the daemon reads and writes for its clients.

A local daemon reads datasets and writes exports wherever its user can: its clients are that user (the
token is in a 0600 file). A daemon started with --allow-remote serves whoever has the token over the
network, so it reads datasets, models to load and adapters to import, and writes exports, only under the data
directory and the roots given with --allow-path (models installed as packages, the default among them, load too). Paths are checked once resolved (symlinks, `..`); a folder's
every entry is checked too, so a link inside an allowed root cannot reach out of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..protocol import ErrorCode
from .errors import DomainError

log = logging.getLogger("loralabd.access")


@dataclass(frozen=True)
class Access:
    roots: tuple[Path, ...] | None = None  # None: not confined (a local daemon)

    @property
    def confined(self) -> bool:
        return self.roots is not None

    def inside(self, p: Path) -> bool:
        return self.roots is None or any(p == r or p.is_relative_to(r) for r in self.roots)


_access = Access()


def configure(allow_remote: bool, allow_paths: Sequence[str] = ()) -> Access:
    """Set the daemon's rule at start: confined to the data dir and `allow_paths` when it serves remote clients."""
    global _access
    if not allow_remote:
        if allow_paths:
            log.warning("--allow-path has no effect without --allow-remote: a local daemon reads and writes "
                        "wherever its user can")
        _access = Access()
        return _access
    roots = [paths.data_dir()]
    for a in allow_paths:
        r = Path(a).expanduser().resolve()
        if not r.is_dir():
            raise ValueError(f"--allow-path {a}: no such folder; create it or fix the path")
        roots.append(r)
    _access = Access(tuple(dict.fromkeys(roots)))
    log.info("serving remote clients: datasets are read and exports written only under %s",
             ", ".join(map(str, _access.roots or ())))
    return _access


def current() -> Access:
    return _access


def _refuse(path: str, what: str, why: str) -> DomainError:
    roots = ", ".join(map(str, _access.roots or ()))
    return DomainError(ErrorCode.InvalidParams,
                       f"{what} {path}: {why}; this daemon serves remote clients (--allow-remote) and reads and writes "
                       f"only under {roots} — put the file there, or restart the daemon with --allow-path DIR")


def readable(path: str, what: str = "dataset") -> Path:
    """The path a request may read: as given (user-expanded) on a local daemon; on a confined one resolved,
    and with every file under it (a folder) inside the allowed roots."""
    p = Path(path).expanduser()
    if not _access.confined:
        return p
    r = p.resolve()
    if not _access.inside(r):
        raise _refuse(path, what, "is outside the folders this daemon may read")
    if r.is_dir():
        _check_tree(r, path, what)
    return r


def model_source(source: str | None) -> None:
    """Refuse a model/load source this daemon may not read. Always allowed: the default model and models installed
    as packages (the interpreter's site-packages); on a confined daemon any other path only inside the allowed roots,
    as datasets."""
    if not _access.confined or source in (None, "", "default"):
        return
    assert source is not None  # narrowed above
    r = Path(source).expanduser().resolve()
    if any(r == p or r.is_relative_to(p) for p in _package_roots()):
        return
    readable(source, "model")


def _package_roots() -> list[Path]:
    import sysconfig

    from ..errors import DefaultModelMissing
    from ..models.load import default_model_path

    roots = [Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")]
    try:
        roots.append(default_model_path().parent.resolve())  # its wheel, wherever it is installed
    except DefaultModelMissing:  # not installed: nothing to allow
        pass
    return roots


def _check_tree(root: Path, path: str, what: str) -> None:
    """Every entry under root, links followed once each, resolves inside the allowed roots."""
    seen, todo = {root}, [root]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue  # unreadable: the reader reports it
        for e in entries:
            t = Path(e.path).resolve()
            if not _access.inside(t):
                raise _refuse(path, what, f"{e.path} links to {t}, outside the folders this daemon may read")
            if t.is_dir() and t not in seen:
                seen.add(t)
                todo.append(t)


def writable(out: Path, what: str = "export") -> Path:
    """`out` when a request may write there (always on a local daemon; inside the roots once resolved on a
    confined one)."""
    if _access.confined and not _access.inside(out.resolve()):
        raise _refuse(str(out), what, "is outside the folders this daemon may write")
    return out
