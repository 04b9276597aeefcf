"""The event loop never waits on the disk: with the job journal's write stuck, the daemon still answers.

In-process (the Dispatcher and ModelManager the daemon runs, a recording connection): the journal's
update blocks until the test lets it go, and the test lets it go only after `model/list` has answered —
were the write on the event loop, that answer could never come and the test would hang (the run()
helper's timeout fails it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from daemon_helpers import dataset, run, tiny_model  # noqa: F401


class Recorder:
    def __init__(self):
        self.inflight: dict = {}
        self.closed = False
        self.replies: dict = {}
        self.arrived: dict = {}

    def send(self, msg):
        if "id" in msg:
            self.replies[msg["id"]] = msg
            ev = self.arrived.setdefault(msg["id"], asyncio.Event())
            ev.set()

    def notify(self, method, params):
        pass

    async def reply(self, rid):
        await self.arrived.setdefault(rid, asyncio.Event()).wait()
        return self.replies[rid]


def test_stuck_journal_write_leaves_the_loop_serving(tmp_path, monkeypatch, tiny_model, dataset):  # noqa: F811
    monkeypatch.setenv("LORALAB_HOME", str(tmp_path / "home"))
    from loralabd.server.handlers import Dispatcher
    from loralabd.server.manager import ModelManager

    async def go():
        mgr = ModelManager()
        writing, release = threading.Event(), threading.Event()
        real = mgr.journal.update

        def stuck(jid, **kw):  # the disk hangs (an NFS home, a full fsync queue)
            writing.set()
            assert release.wait(120), "the test never released the journal"
            return real(jid, **kw)

        mgr.journal.update = stuck
        d, conn = Dispatcher(mgr), Recorder()
        d.handle(conn, {"jsonrpc": "2.0", "id": 1, "method": "model/load",
                        "params": {"source": str(tiny_model), "name": "m", "backend": "numpy"}})
        assert "result" in await conn.reply(1)
        d.handle(conn, {"jsonrpc": "2.0", "id": 2, "method": "train/start", "params": {
            "model": "m", "adapter": "a", "dataset": str(dataset), "steps": 2, "batchSize": 2, "seqLen": 32}})
        while not writing.is_set():  # train/start is now inside the journal write
            await asyncio.sleep(0.01)
        d.handle(conn, {"jsonrpc": "2.0", "id": 3, "method": "model/list"})
        listed = await conn.reply(3)
        assert not release.is_set() and listed["result"]["models"][0]["id"] == "m"
        release.set()
        done = await conn.reply(2)
        assert done["result"]["state"] == "completed", done
        await mgr.shutdown()

    run(go(), timeout=300)
