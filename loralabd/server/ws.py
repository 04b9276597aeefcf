"""The websocket transport: many clients at once, one Connection per socket, over the one Dispatcher.

Security, checked before the upgrade: a Host header naming the loopback address and our port (DNS
rebinding), an Origin allow-list (browsers always send Origin; scripts send none), and the daemon's
random token in `Authorization: Bearer ...`, `X-LoraLab-Token` or `?token=`, compared in constant time.
Frames over max_size close the socket (1009); the daemon and the other clients carry on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, serve
from websockets.exceptions import ConnectionClosed

from ..protocol import ErrorCode
from .handlers import Connection, Dispatcher, error_obj

log = logging.getLogger("loralabd.ws")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_ORIGINS = ("vscode-webview://", "vscode-file://")  # prefixes; VS Code webviews and desktop


class WsConnection(Connection):
    def __init__(self, ws, name: str):
        super().__init__(name)
        self.ws = ws
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, msg: dict) -> None:
        if not self.closed:
            self.outbox.put_nowait(json.dumps(msg))  # one writer task keeps messages in order

    async def _write(self):
        try:
            while True:
                await self.ws.send(await self.outbox.get())
        except ConnectionClosed:
            self.closed = True

    def close(self) -> None:
        super().close()
        self.writer.cancel()


class WsServer:
    def __init__(self, dispatcher: Dispatcher, host: str, port: int, token: str, max_size: int,
                 allow_origins=(), allow_remote: bool = False):
        self.dispatcher, self.host, self.port, self.token = dispatcher, host, port, token
        self.max_size = max_size
        self.origins = tuple(DEFAULT_ORIGINS) + tuple(allow_origins)
        self.allow_remote = allow_remote
        self.server: Server | None = None
        self.n = 0

    async def start(self):
        self.server = server = await serve(self._serve, self.host, self.port, process_request=self._check,
                                           max_size=self.max_size, max_queue=64, ping_interval=20, ping_timeout=60)
        self.port = server.sockets[0].getsockname()[1]
        return self

    def _check(self, connection, request):
        """Reject before the upgrade: wrong Host, foreign Origin, missing or wrong token."""
        try:
            return self._check_headers(connection, request)
        except Exception as e:  # e.g. a header given twice: refuse, never fail
            return connection.respond(HTTPStatus.BAD_REQUEST, f"bad request headers ({type(e).__name__})\n")

    def _check_headers(self, connection, request):
        h = request.headers
        for one in ("Host", "Origin", "Authorization", "X-LoraLab-Token"):
            if len(h.get_all(one)) > 1:
                return connection.respond(HTTPStatus.BAD_REQUEST, f"{one} given more than once\n")
        if not self.allow_remote:
            host = (h.get("Host") or "").strip().lower()
            name = host.rsplit(":", 1)[0].strip("[]") if host.count(":") <= 1 or host.startswith("[") else host
            port_ok = host.endswith(f":{self.port}")
            if name not in LOOPBACK or not port_ok:
                return connection.respond(HTTPStatus.FORBIDDEN, "Host must be the loopback address and this port\n")
        origin = h.get("Origin")
        if origin is not None and not any(origin == o or (o.endswith("://") and origin.startswith(o)) for o in self.origins):
            log.warning("rejected a connection from Origin %r", origin)
            return connection.respond(HTTPStatus.FORBIDDEN, "Origin not allowed; start loralabd with --allow-origin\n")
        given = ""
        auth = h.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        given = given or (h.get("X-LoraLab-Token") or "").strip()
        if not given:
            q = parse_qs(urlsplit(request.path).query).get("token")
            given = q[0] if q else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "missing or wrong token; read it from the connection file (loralab status)\n")
        return None

    async def _serve(self, ws):
        self.n += 1
        conn = WsConnection(ws, f"ws#{self.n}")
        try:
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                except (ValueError, RecursionError) as e:
                    conn.send({"jsonrpc": "2.0", "id": None,
                               "error": error_obj(ErrorCode.ParseError, f"invalid JSON: {str(e)[:200]}")})
                    continue
                self.dispatcher.handle(conn, msg)
        except ConnectionClosed as e:
            if e.rcvd and e.rcvd.code == 1009 or (e.sent and e.sent.code == 1009):
                log.warning("%s sent a message over %d bytes; closed it", conn.name, self.max_size)
        finally:
            conn.close()

    async def close(self):
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
