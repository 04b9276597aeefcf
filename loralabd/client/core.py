"""The client: one request/response matcher over two transports (websocket, stdio LSP framing),
streams of `$/progress` and `generate/delta` notifications as async iterators, a sync facade."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .. import paths

STREAM_KEYS = {"train/start": "workDoneToken", "train/resume": "workDoneToken", "train/follow": "workDoneToken",
               "plan/calibrate": "workDoneToken",
               "generate": "partialResultToken"}


class RpcError(Exception):
    def __init__(self, code: int, message: str, data=None):
        super().__init__(f"{message} (error {code})")
        self.code, self.message, self.data = code, message, data


class Stream:
    """Notifications for one token (progress values or generate deltas), then the request's result."""

    sender: asyncio.Future[None]  # the task sending the request (set by AsyncClient.stream)

    def __init__(self, client: "AsyncClient", token, fut: asyncio.Future, queue: asyncio.Queue):
        self.client, self.token, self.fut, self.queue = client, token, fut, queue
        self.id = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            if not self.queue.empty():
                return self.queue.get_nowait()
            if self.fut.done():
                self.client._streams.pop(self.token, None)
                raise StopAsyncIteration
            getter = asyncio.ensure_future(self.queue.get())
            await asyncio.wait([getter, self.fut], return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            getter.cancel()

    async def result(self):
        return await self.fut

    async def cancel(self):
        await self.client.notify("$/cancelRequest", {"id": self.id})


class AsyncClient:
    # set by the transport constructors (connect_ws, spawn_stdio), never by __init__
    ws: Any  # websockets ClientConnection (connect_ws only)
    _send: Callable[[dict], Awaitable[None]]
    _close: Callable[[], Awaitable[None]]

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict = {}
        self._streams: dict = {}
        self.notifications: list = []  # notifications and unmatched replies, in arrival order
        self.on_notification = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.proc: asyncio.subprocess.Process | None = None
        self.started_daemon = None  # pid of the daemon connect() started, if it did

    # -- transports ------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, start: bool = True, timeout: float = 60.0) -> "AsyncClient":
        """Attach to the daemon of this data dir (LORALAB_HOME), starting one when none runs."""
        info = paths.read_connection()
        started = False
        if info is None:
            if not start:
                raise ConnectionError(f"no loralabd runs for {paths.data_dir()}; start one with `loralab serve --detach`")
            info = await asyncio.to_thread(start_daemon, timeout)
            started = True
        c = await cls.connect_ws(info["url"], info["token"])
        c.started_daemon = info["pid"] if started else None
        return c

    @classmethod
    async def connect_ws(cls, url: str, token: str | None, headers: dict | None = None, max_size: int | None = 64 << 20):
        from websockets.asyncio.client import connect

        c = cls()
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        c.ws = await connect(url, additional_headers=h, max_size=max_size, open_timeout=30)

        async def send(obj):
            await c.ws.send(json.dumps(obj))

        async def read():
            from websockets.exceptions import ConnectionClosed
            try:
                async for raw in c.ws:
                    c._on_message(json.loads(raw))
            except ConnectionClosed:
                pass
            c._lost()

        c._send = send
        c._close = c.ws.close
        c._reader = asyncio.get_running_loop().create_task(read())
        return c

    @classmethod
    async def spawn_stdio(cls, argv: list[str] | None = None, env: dict | None = None) -> "AsyncClient":
        """Start `loralabd --stdio` as a child and talk LSP framing over its pipes (as VS Code does)."""
        c = cls()
        argv = argv or [sys.executable, "-m", "loralabd.server.main", "--stdio"]
        c.proc = proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                             stderr=None, env=env, limit=1 << 26)
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None  # both are pipes

        async def send(obj):
            body = json.dumps(obj).encode()
            stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await stdin.drain()

        async def read():
            r = stdout
            try:
                while True:
                    n: int | None = None
                    while True:
                        line = await r.readline()
                        if not line:
                            raise EOFError
                        if line in (b"\r\n", b"\n"):
                            break
                        k, _, v = line.decode().partition(":")
                        if k.strip().lower() == "content-length":
                            n = int(v)
                    assert n is not None, "an LSP frame without Content-Length"  # ends the reader, as before
                    c._on_message(json.loads(await r.readexactly(n)))
            except (EOFError, asyncio.IncompleteReadError, ConnectionError):
                pass
            c._lost()

        async def close():
            if not stdin.is_closing():
                stdin.close()

        c._send, c._close = send, close
        c._reader = asyncio.get_running_loop().create_task(read())
        return c

    # -- messages --------------------------------------------------------------------------------

    def _on_message(self, msg):
        if not isinstance(msg, dict):
            return
        if "method" in msg and "id" not in msg:
            self.notifications.append(msg)
            p = msg.get("params") or {}
            if msg["method"] in ("$/progress", "generate/delta"):
                q = self._streams.get(p.get("token"))
                if q is not None:
                    q.put_nowait(p.get("value") if msg["method"] == "$/progress" else p)
            if self.on_notification:
                self.on_notification(msg)
            return
        fut = self._pending.pop(msg.get("id"), None)
        if fut is None or fut.done():
            self.notifications.append(msg)  # replies to no request of ours (id null parse errors, raw sends)
            return
        if "error" in msg:
            e = msg["error"]
            fut.set_exception(RpcError(e.get("code"), e.get("message"), e.get("data")))
        else:
            fut.set_result(msg.get("result"))

    def _lost(self):
        self._closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the daemon closed the connection"))
                fut.exception()  # retrieved here: an abandoned request must not log "never retrieved"
        self._pending.clear()

    async def send_raw(self, obj) -> None:
        await self._send(obj)

    def _start(self, method: str, params):
        """A request id, its future, and a coroutine that sends it (failing the future if it cannot)."""
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params

        async def send():
            if self._closed:
                raise ConnectionError("the connection to the daemon is closed")
            self._pending[rid] = fut
            try:
                await self._send(msg)
            except Exception as e:  # the transport's own closed-connection errors, as ConnectionError
                self._pending.pop(rid, None)
                raise ConnectionError(f"cannot send to the daemon: {e}") from e
        return rid, fut, send

    async def request(self, method: str, params=None, timeout: float | None = None):
        rid, fut, send = self._start(method, params)
        await send()
        return await (asyncio.wait_for(fut, timeout) if timeout else fut)

    def stream(self, method: str, params: dict) -> Stream:
        """Start a request with a fresh progress/partial-result token; iterate its notifications."""
        key = STREAM_KEYS[method]
        token = uuid.uuid4().hex[:12]
        params = {**params, key: token}
        q: asyncio.Queue = asyncio.Queue()
        self._streams[token] = q
        rid, fut, send = self._start(method, params)
        s = Stream(self, token, fut, q)
        s.id = rid

        async def go():
            try:
                await send()
            except ConnectionError as e:
                if not fut.done():
                    fut.set_exception(e)
        s.sender = asyncio.ensure_future(go())
        return s

    async def notify(self, method: str, params=None) -> None:
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self._send(msg)

    async def initialize(self, name: str = "loralabd-python") -> dict:
        r = await self.request("initialize", {"processId": os.getpid(), "clientInfo": {"name": name},
                                              "rootUri": None, "capabilities": {}})
        await self.notify("initialized", {})
        return r

    async def close(self) -> None:
        if not self._closed:
            try:
                await self._close()
            except Exception:
                pass
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 10)
            except (asyncio.TimeoutError, Exception):
                self._reader.cancel()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def start_daemon(timeout: float = 60.0, extra_args=()) -> dict:
    """Start a detached websocket daemon for this data dir; wait for its connection file."""
    log = open(os.open(paths.logs_dir() / "loralabd.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "loralabd.server.main", *extra_args], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = paths.read_connection()
        if info and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            info = paths.read_connection()
            if info:  # lost a race with another starter: use that daemon
                return info
            tail = (paths.logs_dir() / "loralabd.out").read_text(errors="replace")[-2000:]
            raise ConnectionError(f"loralabd exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.1)
    raise ConnectionError(f"loralabd did not start within {timeout:.0f} s; see {paths.logs_dir() / 'loralabd.out'}")


class Client:
    """Synchronous facade: an event loop on a background thread runs an AsyncClient."""

    def __init__(self, start: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="loralab-client")
        self.thread.start()
        self.ac: AsyncClient = self._run(AsyncClient.connect(start=start))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def request(self, method: str, params=None):
        return self._run(self.ac.request(method, params))

    def stream(self, method: str, params: dict):
        """Yields notifications; returns the result as the generator's value (and stores it in .last_result)."""
        async def make():
            return self.ac.stream(method, params)
        s = self._run(make())
        self.current = s
        while True:
            try:
                yield self._run(s.__anext__())
            except StopAsyncIteration:
                break
        self.last_result = self._run(s.result())
        return self.last_result

    def cancel_current(self):
        s = getattr(self, "current", None)
        if s is not None:
            self._run(s.cancel())

    def close(self):
        self._run(self.ac.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
