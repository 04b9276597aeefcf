"""Faults end in a state the user can act on: a disk that fills during a checkpoint, a damaged job journal, damaged
or missing checkpoints. The real daemon, the tiny random model, real files (and a real tmpfs for the full disk)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from daemon_helpers import Daemon, dataset, home, run, tiny_model  # noqa: F401 (fixtures)
from loralabd.client import RpcError

# Long enough that a job stopped at its first progress report is mid-run; a checkpoint every 3 steps
TRAIN = {"model": "tiny", "steps": 150, "batchSize": 2, "seqLen": 64, "lora": {"r": 4}, "checkpointEvery": 3,
         "optimizer": {"lr": 1e-2}}
STORAGE_ERROR, NOT_RESUMABLE = -32063, -32056


async def _client(d: Daemon, tiny_model: Path):
    c = await d.client()
    await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
    return c


async def _stopped_early(c, params: dict, at_step: int, action) -> dict:
    """Start a job, call action(jobId) at the first report at or past at_step; the job's final JobInfo."""
    s = c.stream("train/start", params)
    acted = False
    async for ev in s:
        if not acted and ev["kind"] == "report" and ev["train"]["step"] >= at_step:
            await action(ev["train"]["jobId"])
            acted = True
    assert acted, "the job ended before the first report"
    return await s.result()


def _adapter(home: Path, name: str) -> dict[str, np.ndarray]:
    return load_file(str(home / "adapters" / name / "adapter_model.safetensors"))


def _steps(home: Path, jid: str) -> list[int]:
    return sorted(int(p.name[5:]) for p in (home / "checkpoints" / jid).glob("step-????????"))


# -- a data directory with a finished job ("ref") and the same job cancelled early ("kept") ----------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("faults")
    home = root / "home"
    home.mkdir()
    data = root / "data.jsonl"
    rows = [{"text": f"the quick brown fox jumps over the lazy dog {i}. hello world, this is a tiny tokenizer"}
            for i in range(24)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)
            ref = await c.request("train/start", {**TRAIN, "dataset": str(data), "adapter": "ref"})
            assert ref["state"] == "completed" and ref["step"] == TRAIN["steps"]

            async def cancel(jid):
                await c.request("train/cancel", {"jobId": jid})
            kept = await _stopped_early(c, {**TRAIN, "dataset": str(data), "adapter": "kept"}, 4, cancel)
            assert kept["state"] == "cancelled" and kept["resumable"] and 4 <= kept["step"] < TRAIN["steps"]
            await c.close()
            return kept
        kept = run(go())
    finally:
        assert d.stop() == 0
    assert len(_steps(home, kept["jobId"])) >= 2  # step 3 and the stop's own checkpoint at least
    return home, kept


@pytest.fixture
def copy(trained, tmp_path):
    src, kept = trained
    home = tmp_path / "home"
    shutil.copytree(src, home, symlinks=True, ignore=shutil.ignore_patterns("daemon.log", "run"))
    return home, kept


# -- a full disk --------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB tmpfs (root only: mount(2)); skipped where it cannot be mounted."""
    d = tmp_path / "disk"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(d)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); needs root")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(d: Path) -> Path:
    """Write zeros until the disk says it is full."""
    f = d / "filler"
    with open(f, "wb", buffering=0) as out:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            try:
                while True:
                    out.write(bytes(chunk))
            except OSError:
                pass
    return f


@pytest.mark.slow  # two runs to the end
def test_disk_full_during_a_checkpoint_interrupts_and_resumes(small_disk, tiny_model, dataset):
    d = Daemon(small_disk)
    filler: list[Path] = []
    try:
        async def go():
            c = await _client(d, tiny_model)

            async def fill(jid):
                filler.append(_fill(small_disk))
            stopped = await _stopped_early(c, {**TRAIN, "dataset": str(dataset), "adapter": "full"}, 4, fill)
            jid = stopped["jobId"]
            # interrupted at its last whole checkpoint, resumable, and the error names the disk
            assert stopped["state"] == "interrupted" and stopped["resumable"], stopped
            assert stopped["step"] % 3 == 0 and stopped["step"] == _steps(small_disk, jid)[-1], stopped
            assert "is full" in stopped["error"] and f"mount {small_disk}" in stopped["error"], stopped["error"]
            assert "train/resume" in stopped["error"]
            assert not list((small_disk / "checkpoints" / jid).glob(".tmp-*"))  # the failed write left nothing
            status = await c.request("train/status", {"jobId": jid})
            assert status["state"] == "interrupted" and status["resumable"]  # in memory, whatever the journal could write
            # a new job on the full disk: a storage error naming the disk and what it needs, not an internal error
            with pytest.raises(RpcError) as ei:
                await c.request("train/start", {**TRAIN, "dataset": str(dataset), "adapter": "other"})
            assert ei.value.code == STORAGE_ERROR and f"mount {small_disk}" in ei.value.message, ei.value.message
            assert "needed" in ei.value.message
            with pytest.raises(RpcError) as ei:
                await c.request("train/resume", {"jobId": jid})
            assert ei.value.code == STORAGE_ERROR

            filler[0].unlink()  # space freed: the same daemon resumes the job
            s = c.stream("train/resume", {"jobId": jid})
            events = [ev async for ev in s]
            done = await s.result()
            assert events[0]["kind"] == "begin" and events[0]["train"]["step"] == stopped["step"]
            assert done["state"] == "completed" and done["step"] == TRAIN["steps"] and done["error"] is None, done
            await c.close()
            return jid
        jid = run(go())
    finally:
        assert d.stop() == 0
    db = sqlite3.connect(str(small_disk / "jobs.sqlite"))  # on disk too, once the disk took it
    assert db.execute("SELECT state, step FROM jobs WHERE id=?", (jid,)).fetchone() == ("completed", TRAIN["steps"])
    db.close()


