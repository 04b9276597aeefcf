"""The job journal: one SQLite file in the data dir, so jobs outlive the daemon.

A job row is written when the job starts and after every checkpoint. A daemon that dies mid-run leaves
the row `running`; the next daemon marks such rows `interrupted`, which `train/resume` continues from
the last checkpoint.

Faults end in a state the user can act on:
- a write the disk refuses (full, I/O error) is kept in memory, shown by get/list, and written with the
  next journal call that succeeds; a job is never left `running` in memory after its run stopped;
- a journal that cannot be opened or fails SQLite's integrity check (garbage, truncated, a directory at its
  path, locked by another program) is set aside as `jobs.sqlite.corrupt-<time>` and a new one is rebuilt
  from the checkpoints on disk (each checkpoint's trainer.json carries its job: id, model, adapter, params).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..protocol.types import JobInfo

log = logging.getLogger("loralabd.jobs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  state TEXT NOT NULL,
  model TEXT NOT NULL,
  adapter TEXT NOT NULL,
  params TEXT NOT NULL,
  step INTEGER NOT NULL DEFAULT 0,
  total_steps INTEGER NOT NULL,
  loss REAL,
  tokens_seen INTEGER NOT NULL DEFAULT 0,
  checkpoint TEXT,
  error TEXT,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  note TEXT
)
"""
COLUMNS = ("id", "kind", "state", "model", "adapter", "params", "step", "total_steps", "loss", "tokens_seen",
           "checkpoint", "error", "created", "updated", "note")

RESUMABLE = ("interrupted", "cancelled")
DIVERGED = "diverged"  # how the error of a job whose loss stopped being finite starts (trainer.DivergedError)
FIELDS = ("state", "step", "total_steps", "loss", "tokens_seen", "checkpoint", "error", "note", "params")
BUSY_TIMEOUT = 2.0  # s: another program holding the journal's lock longer than this at start gets it set aside


class JournalError(Exception):
    """The journal cannot be used: unreadable, damaged, or not a database."""


class JobJournal:
    def __init__(self, path: Path | str):
        self.path = path
        self.lock = threading.Lock()  # used from the event loop and the I/O thread
        self.pending: dict[str, dict] = {}  # updates the disk refused: job id -> fields (with `updated`)
        # autocommit; WAL so a SIGKILL never leaves a half-written journal
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            if "note" not in have:  # a journal of an older daemon
                self.db.execute("ALTER TABLE jobs ADD COLUMN note TEXT")
        except BaseException:
            self.db.close()
            raise

    def problem(self) -> str | None:
        """What SQLite's quick check finds wrong with the file (None: it is whole), reading every row too."""
        try:
            rows = [r[0] for r in self.db.execute("PRAGMA quick_check")]
            if rows != ["ok"]:
                return "; ".join(str(r) for r in rows[:3])
            for r in self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs"):
                json.loads(r["params"])
        except (sqlite3.Error, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def recover(self) -> int:
        """Rows left `running`/`queued` by a daemon that died are `interrupted` now."""
        ids = [r["id"] for r in self.list() if r["state"] in ("running", "queued")]
        for jid in ids:
            self.update(jid, state="interrupted")
        return len(ids)

    def create(self, kind: str, model: str, adapter: str, params: dict, total_steps: int) -> str:
        """A new job's row; raises sqlite3.Error when the disk refuses it (the caller says why)."""
        jid = uuid.uuid4().hex[:12]
        now = time.time()
        with self.lock:
            self._flush()
            self.db.execute("INSERT INTO jobs (id, kind, state, model, adapter, params, total_steps, created, updated) "
                            "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                            (jid, kind, model, adapter, json.dumps(params), total_steps, now, now))
        return jid

    def insert(self, row: dict) -> None:
        """A whole row (a job rebuilt from its checkpoints)."""
        with self.lock:
            self.db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            tuple(row.get(c) for c in COLUMNS))

    def update(self, jid: str, **kw) -> bool:
        """Write fields of a job; when the disk refuses, keep them in memory (get/list show them) and write them
        with the next journal call that succeeds. Returns whether they are on disk now."""
        bad = set(kw) - set(FIELDS)
        if bad:
            raise KeyError(f"unknown job fields {bad}")
        if not kw:
            return True
        with self.lock:
            self.pending.setdefault(jid, {}).update(kw, updated=time.time())
            return self._flush()

    def _flush(self) -> bool:
        for jid in list(self.pending):
            kw = self.pending[jid]
            try:
                self.db.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in kw)} WHERE id=?", (*kw.values(), jid))
            except sqlite3.Error as e:
                log.warning("the job journal %s cannot be written (%s); job %s is kept in memory and written "
                            "once the disk takes it", self.path, e, jid)
                return False
            del self.pending[jid]
        return True

    def get(self, jid: str) -> dict | None:
        with self.lock:
            self._flush()
            row = self.db.execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()
            return self._overlay(dict(row)) if row else None

    def list(self) -> list[dict]:
        with self.lock:
            self._flush()
            return [self._overlay(dict(r)) for r in self.db.execute("SELECT * FROM jobs ORDER BY created DESC")]

    def _overlay(self, row: dict) -> dict:
        row.update(self.pending.get(row["id"], {}))
        return row

    def close(self) -> None:
        with self.lock:
            if self.pending and not self._flush():
                log.warning("job journal: %d job(s) not written (%s); the next daemon finds them `interrupted` "
                            "at their last written step", len(self.pending), ", ".join(self.pending))
            self.db.close()


