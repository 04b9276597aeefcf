"""The stdio transport: LSP framing (Content-Length headers), as vscode-languageclient speaks.

Frames are read here (FrameReader), not by pygls: a frame whose Content-Length is wrong (too short, too long) or
whose body is not JSON is answered with an error, and reading resynchronizes at the next `Content-Length:`
header, so the requests after a bad frame are still answered. pygls writes the framed replies. Messages go
as plain JSON to the one Dispatcher, which validates params itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from pygls.io_ import StdoutWriter
from pygls.protocol import JsonRPCProtocol, default_converter
from pygls.server import JsonRPCServer

from ..protocol import ErrorCode
from .handlers import Connection, Dispatcher, error_obj

log = logging.getLogger("loralabd.stdio")

MARK = b"Content-Length:"
MAX_HEADERS = 8192  # bytes of one frame's header block; more is not a header
_LENGTH = re.compile(rb"Content-Length:[ \t]*(\d{1,15})[ \t]*\r?$")


class _RawProtocol(JsonRPCProtocol):
    """pygls's protocol, used to write framed replies; reading is FrameReader's."""


class FrameReader:
    """LSP frames from a byte stream: next() gives one body (bytes) at a time, None at the end of the stream.

    Bytes before a `Content-Length:` header are skipped (what is left of a frame whose length was too short);
    unparsable headers are reported and skipped; bodies over max_size are read and dropped in chunks (never
    held). push_back() returns bytes to the stream (the next frame, found inside a body whose length was too
    long)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], max_size: int, on_error: Callable[[str], None]):
        self.read, self.max_size, self.on_error = read, max_size, on_error
        self.buf = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = await self.read()
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def push_back(self, data: bytes) -> None:
        self.buf[:0] = data

    def _skip(self, n: int) -> None:
        junk = bytes(self.buf[:n])
        del self.buf[:n]
        if junk.strip():
            log.warning("stdio: skipped %d bytes that are not an LSP frame: %r", len(junk), junk[:80])

    async def next(self) -> bytes | None:
        while True:
            i = self.buf.find(MARK)
            if i < 0:
                self._skip(max(0, len(self.buf) - len(MARK) + 1))  # keep what may be the start of a header
                if not await self._fill():
                    return None
                continue
            self._skip(i)
            end, sep = self._header_end()
            if end < 0:
                if len(self.buf) > MAX_HEADERS:
                    self.on_error(f"an LSP header block longer than {MAX_HEADERS} bytes; skipped to the next "
                                  "Content-Length header")
                    self._skip(len(MARK))
                elif not await self._fill():
                    return None
                continue
            n = self._length(bytes(self.buf[:end]))
            del self.buf[:end + sep]
            if n is None:
                continue
            if n > self.max_size:
                return await self._drop(n)
            while len(self.buf) < n:
                if not await self._fill():
                    return None
            body = bytes(self.buf[:n])
            del self.buf[:n]
            return body

    def _header_end(self) -> tuple[int, int]:
        """(index of the blank line ending the header block, its length), or (-1, 0) while incomplete."""
        head = bytes(self.buf[:MAX_HEADERS + 4])
        ends = [(k, len(s)) for s in (b"\r\n\r\n", b"\n\n") if (k := head.find(s)) >= 0]
        return min(ends) if ends else (-1, 0)

    def _length(self, headers: bytes) -> int | None:
        for line in headers.split(b"\n"):
            m = _LENGTH.fullmatch(line)
            if m:
                return int(m.group(1))
            if line.startswith(MARK):
                break
        self.on_error(f"bad LSP header {headers.splitlines()[0][:80]!r}: expected `Content-Length: <bytes>`; "
                      "skipped to the next Content-Length header")
        return None

    async def _drop(self, n: int) -> bytes:
        left = n - len(self.buf[:n])
        del self.buf[:n]
        while left > 0:
            if not await self._fill():
                break
            k = min(left, len(self.buf))
            del self.buf[:k]
            left -= k
        return json.dumps({"__oversized__": f"message of {n} bytes exceeds the limit of {self.max_size} bytes; "
                                            "send smaller messages (e.g. a dataset path, not its content)"}).encode()


def _leading_json(body: bytes) -> tuple[Any, bytes]:
    """(the JSON value at the start of body, the bytes after it), or (None, body) when none parses there."""
    text = body.decode("utf-8", "surrogateescape")
    try:
        value, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except (ValueError, RecursionError):
        return None, body
    return value, text[end:].encode("utf-8", "surrogateescape")


def _stdin_chunks(stdin) -> Callable[[], Awaitable[bytes]]:
    """Whatever bytes stdin has (at least one; b"" at its end), read in the default executor."""
    read = getattr(stdin, "read1", None) or (lambda n: stdin.read(1))

    def chunk() -> Awaitable[bytes]:
        return asyncio.get_running_loop().run_in_executor(None, read, 1 << 16)
    return chunk


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
        self.dispatch: Callable[[Any], None] = lambda m: dispatcher.handle(self.conn, m)
        self.proto.set_writer(StdoutWriter(stdout or sys.stdout.buffer), include_headers=True)
        self.reader = FrameReader(_stdin_chunks(stdin or sys.stdin.buffer), max_size, self._frame_error)
        self.stop_event = threading.Event()

    def _frame_error(self, message: str) -> None:
        log.warning("stdio: %s", message)
        self.conn.send({"jsonrpc": "2.0", "id": None, "error": error_obj(ErrorCode.ParseError, message)})

    def _take(self, body: bytes) -> None:
        """Parse one frame's body and dispatch it. A body that is not JSON was framed wrongly: it goes back to the
        reader, which skips to the next `Content-Length:` header in it or after it. When its Content-Length was
        too long (a JSON message, then the start of the next frame), the message is still served."""
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            head, rest = _leading_json(body)
            self.reader.push_back(rest)
            if head is not None and MARK.startswith(rest.lstrip()[:len(MARK)]) and rest.strip():
                self.dispatch(head)
                return
            self._frame_error(f"invalid JSON: {str(exc)[:200]} (a frame of {len(body)} bytes; if its Content-Length "
                              "was wrong, what follows is read from the next Content-Length header)")
            return
        self.dispatch(msg)

    async def run(self) -> None:
        """Serve until stdin closes (the client went away)."""
        while not self.stop_event.is_set():
            body = await self.reader.next()
            if body is None:
                break
            self._take(body)
        self.conn.close()
