"""Helpers for the daemon tests: a real loralabd subprocess per test, over stdio or the websocket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralabd.client import AsyncClient

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random llama (transformers save_pretrained) shared by the daemon tests."""
    from conftest import write_tiny_hf_model

    d = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_hf_model(d, "llama")
    return d


@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"text": f"the quick brown fox jumps over the lazy dog {i}. hello world, this is a tiny tokenizer"}
            for i in range(24)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def env_for(home: Path) -> dict:
    env = dict(os.environ, LORALAB_HOME=str(home), PYTHONPATH=str(ROOT), LORALAB_LOG="WARNING",
               LORALAB_CHECK_RESULTS="1")  # every result and notification checked against protocol.json
    env.pop("XDG_RUNTIME_DIR", None)
    return env


def conn_file(home: Path) -> dict | None:
    files = list((home / "run").glob("loralabd-*.json")) if (home / "run").exists() else []
    if not files:
        return None
    try:
        return json.loads(files[0].read_text())
    except ValueError:
        return None


class Daemon:
    """A websocket daemon subprocess."""

    def __init__(self, home: Path, *args: str):
        self.home = home
        self.log = open(home / "daemon.log", "ab")
        self.proc = subprocess.Popen([PY, "-m", "loralabd.server.main", *args], env=env_for(home),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while True:
            info = conn_file(home)
            if info and info["pid"] == self.proc.pid:
                self.info = info
                break
            if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError(f"daemon did not start: {(home / 'daemon.log').read_text()[-3000:]}")
            time.sleep(0.05)

    @property
    def url(self):
        return self.info["url"]

    async def client(self, **kw) -> AsyncClient:
        return await AsyncClient.connect_ws(self.url, self.info["token"], **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def connect(transport: str, home: Path, daemon: Daemon | None = None) -> AsyncClient:
    if transport == "stdio":
        return await AsyncClient.spawn_stdio(env=env_for(home))
    return await daemon.client()


@pytest.fixture
def server(request, home):
    """Per transport: a factory of connected clients (stdio spawns its daemon; ws shares one)."""
    transport = request.param
    d = Daemon(home) if transport == "ws" else None
    yield transport, home, d
    if d is not None:
        d.stop()
        d.log.close()


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))