def resumable(row: dict) -> bool:
    """Interrupted or cancelled before the end; `interrupted` at the end too (its adapter was not written); `failed`
    by diverging (a non-finite loss) when a checkpoint of before was kept: resumed with a lower lr."""
    if row["state"] == "failed":
        return (row["error"] or "").startswith(DIVERGED) and bool(row["checkpoint"])
    return row["state"] in RESUMABLE and (int(row["step"]) < int(row["total_steps"]) or row["state"] == "interrupted")


def job_info(row: dict) -> JobInfo:
    """A journal row as the protocol's JobInfo."""
    return {
        "jobId": row["id"], "kind": row["kind"], "state": row["state"], "model": row["model"],
        "adapter": row["adapter"], "step": int(row["step"]), "totalSteps": int(row["total_steps"]),
        "loss": None if row["loss"] is None else float(row["loss"]), "tokensSeen": int(row["tokens_seen"]),
        "resumable": resumable(row), "error": row["error"], "note": row.get("note"),
        "createdAt": float(row["created"]), "updatedAt": float(row["updated"]),
    }


# -- opening, setting aside, rebuilding -----------------------------------------------------------------------

def open_journal(path: Path, checkpoints: Path) -> tuple[JobJournal, str | None]:
    """The journal at path, its dead jobs `interrupted`, and any job whose checkpoints it lacks rebuilt from them.
    A journal that cannot be used is set aside first; the note (None when all is well) says what happened."""
    note = None
    try:
        j = _open_checked(path)
    except JournalError as e:
        aside = _set_aside(path)
        note = f"the job journal {path} could not be used ({e})"
        note += f"; it was moved to {aside.name}" if aside else "; it could not be moved aside either"
        j = _open_fresh(path)
        if j.path == ":memory:":
            note += "; jobs are kept in memory until the daemon stops (fix the data directory, then restart it)"
    n = j.recover()
    if n:
        log.info("%d job(s) from an earlier daemon are interrupted and resumable", n)
    rebuilt = rebuild(j, checkpoints)
    if note is not None:
        note += f"; {len(rebuilt)} job(s) were rebuilt from their checkpoints and can resume"
        log.warning("%s", note)
    elif rebuilt:
        log.warning("%d job(s) missing from the journal were rebuilt from their checkpoints: %s", len(rebuilt),
                    ", ".join(rebuilt))
    return j, note


def _open_checked(path: Path) -> JobJournal:
    if path.exists() and not path.is_file():
        raise JournalError("it is not a file")
    try:
        j = JobJournal(path)
    except (sqlite3.Error, OSError) as e:
        raise JournalError(f"{type(e).__name__}: {e}") from None
    bad = j.problem()
    if bad is not None:
        j.close()
        raise JournalError(bad)
    return j


def _set_aside(path: Path) -> Path | None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("cannot move the damaged job journal %s aside: %s", path, e)
        return None
    for side in ("-wal", "-shm"):  # SQLite's files beside it belong to the old journal
        try:
            os.rename(f"{path}{side}", f"{aside}{side}")
        except OSError:
            pass
    return aside


def _open_fresh(path: Path) -> JobJournal:
    try:
        return JobJournal(path)
    except (sqlite3.Error, OSError) as e:
        log.error("cannot create the job journal %s (%s); jobs are kept in memory until the daemon stops", path, e)
        return JobJournal(":memory:")


def rebuild(j: JobJournal, checkpoints: Path) -> list[str]:
    """Rows for the jobs in checkpoints/<job>/ the journal lacks, from their newest whole checkpoint: `interrupted`
    (resumable), or `completed` when the adapter store holds this job's adapter at its last step."""
    try:
        runs = sorted(p for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else []
        known = {r["id"] for r in j.list()}
    except (OSError, sqlite3.Error) as e:
        log.warning("cannot look for jobs to rebuild in %s: %s", checkpoints, e)
        return []
    out = []
    for run in runs:
        if run.name in known:
            continue
        row = _row_from_checkpoints(run)
        if row is None:
            continue
        try:
            j.insert(row)
        except sqlite3.Error as e:
            log.warning("cannot write the rebuilt job %s: %s", run.name, e)
            continue
        out.append(run.name)
    return out


def _row_from_checkpoints(run: Path) -> dict | None:
    from ..training.checkpoint import newest_good_checkpoint

    found = newest_good_checkpoint(run)
    meta = found.meta or {}
    job = meta.get("job")
    if found.path is None or not isinstance(job, dict) or job.get("id") != run.name:
        log.info("%s: no checkpoint that names its job (written by an older daemon, or damaged); not rebuilt", run)
        return None
    step, total = int(meta["step"]), int(job["totalSteps"])
    loss = next((h["loss"] for h in reversed(meta.get("history", [])) if h.get("loss") is not None), None)
    now = time.time()
    state = "completed" if step >= total and _adapter_done(job, step) else "interrupted"
    return {"id": run.name, "kind": "train", "state": state, "model": job["model"], "adapter": job["adapter"],
            "params": json.dumps(job["params"]), "step": step, "total_steps": total, "loss": loss,
            "tokens_seen": int(meta.get("tokens_seen", 0)), "checkpoint": str(found.path), "error": None,
            "created": float(job.get("created", now)), "updated": now,
            "note": f"rebuilt from its checkpoint {found.path.name}: the job journal had lost this job"}


def _adapter_done(job: dict, step: int) -> bool:
    from .adapters import adapter_meta
    from .errors import DomainError

    try:
        meta = adapter_meta(job["adapter"])
    except (DomainError, OSError, ValueError):
        return False
    return meta.get("jobId") == job["id"] and int(meta.get("steps", -1)) == step
