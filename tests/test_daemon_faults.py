"""Faults end in a state the user can act on: a daemon SIGKILLed at random points of a job, a disk that fills during
a checkpoint or an export, a damaged job journal, damaged or missing checkpoints. The real daemon, the tiny random
model, real files; the full disk is a real tmpfs where one can be mounted and, everywhere, the daemon's test-only
fault-injecting writer (loralabd/faults.py), which also places the SIGKILLs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file

from daemon_helpers import Daemon, dataset, home, run, tiny_model  # noqa: F401 (fixtures)
from loralabd import faults
from loralabd.client import RpcError
from loralabd.server.storage import mount_of

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

@dataclass
class Disk:
    """A data dir on a disk that fills: fill() makes it full, free() gives the space back."""

    path: Path
    mount: Path
    fill: Callable[[], object]
    free: Callable[[], object]


@pytest.fixture(params=["tmpfs", "fault-writer"])
def small_disk(request, tmp_path, monkeypatch):
    """A real 16 MB tmpfs (root only: mount(2); skipped where it cannot be mounted), and everywhere a plain folder
    with the daemon's test-only fault-injecting writer: writes raise ENOSPC, free-space checks see 0 bytes."""
    d = tmp_path / "disk"
    d.mkdir()
    if request.param == "fault-writer":
        control = tmp_path / "disk-control"
        monkeypatch.setenv(faults.DISK, str(control))
        yield Disk(d, mount_of(d), lambda: control.write_text("left=0\nfree=0\n"), control.unlink)
        return
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(d)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); needs root")
    filler: list[Path] = []
    yield Disk(d, d, lambda: filler.append(_fill(d)), lambda: filler.pop().unlink())
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
    home = small_disk.path
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)

            async def fill(jid):
                small_disk.fill()
            stopped = await _stopped_early(c, {**TRAIN, "dataset": str(dataset), "adapter": "full"}, 4, fill)
            jid = stopped["jobId"]
            # interrupted at its last whole checkpoint, resumable, and the error names the disk
            assert stopped["state"] == "interrupted" and stopped["resumable"], stopped
            assert stopped["step"] % 3 == 0 and stopped["step"] == _steps(home, jid)[-1], stopped
            assert "is full" in stopped["error"] and f"mount {small_disk.mount}" in stopped["error"], stopped["error"]
            assert "train/resume" in stopped["error"]
            assert not list((home / "checkpoints" / jid).glob(".tmp-*"))  # the failed write left nothing
            status = await c.request("train/status", {"jobId": jid})
            assert status["state"] == "interrupted" and status["resumable"]  # in memory, whatever the journal could write
            # a new job on the full disk: a storage error naming the disk and what it needs, not an internal error
            with pytest.raises(RpcError) as ei:
                await c.request("train/start", {**TRAIN, "dataset": str(dataset), "adapter": "other"})
            assert ei.value.code == STORAGE_ERROR and f"mount {small_disk.mount}" in ei.value.message, ei.value.message
            assert "needed" in ei.value.message
            with pytest.raises(RpcError) as ei:
                await c.request("train/resume", {"jobId": jid})
            assert ei.value.code == STORAGE_ERROR

            small_disk.free()  # space freed: the same daemon resumes the job
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
    db = sqlite3.connect(str(home / "jobs.sqlite"))  # on disk too, once the disk took it
    assert db.execute("SELECT state, step FROM jobs WHERE id=?", (jid,)).fetchone() == ("completed", TRAIN["steps"])
    db.close()


