"""Security checks on the websocket, one daemon per data dir, SIGTERM checkpoints, SIGKILL + resume."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from daemon_helpers import PY, Daemon, conn_file, dataset, env_for, home, run, tiny_model  # noqa: F401


@pytest.fixture
def daemon(home):
    d = Daemon(home)
    yield d
    d.stop()


async def _status(url, headers=None):
    try:
        async with ws_connect(url, additional_headers=headers or {}, open_timeout=10) as ws:
            await ws.send('{"jsonrpc":"2.0","id":1,"method":"model/list"}')
            return 101, await ws.recv()
    except InvalidStatus as e:
        return e.response.status_code, e.response.body.decode()


async def _raw_upgrade(port, host, tok, extra=""):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write((f"GET /?token={tok} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
    await w.drain()
    line = await r.readline()
    w.close()
    return line


def test_security_checks(daemon):
    info, url = daemon.info, daemon.url
    tok = info["token"]
    assert stat.S_IMODE(os.stat(next((daemon.home / "run").glob("loralabd-*.json"))).st_mode) == 0o600
    assert info["host"] == "127.0.0.1"

    async def go():
        assert (await _status(url))[0] == 401  # no token
        code, body = await _status(url, {"Authorization": "Bearer wrong" + tok[5:]})
        assert code == 401 and "token" in body
        assert (await _status(url, {"Authorization": f"Bearer {tok}"}))[0] == 101
        assert (await _status(url + f"?token={tok}"))[0] == 101
        assert (await _status(url, {"X-LoraLab-Token": tok}))[0] == 101
        code, body = await _status(url, {"Authorization": f"Bearer {tok}", "Origin": "https://evil.example"})
        assert code == 403 and "Origin" in body
        assert (await _status(url, {"Authorization": f"Bearer {tok}", "Origin": "vscode-webview://abc"}))[0] == 101
        async with ws_connect(url.replace("127.0.0.1", "localhost"), additional_headers={"Authorization": f"Bearer {tok}"}):
            pass  # localhost names the loopback too
        # DNS rebinding: a page on attacker.example resolving to 127.0.0.1 sends its own Host
        assert (await _raw_upgrade(info["port"], f"attacker.example:{info['port']}", tok)).startswith(b"HTTP/1.1 403")
        assert (await _raw_upgrade(info["port"], f"127.0.0.1:{info['port'] + 1}", tok)).startswith(b"HTTP/1.1 403")
        assert (await _raw_upgrade(info["port"], f"127.0.0.1:{info['port']}", tok)).startswith(b"HTTP/1.1 101")
        two = await _raw_upgrade(info["port"], f"127.0.0.1:{info['port']}", tok, extra="Host: evil.example\r\n")
        assert two.startswith(b"HTTP/1.1 400")
    run(go())
    assert daemon.alive()


def test_second_daemon_refuses(daemon):
    p = subprocess.run([PY, "-m", "loralabd.server.main"], env=env_for(daemon.home), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 3
    assert "already uses the data directory" in p.stderr and str(daemon.proc.pid) in p.stderr
    assert daemon.alive() and conn_file(daemon.home)["pid"] == daemon.proc.pid


def test_non_loopback_needs_flag(home):
    p = subprocess.run([PY, "-m", "loralabd.server.main", "--host", "0.0.0.0"], env=env_for(home), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--allow-remote" in p.stderr


# Long enough (hundreds of steps) that a signal sent after step 4 lands mid-run on a fast machine too.
TRAIN = {"model": "tiny", "adapter": "kept", "steps": 400, "batchSize": 4, "seqLen": 64, "lora": {"r": 4},
         "checkpointEvery": 3, "optimizer": {"lr": 1e-2}}


async def _train_until(d, tiny_model, dataset, step):
    c = await d.client()
    await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
    s = c.stream("train/start", {**TRAIN, "dataset": str(dataset)})
    async for ev in s:
        if ev["kind"] == "report" and ev["train"]["step"] >= step:
            return c, ev["train"]["jobId"]
    raise AssertionError("training ended early")


def test_sigterm_checkpoints_then_exits(home, tiny_model, dataset):
    d = Daemon(home)

    async def go():
        c, jid = await _train_until(d, tiny_model, dataset, 4)
        assert d.stop(signal.SIGTERM) == 0
        await c.close()
        return jid
    jid = run(go())
    assert conn_file(home) is None  # removed on the way out
    d2 = Daemon(home)
    try:
        async def check():
            c = await d2.client()
            j = await c.request("train/status", {"jobId": jid})
            await c.close()
            return j
        j = run(check())
        assert j["state"] == "interrupted" and j["resumable"] and j["step"] >= 4  # the last step was checkpointed
    finally:
        d2.stop()


def test_sigkill_restart_resume(home, tiny_model, dataset):
    d = Daemon(home)

    async def go():
        c, jid = await _train_until(d, tiny_model, dataset, 7)
        d.stop(signal.SIGKILL)
        await c.close()
        return jid
    jid = run(go())
    d2 = Daemon(home)  # the lock died with the process; a new daemon starts
    try:
        async def resume():
            c = await d2.client()
            jobs = (await c.request("train/list"))["jobs"]
            j = [x for x in jobs if x["jobId"] == jid][0]
            assert j["state"] == "interrupted" and j["resumable"]
            # the last checkpoint (every 3 steps) before the kill, and it is on disk
            assert j["step"] % 3 == 0 and 6 <= j["step"] < TRAIN["steps"], j
            assert (home / "checkpoints" / jid / f"step-{j['step']:08d}" / "trainer.json").exists()
            s = c.stream("train/resume", {"jobId": jid})
            events = [ev async for ev in s]
            done = await s.result()
            assert done["state"] == "completed" and done["step"] == TRAIN["steps"]
            assert events[0]["kind"] == "begin" and events[0]["train"]["step"] == j["step"]  # continued, not restarted
            g = await c.request("generate", {"model": "tiny", "prompt": "the quick", "maxTokens": 6, "adapter": "kept"})
            assert g["adapterStep"] == TRAIN["steps"] and g["tokens"] >= 1
            base = await c.request("generate", {"model": "tiny", "prompt": "the quick", "maxTokens": 6})
            assert base["adapter"] is None
            with pytest.raises(Exception) as ei:
                await c.request("train/resume", {"jobId": jid})
            assert getattr(ei.value, "code", None) == -32056
            await c.close()
        run(resume(), timeout=300)
    finally:
        d2.stop()


def test_job_outlives_the_client_that_started_it(daemon, tiny_model, dataset):
    async def go():
        c, jid = await _train_until(daemon, tiny_model, dataset, 1)
        await c.close()  # the client goes away mid-run
        await asyncio.sleep(1.0)
        other = await daemon.client()
        j1 = await other.request("train/status", {"jobId": jid})
        await asyncio.sleep(2.0)
        j2 = await other.request("train/status", {"jobId": jid})
        assert j1["state"] == j2["state"] == "running" and j2["step"] > j1["step"] >= 1  # live, still stepping
        done = await other.request("train/cancel", {"jobId": jid})
        assert done["state"] == "cancelled" and done["resumable"]
        await other.close()
    run(go())
