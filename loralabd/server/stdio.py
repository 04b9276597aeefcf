"""The stdio transport: LSP framing (Content-Length headers) through pygls, as vscode-languageclient speaks.

pygls does the framing (reading headers and bodies, writing framed replies). Its typed dispatch is
bypassed: messages arrive as plain JSON and go to the one Dispatcher, which validates params itself
(pygls would answer nothing at all when typed params fail to parse).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, Callable

from pygls.io_ import StdinAsyncReader, StdoutWriter, run_async
from pygls.protocol import JsonRPCProtocol, default_converter
from pygls.server import JsonRPCServer

from ..protocol import ErrorCode
from .handlers import Connection, Dispatcher, error_obj

log = logging.getLogger("loralabd.stdio")


class _RawProtocol(JsonRPCProtocol):
    """pygls's protocol with its message typing replaced by a hand-off of the raw JSON."""

    dispatch: Callable[[Any], None] | None = None  # set by StdioTransport

    def structure_message(self, data):
        return data

    def handle_message(self, message):
        assert self.dispatch is not None, "StdioTransport sets dispatch before reading"
        self.dispatch(message)


class _LimitedReader:
    """Bodies over max_size are read and dropped in chunks (never held), and reported as an error."""

    def __init__(self, inner, max_size: int):
        self.inner, self.max_size = inner, max_size

    def readline(self):
        return self.inner.readline()

    async def readexactly(self, n: int) -> bytes:
        if n <= self.max_size:
            return await self.inner.readexactly(n)
        left = n
        while left > 0:
            chunk = await self.inner.readexactly(min(left, 1 << 20))
            if not chunk:
                return b""
            left -= len(chunk)
        return json.dumps({"__oversized__": f"message of {n} bytes exceeds the limit of {self.max_size} bytes; "
                                            "send smaller messages (e.g. a dataset path, not its content)"}).encode()


class StdioConnection(Connection):
    def __init__(self, proto: JsonRPCProtocol):
        super().__init__("stdio")
        self.proto = proto

    def send(self, msg: dict) -> None:
        if self.closed:
            return
        try:
            self.proto._send_data(msg)
        except (BrokenPipeError, OSError, ValueError):
            self.closed = True


class StdioTransport:
    def __init__(self, dispatcher: Dispatcher, max_size: int, stdin=None, stdout=None):
        self.server = JsonRPCServer(_RawProtocol, default_converter)
        proto = self.server.protocol
        assert isinstance(proto, _RawProtocol)  # JsonRPCServer made it from the class above
        self.proto = proto
        self.conn = StdioConnection(self.proto)
        self.proto.dispatch = lambda m: dispatcher.handle(self.conn, m)
        self.proto.set_writer(StdoutWriter(stdout or sys.stdout.buffer), include_headers=True)
        self.reader = _LimitedReader(StdinAsyncReader(stdin or sys.stdin.buffer), max_size)
        self.stop_event = threading.Event()

    def _error(self, exc, source):
        if isinstance(exc, (ValueError, RecursionError)):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.conn.send({"jsonrpc": "2.0", "id": None,
                            "error": error_obj(ErrorCode.ParseError, f"invalid JSON: {str(exc)[:200]}")})
        else:
            log.error("stdio transport error: %r", exc)

    async def run(self) -> None:
        """Serve until stdin closes (the client went away)."""
        await run_async(self.stop_event, self.reader, self.proto, log, self._error)
        self.conn.close()