def test_export_on_a_disk_that_fills_mid_write(home, tiny_model, dataset, tmp_path, monkeypatch):
    """The free-space check passes, then the disk fills while the export is written (the fault-injecting writer
    takes `left` more bytes): a storage error naming the disk, and no half-written export anywhere."""
    control = tmp_path / "disk-control"
    monkeypatch.setenv(faults.DISK, str(control))
    out = tmp_path / "out"
    out.mkdir()
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)
            job = await c.request("train/start", {**TRAIN, "steps": 2, "dataset": str(dataset), "adapter": "a"})
            assert job["state"] == "completed", job
            earlier = await c.request("adapter/export", {"adapter": "a", "format": "peft", "path": str(out / "earlier")})
            kept = {Path(f).name: Path(f).read_bytes() for f in earlier["files"]}
            weights = len(kept["adapter_model.safetensors"])
            # the disk fills inside the weights; then, with the weights fitting, inside the config (the second file)
            for left in (weights // 2, weights + 100):
                for fmt, path, overwrite in (("peft", out / "new", False), ("mlx", out / "new-mlx", False),
                                             ("peft", out / "earlier", True), ("peft", None, False)):
                    if fmt == "mlx" and left > weights:
                        continue  # its files are smaller than PEFT's: they might fit
                    control.write_text(f"left={left}\n")
                    req = {"adapter": "a", "format": fmt, "overwrite": overwrite, **({"path": str(path)} if path else {})}
                    with pytest.raises(RpcError) as ei:
                        await c.request("adapter/export", req)
                    msg = ei.value.message
                    assert ei.value.code == STORAGE_ERROR, (req, msg)
                    target = path or home / "exports" / "a-peft"
                    assert f"exporting 'a' as {fmt} failed: the disk holding {target} (mount " in msg, msg
                    assert "is full" in msg and "needed" in msg and "Errno" not in msg, msg
                    # nothing half-written: no new folder, the earlier export whole, no temp file anywhere
                    assert sorted(p.name for p in out.iterdir()) == ["earlier"], list(out.iterdir())
                    assert {p.name: p.read_bytes() for p in (out / "earlier").iterdir()} == kept
                    assert not list((home / "exports").iterdir())
            control.unlink()  # space freed: the same export goes through
            r = await c.request("adapter/export", {"adapter": "a", "format": "peft", "path": str(out / "new")})
            assert sorted(Path(f).name for f in r["files"]) == sorted(kept)
            await c.close()
        run(go())
    finally:
        assert d.stop() == 0


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


def test_truncated_newest_checkpoint_resumes_from_the_one_before(copy, tiny_model):
    home, kept = copy
    jid = kept["jobId"]
    steps = _steps(home, jid)
    newest = home / "checkpoints" / jid / f"step-{steps[-1]:08d}" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)
            s = c.stream("train/resume", {"jobId": jid})
            events = []
            async for ev in s:
                if not events:  # under way from the older checkpoint: that is all this test needs
                    await c.request("train/cancel", {"jobId": jid})
                events.append(ev)
            done = await s.result()
            begin = events[0]
            assert begin["kind"] == "begin" and begin["train"]["step"] == steps[-2], begin
            assert f"step-{steps[-1]:08d}" in begin["message"] and "bytes, its manifest says" in begin["message"], begin
            assert done["state"] == "cancelled" and done["resumable"], done
            assert f"resumed from step-{steps[-2]:08d}" in done["note"], done["note"]
            await c.close()
        run(go())
    finally:
        assert d.stop() == 0
    assert (home / "checkpoints" / jid / f"step-{steps[-1]:08d}.damaged").is_dir()


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


# -- killed at random points ---------------------------------------------------------------------------------------
# The daemon SIGKILLs itself (loralabd/faults.py, LORALAB_TEST_KILL) at a point drawn from a seeded RNG: before an
# optimizer step, halfway through a checkpoint file or at its rename, halfway through a file of the final adapter or
# at its rename. The next daemon resumes the job; once a daemon runs it to the end, the adapter must be bit-identical
# to an uninterrupted run's.

KILLED = {"model": "tiny", "adapter": "k", "steps": 18, "batchSize": 2, "seqLen": 64, "lora": {"r": 4},
          "checkpointEvery": 3, "optimizer": {"lr": 1e-2}}
