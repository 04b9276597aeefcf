"""loralabd: the daemon. `loralabd` serves a websocket on loopback; `loralabd --stdio` serves one client
over stdio with LSP framing (VS Code). Both go through one Dispatcher and one ModelManager.

One daemon per data directory (a lock file); the websocket daemon writes a connection file (port,
token, pid; mode 0600) that clients read. SIGTERM/SIGINT checkpoint running jobs, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
import time

from .. import __version__, paths

log = logging.getLogger("loralabd")
EXIT_LOCKED = 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="loralabd", description="LoRA Lab daemon: plan, train, generate, export "
                                 "over JSON-RPC (websocket, or stdio with LSP framing).")
    ap.add_argument("--stdio", action="store_true", help="serve one client over stdin/stdout (LSP framing)")
    ap.add_argument("--ws", action="store_true", help="with --stdio: serve the websocket too")
    ap.add_argument("--host", default="127.0.0.1", help="websocket bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="websocket port (default: any free port, see the connection file)")
    ap.add_argument("--allow-remote", action="store_true",
                    help="allow a non-loopback --host (anyone who can reach it and has the token can use your GPU)")
    ap.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                    help="an extra browser Origin allowed to connect (repeatable)")
    ap.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                    help="with --allow-remote: a folder clients may read datasets from and export to, besides the "
                         "data directory (repeatable)")
    ap.add_argument("--max-message-mb", type=float, default=8.0, help="largest accepted message (default 8 MB)")
    ap.add_argument("--log-level", default=os.environ.get("LORALAB_LOG", "INFO"))
    ap.add_argument("--version", action="version", version=f"loralabd {__version__}")
    a = ap.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.allow_remote:
        ap.error(f"--host {a.host} is not loopback; add --allow-remote if you really mean to expose the daemon")
    for d in a.allow_path:
        if not os.path.isdir(os.path.expanduser(d)):
            ap.error(f"--allow-path {d}: no such folder; create it or fix the path")
    return a


def setup_logging(level: str) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    h = logging.StreamHandler(sys.stderr)  # never stdout: that is the stdio transport
    h.setFormatter(fmt)
    root.addHandler(h)
    logging.getLogger("pygls").setLevel(logging.WARNING)  # it logs every message body at INFO
    try:
        f = logging.FileHandler(paths.logs_dir() / "loralabd.log")
        f.setFormatter(fmt)
        root.addHandler(f)
    except OSError:
        pass


def acquire_lock():
    """An exclusive lock on the data dir, held for the process lifetime; None when another daemon has it."""
    p = paths.lock_file()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows: best effort through the connection file
        pass
    except OSError:
        try:
            other = os.pread(fd, 32, 0).decode().strip()
        except OSError:
            other = "?"
        os.close(fd)
        return None, other
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, None


async def serve(a) -> int:
    from .handlers import Dispatcher
    from .manager import ModelManager

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    code = {"exit": 0}

    def on_exit(c):
        code["exit"] = c
        stop.set()

    manager = ModelManager()
    dispatcher = Dispatcher(manager, on_exit=on_exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    max_size = int(a.max_message_mb * 1024 * 1024)
    ws = None
    tasks = []
    if not a.stdio or a.ws:
        from .ws import WsServer

        if a.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("binding %s: anyone who reaches this address and has the token can use this daemon", a.host)
        token = secrets.token_urlsafe(32)
        ws = await WsServer(dispatcher, a.host, a.port, token, max_size, a.allow_origin, a.allow_remote).start()
        host = "127.0.0.1" if a.host == "localhost" else a.host
        url_host = f"[{host}]" if ":" in host else host
        paths.write_private_json(paths.connection_file(), {
            "pid": os.getpid(), "host": host, "port": ws.port, "token": token, "url": f"ws://{url_host}:{ws.port}/",
            "dataDir": str(paths.data_dir()), "version": __version__, "started": time.time()})
        log.info("loralabd %s serving ws://%s:%d/ (data %s, connection file %s)", __version__, url_host, ws.port,
                 paths.data_dir(), paths.connection_file())
    if a.stdio:
        from .stdio import StdioTransport

        out = sys.stdout.buffer
        sys.stdout = sys.stderr  # a stray print() must not corrupt the framing
        st = StdioTransport(dispatcher, max_size, stdout=out)

        async def stdio_main():
            await st.run()
            stop.set()  # the client closed stdin
        tasks.append(loop.create_task(stdio_main()))
        log.info("loralabd %s serving stdio (data %s)", __version__, paths.data_dir())
    await stop.wait()
    log.info("stopping: checkpointing running jobs")
    await manager.shutdown()
    if ws is not None:
        try:
            info = paths.read_connection()
            if info and info.get("pid") == os.getpid():
                paths.connection_file().unlink()
        except OSError:
            pass
        await ws.close()
    manager.journal.close()
    log.info("stopped")
    return code["exit"]


def main(argv=None) -> None:
    a = parse_args(argv)
    os.umask(0o077)  # what the daemon writes (data dir, journal, logs, checkpoints, exports) is its user's alone
    setup_logging(a.log_level)
    fd, other = acquire_lock()
    if fd is None:
        print(f"loralabd: another daemon (pid {other}) already uses the data directory {paths.data_dir()}; "
              "use it (`loralab status`), stop it (`loralab stop`), or set LORALAB_HOME to another directory",
              file=sys.stderr)
        sys.exit(EXIT_LOCKED)
    from . import access, datadir

    datadir.make_private()  # an older daemon's 0755/0644 data dir
    datadir.clean_leftovers()  # ours alone now (the lock): temp files of a daemon that was killed
    access.configure(a.allow_remote, a.allow_path)
    # Not asyncio.run: it joins the default executor, where the stdio reader may sit in a blocking read of
    # a stdin that stays open, and the daemon would never exit (holding the data-directory lock).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    rc = loop.run_until_complete(serve(a))
    logging.shutdown()
    sys.stderr.flush()
    os._exit(rc)  # the stdio reader thread may sit in a blocking read; nothing is left to clean up


if __name__ == "__main__":
    main()
