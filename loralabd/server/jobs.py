"""The job journal: one SQLite file in the data dir, so jobs outlive the daemon.

A job row is written when the job starts and after every checkpoint. A daemon that dies mid-run leaves
the row `running`; the next daemon marks such rows `interrupted`, which `train/resume` continues from
the last checkpoint.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

from ..protocol.types import JobInfo

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
  updated REAL NOT NULL
)
"""

RESUMABLE = ("interrupted", "cancelled")
DIVERGED = "diverged"  # how the error of a job whose loss stopped being finite starts (trainer.DivergedError)
FIELDS = ("state", "step", "total_steps", "loss", "tokens_seen", "checkpoint", "error", "params")


class JobJournal:
    def __init__(self, path: Path):
        self.path = path
        # autocommit; WAL so a SIGKILL never leaves a half-written journal
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(SCHEMA)

    def recover(self) -> int:
        """Rows left `running`/`queued` by a daemon that died are `interrupted` now."""
        cur = self.db.execute("UPDATE jobs SET state='interrupted', updated=? WHERE state IN ('running','queued')",
                              (time.time(),))
        return cur.rowcount

    def create(self, kind: str, model: str, adapter: str, params: dict, total_steps: int) -> str:
        jid = uuid.uuid4().hex[:12]
        now = time.time()
        self.db.execute("INSERT INTO jobs (id, kind, state, model, adapter, params, total_steps, created, updated) "
                        "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                        (jid, kind, model, adapter, json.dumps(params), total_steps, now, now))
        return jid

    def update(self, jid: str, **kw) -> None:
        bad = set(kw) - set(FIELDS)
        if bad:
            raise KeyError(f"unknown job fields {bad}")
        if not kw:
            return
        sets = ", ".join(f"{k}=?" for k in kw)
        self.db.execute(f"UPDATE jobs SET {sets}, updated=? WHERE id=?", (*kw.values(), time.time(), jid))

    def get(self, jid: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()
        return dict(row) if row else None

    def list(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY created DESC")]

    def close(self) -> None:
        self.db.close()


def resumable(row: dict) -> bool:
    """Interrupted or cancelled before the end; `failed` by diverging (a non-finite loss) when a checkpoint of before
    was kept: resumed with a lower lr."""
    if row["state"] == "failed":
        return (row["error"] or "").startswith(DIVERGED) and bool(row["checkpoint"])
    return row["state"] in RESUMABLE and int(row["step"]) < int(row["total_steps"])


def job_info(row: dict) -> JobInfo:
    """A journal row as the protocol's JobInfo."""
    return {
        "jobId": row["id"], "kind": row["kind"], "state": row["state"], "model": row["model"],
        "adapter": row["adapter"], "step": int(row["step"]), "totalSteps": int(row["total_steps"]),
        "loss": None if row["loss"] is None else float(row["loss"]), "tokensSeen": int(row["tokens_seen"]),
        "resumable": resumable(row),
        "error": row["error"], "createdAt": float(row["created"]), "updatedAt": float(row["updated"]),
    }