POINTS = {"checkpoint": 4, "adapter": 4}  # 3 files and the rename into place, each


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    """The dataset and the adapter bytes of one uninterrupted run of KILLED."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox jumps over the lazy dog {i}. hello world, this "
                                                 "is a tiny tokenizer"}) + "\n" for i in range(24)))
    home = root / "home"
    home.mkdir()
    d = Daemon(home)
    try:
        async def go():
            c = await _client(d, tiny_model)
            done = await c.request("train/start", {**KILLED, "dataset": str(data)})
            assert done["state"] == "completed" and done["step"] == KILLED["steps"], done
            await c.close()
        run(go())
    finally:
        assert d.stop() == 0
    return data, (home / "adapters" / "k" / "adapter_model.safetensors").read_bytes()


def _kill_point(rng: random.Random, start: int, kinds: tuple[str, ...]) -> tuple[str, int]:
    """A point the next daemon reaches when it resumes from step `start`: (kind, its n-th point of that kind)."""
    steps, every = KILLED["steps"], KILLED["checkpointEvery"]
    reach = {"step": steps - start, "checkpoint": POINTS["checkpoint"] * (steps // every - start // every),
             "adapter": POINTS["adapter"]}
    kind = rng.choice([k for k in kinds if reach[k] > 0])
    return kind, rng.randint(1, reach[kind])


def _killed_runs(home: Path, tiny_model: Path, data: Path, plan: list[tuple[str, ...]], seed: int,
                 monkeypatch) -> list[str]:
    """One daemon per entry of plan (the kinds of point to draw its kill from) runs the job (the first starts it, the
    others resume it) until it is killed there; then one more resumes it to the end. The points, as drawn."""
    rng = random.Random(seed)
    start, done = 0, []
    for kinds in [*plan, ()]:
        point = _kill_point(rng, start, kinds) if kinds else None
        if point is None:
            monkeypatch.delenv(faults.KILL, raising=False)
        else:
            monkeypatch.setenv(faults.KILL, f"{point[0]}:{point[1]}")
        d = Daemon(home)  # removes what the killed one left half-written
        left = [*(home / "checkpoints").glob("*/.tmp-step-*"), *(home / "adapters").glob(".k.*")]
        assert not left, left

        async def go():
            c = await _client(d, tiny_model)
            jobs = (await c.request("train/list"))["jobs"]
            if jobs:
                assert len(jobs) == 1 and jobs[0]["state"] == "interrupted" and jobs[0]["resumable"], (done, jobs)
                s = c.stream("train/resume", {"jobId": jobs[0]["jobId"]})
            else:
                s = c.stream("train/start", {**KILLED, "dataset": str(data)})
            events = []
            try:
                async for ev in s:
                    events.append(ev)
                result = await s.result()
            except ConnectionError:  # the daemon is gone
                result = None
            # it continued from the newest whole checkpoint, not from step 0 (a daemon killed at its first step may
            # die before its begin notification is sent)
            assert events or result is None, done
            assert not events or (events[0]["kind"] == "begin" and events[0]["train"]["step"] == start), (done, events[:1])
            await c.close()
            return result
        try:
            result = run(go())
        finally:
            code = d.stop()
            d.log.close()
        if point is None:
            assert code == 0 and result["state"] == "completed" and result["step"] == KILLED["steps"], result
            return done
        assert code == -signal.SIGKILL and result is None, (point, code, result)
        done.append(f"{point[0]}:{point[1]} from step {start}")
        if point[0] == "checkpoint":  # killed mid-write: the half-written checkpoint is there, under its temp name
            assert list((home / "checkpoints").glob("*/.tmp-step-*")), done
        if point[0] == "adapter":
            assert list((home / "adapters").glob(".k.*")) and not (home / "adapters" / "k").exists(), done
        start = max((s for run_dir in (home / "checkpoints").iterdir() for s in _steps(home, run_dir.name)), default=0)
    raise AssertionError("unreachable")


def test_killed_during_a_step_a_checkpoint_and_the_adapter_resumes_exactly(uninterrupted, home, tiny_model,
                                                                           monkeypatch):
    data, reference = uninterrupted
    kills = _killed_runs(home, tiny_model, data, [("step",), ("checkpoint",), ("adapter",)], 12, monkeypatch)
    assert len(kills) == 3, kills
    assert (home / "adapters" / "k" / "adapter_model.safetensors").read_bytes() == reference, kills


@pytest.mark.slow  # eleven daemons on one job, twice
@pytest.mark.parametrize("seed", [2024, 99])
def test_killed_at_ten_random_points_resumes_exactly(uninterrupted, home, tiny_model, monkeypatch, seed):
    data, reference = uninterrupted
    # steps and checkpoints until the run reaches its end; there, the adapter
    plan = [("step", "checkpoint")] * 7 + [("adapter",)] * 3
    kills = _killed_runs(home, tiny_model, data, plan, seed, monkeypatch)
    assert len(kills) == 10
    assert (home / "adapters" / "k" / "adapter_model.safetensors").read_bytes() == reference, kills