# -- a damaged job journal ----------------------------------------------------------------------------------------

def _garbage(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).bytes(16384))


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2 + 100])


def _text(p: Path) -> None:
    p.write_text("jobs: none, this is a note someone saved over the journal\n" * 40)


def _zeroed_page(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[4096:8192] = bytes(4096)  # page 2: the jobs table's root
    p.write_bytes(bytes(b))


def _directory(p: Path) -> None:
    p.unlink()
    (p / "x").mkdir(parents=True)


FORMS = {"garbage": _garbage, "truncated": _truncated, "text": _text, "zeroed-page": _zeroed_page,
         "directory": _directory, "locked": None}


@pytest.mark.parametrize("form", list(FORMS))
def test_damaged_journal_is_set_aside_and_rebuilt(copy, form, tiny_model):
    home, kept = copy
    journal = home / "jobs.sqlite"
    assert journal.stat().st_size > 8192 and not (home / "jobs.sqlite-wal").exists()  # closed cleanly: one file
    holder = None
    if form == "locked":  # another program holds an exclusive lock on it
        holder = sqlite3.connect(str(journal), isolation_level=None)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE jobs SET step=step")
    else:
        FORMS[form](journal)
    d = Daemon(home)  # starts: no traceback, no exit 1
    try:
        async def go():
            c = await d.client()
            info = await c.request("device/info")
            assert any("jobs.sqlite" in n and "corrupt-" in n for n in info["notes"]), info["notes"]
            jobs = {j["adapter"]: j for j in (await c.request("train/list"))["jobs"]}
            j = jobs["kept"]
            assert j["jobId"] == kept["jobId"] and j["state"] == "interrupted" and j["resumable"], j
            assert j["step"] == kept["step"] and "rebuilt" in j["note"], j
            assert jobs["ref"]["state"] == "completed" and not jobs["ref"]["resumable"]  # its adapter was written
            if form == "garbage":  # a rebuilt job resumes to the end
                await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
                done = await c.request("train/resume", {"jobId": j["jobId"]})
                assert done["state"] == "completed" and done["step"] == TRAIN["steps"], done
            await c.close()
        run(go())
    finally:
        assert d.stop() == 0
        if holder is not None:
            holder.close()
    aside = list(home.glob("jobs.sqlite.corrupt-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], list(home.iterdir())
    assert journal.is_file()  # a new journal in its place
    if form == "directory":
        assert (aside[0] / "x").is_dir()  # moved, not deleted


# -- damaged or missing checkpoints -------------------------------------------------------------------------------

@pytest.mark.slow  # two runs to the end
def test_flipped_bit_resumes_from_the_previous_checkpoint(copy, tiny_model):
    home, kept = copy
    jid = kept["jobId"]
    steps = _steps(home, jid)
    newest = home / "checkpoints" / jid / f"step-{steps[-1]:08d}" / "state.safetensors"
    b = bytearray(newest.read_bytes())
    b[-100] ^= 0x04  # one bit of the optimizer state
    newest.write_bytes(bytes(b))
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)
            s = c.stream("train/resume", {"jobId": jid})
            events = [ev async for ev in s]
            done = await s.result()
            begin = events[0]
            assert begin["kind"] == "begin" and begin["train"]["step"] == steps[-2]  # the older whole one
            assert f"step-{steps[-1]:08d}" in begin["message"] and "SHA-256" in begin["message"], begin
            assert done["state"] == "completed" and done["step"] == TRAIN["steps"]
            assert f"resumed from step-{steps[-2]:08d}" in done["note"], done["note"]
            await c.close()
        run(go())
    finally:
        assert d.stop() == 0
    assert (home / "checkpoints" / jid / f"step-{steps[-1]:08d}.damaged").is_dir()  # set aside, kept for a look
    # resuming from any whole checkpoint is exact: the same adapter as the uninterrupted run's
    got, ref = _adapter(home, "kept"), _adapter(home, "ref")
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


def test_resume_without_a_whole_checkpoint_refuses(copy, tiny_model):
    home, kept = copy
    jid = kept["jobId"]
    run_dir = home / "checkpoints" / jid
    for s in _steps(home, jid):  # every checkpoint truncated
        f = run_dir / f"step-{s:08d}" / "state.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)
            with pytest.raises(RpcError) as ei:
                await c.request("train/resume", {"jobId": jid})
            assert ei.value.code == NOT_RESUMABLE and "no whole checkpoint left" in ei.value.message, ei.value.message
            assert "bytes, its manifest says" in ei.value.message
            shutil.rmtree(run_dir)  # every checkpoint gone: refused too, never a silent start from step 0
            with pytest.raises(RpcError) as ei:
                await c.request("train/resume", {"jobId": jid})
            assert ei.value.code == NOT_RESUMABLE and "no checkpoint" in ei.value.message, ei.value.message
            j = await c.request("train/status", {"jobId": jid})
            assert j["state"] == "cancelled" and j["step"] == kept["step"]  # left as it was
            await c.close()
        run(go())
    finally:
        assert d.stop() == 0
    assert not run_dir.exists()
