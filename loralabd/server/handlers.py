"""One handler table and one dispatch path, shared by every transport (stdio, websocket).

A transport parses a frame into JSON and calls `Dispatcher.handle(conn, message)`; it implements
`Connection.send(dict)`. Everything else — envelope checks, method lookup, params validation against
protocol/, running the handler as a cancellable task, mapping exceptions to error codes — is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, Union

from .. import __version__, paths
from ..errors import LoraLabError, ModelLoadError
from ..protocol import ERROR_HINTS, NOTIFICATIONS, PROTOCOL_VERSION, REQUESTS, ErrorCode, ValidationError, check, \
    check_params, with_defaults
from ..protocol.types import AdapterList, CalibrateParams, CalibrateResult, DatasetInfo, DatasetParams, DatasetSplit, \
    DeviceInfo, EvaluateParams, EvaluateResult, ImportParams, LengthStats, AdapterInfo, \
    Empty, ExportParams, ExportResult, GenerateParams, GenerateResult, InitializeParams, InitializeResult, JobInfo, \
    JobList, JobRef, ModelInfo, ModelList, ModelLoadParams, ModelRef, PlanEstimate, PlanParams, ProgressToken, \
    ResumeParams, TrainFollowParams, TrainParams, TrainProgress, WorkDoneProgressBegin, WorkDoneProgressEnd, \
    WorkDoneProgressReport
from . import access
from .jobs import job_info
from .manager import Job, ModelManager
from .adapters import adapter_info, adapter_meta, list_adapters
from .engines import available_backends, device_probe
from .errors import DomainError
from .generating import generation
from .storage import check_space, dir_bytes, is_write_fault, write_failed
from .planning import calibration_finish, calibration_result, calibration_start, plan_batches, plan_estimate, shape_label, \
    time_shape

log = logging.getLogger("loralabd.rpc")
T = TypeVar("T")
# Tests (and developers) set LORALAB_CHECK_RESULTS=1: every result and notification is checked against
# protocol.json before it is sent, and a mismatch is an internal error instead of a silent drift.
CHECK_RESULTS = os.environ.get("LORALAB_CHECK_RESULTS") == "1"
PROGRESS_INTERVAL = 0.25  # s: at most ~4 progress notifications a second per token
DELTA_INTERVAL = 0.05  # s: generated text is flushed at most 20 times a second

RequestId = Union[int, str]  # a JSON-RPC request id (null ids are refused before a handler runs)
# A request handler: (connection, params validated against protocol.json, request id) -> the result.
Handler = Callable[["Connection", Any, RequestId], Awaitable[Any]]
ProgressValue = Union[WorkDoneProgressBegin, WorkDoneProgressReport, WorkDoneProgressEnd]


def _defaults(structure: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """protocol.with_defaults of a typed params value (it copies, as with_defaults always does)."""
    return with_defaults(structure, dict(p))


class RpcError(Exception):
    def __init__(self, code: int, message: str, data=None):
        super().__init__(message)
        self.code, self.message, self.data = int(code), message, data


def error_obj(code: int, message: str, data=None) -> dict:
    e = {"code": int(code), "message": message}
    if data is not None:
        e["data"] = data
    return e


class Connection:
    """One client. Transports subclass it and implement send(); sends never raise."""

    def __init__(self, name: str):
        self.name = name
        self.inflight: dict[RequestId, asyncio.Task] = {}
        self.closed = False

    def send(self, msg: dict) -> None:
        raise NotImplementedError

    def notify(self, method: str, params: Mapping[str, Any]) -> None:
        if CHECK_RESULTS:
            check(params, NOTIFICATIONS[method]["params"], f"{method} params")  # raises: a daemon bug
        if not self.closed:
            self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def close(self) -> None:
        """The client went away: its requests stop (its training jobs keep running, unwatched)."""
        self.closed = True
        for t in list(self.inflight.values()):
            t.cancel()


class Progress:
    """LSP work-done progress on one token, coalesced: begin and end always go out, reports at most every
    PROGRESS_INTERVAL (the newest wins; a timer or the end flushes the last one)."""

    def __init__(self, conn: Connection, token: ProgressToken):
        self.conn, self.token = conn, token
        self.last_sent = 0.0
        self.pending: WorkDoneProgressReport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def _send(self, value: ProgressValue) -> None:
        self.conn.notify("$/progress", {"token": self.token, "value": value})

    def begin(self, title: str, train: TrainProgress | None = None, message: str | None = None) -> None:
        v: WorkDoneProgressBegin = {"kind": "begin", "title": title, "cancellable": True}
        if train:
            v["train"] = train
        if message:
            v["message"] = message
        self._send(v)
        self.last_sent = time.monotonic()

    def report(self, train: TrainProgress) -> None:
        pct = int(100 * train["step"] / max(train["totalSteps"], 1))
        self._queue({"kind": "report", "percentage": pct, "message": _train_msg(train), "train": train})

    def report_message(self, percentage: int, message: str) -> None:
        """A report without training metrics (e.g. plan/calibrate's shapes)."""
        self._queue({"kind": "report", "percentage": int(percentage), "message": message})

    def _queue(self, value: WorkDoneProgressReport) -> None:
        if self.done:
            return
        self.pending = value
        wait = self.last_sent + PROGRESS_INTERVAL - time.monotonic()
        if wait <= 0:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.pending is not None and not self.done:
            self._send(self.pending)
            self.pending = None
            self.last_sent = time.monotonic()

    def end(self, message: str, train: TrainProgress | None = None) -> None:
        if self.done:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:  # the newest report is never dropped, however short the work
            self._send(self.pending)
            self.pending = None
        self.done = True
        e: WorkDoneProgressEnd = {"kind": "end", "message": message}
        if train:
            e["train"] = train
        self._send(e)


def _train_msg(t: TrainProgress) -> str:
    loss = "-" if t["loss"] is None else f"{t['loss']:.4f}"
    return f"step {t['step']}/{t['totalSteps']} loss {loss} {t['tokensPerSecond']:.0f} tok/s"


class Dispatcher:
    def __init__(self, manager: ModelManager, on_exit: Callable[[int], None] | None = None):
        self.manager = manager
        self.on_exit = on_exit  # called by the `exit` notification with the exit code
        self.shutdown_requested = False
        self.table: dict[str, Handler] = {
            "initialize": self.initialize, "shutdown": self.shutdown, "device/info": self.device_info,
            "model/load": self.model_load, "model/unload": self.model_unload, "model/list": self.model_list,
            "plan/estimate": self.plan_estimate, "plan/calibrate": self.plan_calibrate, "dataset/inspect": self.dataset_inspect,
            "train/start": self.train_start, "train/resume": self.train_resume, "train/cancel": self.train_cancel,
            "train/status": self.train_status, "train/follow": self.train_follow,
            "evaluate": self.evaluate, "train/list": self.train_list, "generate": self.generate,
            "adapter/list": self.adapter_list, "adapter/export": self.adapter_export,
            "adapter/import": self.adapter_import,
        }
        missing = set(REQUESTS) ^ set(self.table)
        assert not missing, f"handler table and protocol.json disagree on {missing}"

    # -- the dispatch path -------------------------------------------------------------------------

    def handle(self, conn: Connection, msg: Any) -> None:
        """Take one parsed message. Never raises; every request gets exactly one answer."""
        try:
            self._handle(conn, msg)
        except Exception:  # a bug here must not end the connection or the daemon
            log.exception("dispatch failed")
            rid = msg.get("id") if isinstance(msg, dict) and _valid_id(msg.get("id")) else None
            conn.send({"jsonrpc": "2.0", "id": rid, "error": error_obj(ErrorCode.InternalError, "internal error in dispatch")})

    def _handle(self, conn: Connection, msg: Any) -> None:
        if isinstance(msg, list):
            return self._reply_error(conn, None, ErrorCode.InvalidRequest,
                                     "batch requests are not supported; send one JSON-RPC message per frame")
        if not isinstance(msg, dict):
            return self._reply_error(conn, None, ErrorCode.InvalidRequest,
                                     f"a JSON-RPC message is an object, got {type(msg).__name__}")
        if "__oversized__" in msg:
            return self._reply_error(conn, None, ErrorCode.InvalidRequest, msg["__oversized__"])
        rid: Any = msg.get("id")  # raw JSON: checked by _valid_id below
        has_id = "id" in msg
        if has_id and not _valid_id(rid):
            return self._reply_error(conn, None, ErrorCode.InvalidRequest, "id must be a string or an integer")
        if msg.get("jsonrpc") != "2.0":
            return self._reply_error(conn, rid, ErrorCode.InvalidRequest, 'missing "jsonrpc": "2.0"')
        method = msg.get("method")
        if method is None:
            if has_id and ("result" in msg or "error" in msg):
                return  # a response; the daemon sends no requests, so there is nothing to match
            return self._reply_error(conn, rid, ErrorCode.InvalidRequest, 'missing "method"')
        if not isinstance(method, str):
            return self._reply_error(conn, rid, ErrorCode.InvalidRequest, '"method" must be a string')
        params = msg.get("params")
        if not has_id:
            return self._notification(conn, method, params)
        handler = self.table.get(method)
        if handler is None:
            return self._reply_error(conn, rid, ErrorCode.MethodNotFound,
                                     f"unknown method {method!r}; this daemon serves: {', '.join(sorted(self.table))}")
        if rid in conn.inflight:
            return self._reply_error(conn, rid, ErrorCode.InvalidRequest, f"request id {rid!r} is already in flight")
        if self.shutdown_requested and method != "shutdown":
            return self._reply_error(conn, rid, ErrorCode.InvalidRequest, "the daemon got `shutdown`; send `exit`")
        try:
            params = check_params(method, params)
        except ValidationError as e:
            return self._reply_error(conn, rid, ErrorCode.InvalidParams, f"invalid params for {method}: {e}")
        task = asyncio.get_running_loop().create_task(self._run(conn, rid, method, handler, params))
        conn.inflight[rid] = task

    async def _run(self, conn: Connection, rid: RequestId, method: str, handler: Handler, params: dict) -> None:
        try:
            result = await handler(conn, params, rid)
            if CHECK_RESULTS:
                check(result, REQUESTS[method]["result"], "result")
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "result": result}
        except asyncio.CancelledError:
            reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(ErrorCode.RequestCancelled,
                                                                        f"{method} cancelled")}
        except RpcError as e:
            reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(e.code, e.message, e.data)}
        except DomainError as e:
            code = e.code
            reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(code, str(e), {"hint": ERROR_HINTS[code]})}
        except ModelLoadError as e:
            code = ErrorCode.ModelLoadFailed
            reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(code, str(e), {"hint": ERROR_HINTS[code]})}
        except LoraLabError as e:
            code = ErrorCode.InvalidSettings
            reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(code, str(e), {"hint": ERROR_HINTS[code]})}
        except Exception as e:
            log.error("%s failed:\n%s", method, traceback.format_exc())
            if is_write_fault(e):  # a full disk, an I/O error: the user's to fix, not a bug
                code = ErrorCode.StorageError
                reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(code, write_failed(e, paths.data_dir(), method)
                                                                         + ", then retry", {"hint": ERROR_HINTS[code]})}
            else:
                reply = {"jsonrpc": "2.0", "id": rid, "error": error_obj(
                    ErrorCode.InternalError, f"internal error in {method}: {type(e).__name__}: {e} (the daemon keeps "
                    f"running; please report this with the log in {paths.logs_dir()})")}
        finally:
            conn.inflight.pop(rid, None)
        if not conn.closed:
            conn.send(reply)

    def _notification(self, conn, method, params):
        if method == "$/cancelRequest":
            if isinstance(params, dict) and _valid_id(params.get("id")):
                t = conn.inflight.get(params["id"])
                if t is not None:
                    t.cancel()
            return
        if method == "exit":
            if self.on_exit:
                self.on_exit(0 if self.shutdown_requested else 1)
            return
        if method != "initialized" and not method.startswith("$/"):
            log.info("ignoring unknown notification %r", method)  # notifications get no answer, by spec

    def _reply_error(self, conn, rid, code, message):
        conn.send({"jsonrpc": "2.0", "id": rid, "error": error_obj(code, message)})

    # -- lifecycle -------------------------------------------------------------------------------

    async def initialize(self, conn: Connection, p: InitializeParams, rid: RequestId) -> InitializeResult:
        info: Mapping[str, Any] = p.get("clientInfo") or {}
        log.info("initialize from %s (%s)", info.get("name", "?"), conn.name)
        return {"capabilities": {}, "serverInfo": {"name": "loralabd", "version": __version__},
                "loralab": {"protocolVersion": PROTOCOL_VERSION, "dataDir": str(paths.data_dir()),
                            "backends": available_backends(), "methods": sorted(self.table), "pid": os.getpid()}}

    async def shutdown(self, conn: Connection, p: Empty, rid: RequestId) -> None:
        self.shutdown_requested = True
        await self.manager.shutdown()
        return None

    async def device_info(self, conn: Connection, p: Empty, rid: RequestId) -> DeviceInfo:
        notes: list[str] = list(self.manager.notes)  # e.g. a damaged job journal set aside at start
        info: DeviceInfo = {"backend": "numpy", "available": ["numpy"], "adapterName": "CPU (numpy)", "adapterType": "cpu",
                "memoryBytes": None, "notes": notes}
        try:
            d = await self.manager.on_device(device_probe)
        except Exception as e:
            d = None
            notes.append(f"WebGPU probe failed ({type(e).__name__}: {e}); the numpy backend is used")
        if d is not None:
            info["backend"] = d["backend"]
            a = d["adapter"]
            if a:
                info["available"] = ["webgpu", "numpy"]
                info["adapterName"] = str(a.get("name") or a.get("device") or "WebGPU adapter")
                info["adapterType"] = str(a.get("type", "unknown")).lower()
                if info["adapterType"] == "cpu":
                    notes.append(f"{info['adapterName']} is a software adapter; `auto` uses the numpy backend, "
                                 "which is faster on a CPU")
            else:
                notes.append("no WebGPU adapter: training and generation run on the CPU (numpy); install a GPU "
                             "driver for the fast path")
        try:
            info["memoryBytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") \
                if info["backend"] == "numpy" else None
        except (ValueError, OSError, AttributeError):
            pass
        return info

    # -- models ----------------------------------------------------------------------------------

    async def model_load(self, conn: Connection, p: ModelLoadParams, rid: RequestId) -> ModelInfo:
        q = _defaults("ModelLoadParams", p)
        await self.manager.on_io(access.model_source, q.get("source"))  # confined under --allow-remote
        e = await self.manager.load(q["source"], q.get("name"), q["backend"], q["weights"])
        return e.info()

    async def model_unload(self, conn: Connection, p: ModelRef, rid: RequestId) -> None:
        await self.manager.unload(p["model"])
        return None

    async def model_list(self, conn: Connection, p: Empty, rid: RequestId) -> ModelList:
        return {"models": self.manager.list_models()}

    async def plan_estimate(self, conn: Connection, p: PlanParams, rid: RequestId) -> PlanEstimate:
        e = self.manager.get(p["model"])
        _check_layers("plan/estimate", p, e.model.args.num_hidden_layers, e.id)
        batches = None
        if p.get("dataset"):  # its real batches: read on a data thread, the model's queue goes on meanwhile
            src = await self.manager.on_io(access.readable, p["dataset"], "dataset")
            prog = Progress(conn, p["workDoneToken"]) if "workDoneToken" in p else None
            told = _ReadReports(prog, p["dataset"], asyncio.get_running_loop())

            def stop() -> None:
                if told.cancelled.is_set():
                    raise asyncio.CancelledError()

            batches = await _with_progress(prog, f"Reading {p['dataset']}", told,
                                           self.manager.on_data(plan_batches, e.model, src, p, told, stop))
        async with e.turn():  # a calibration, when it runs, uses the engine
            return await self.manager.on_device(plan_estimate, e.model, e.engine, p, batches)

    async def plan_calibrate(self, conn: Connection, p: CalibrateParams, rid: RequestId) -> CalibrateResult:
        """Time the model's engine on a few shapes, one device call per shape: progress after each,
        `$/cancelRequest` between them. Holds the model's turn so nothing else runs on it meanwhile."""
        e = self.manager.get(p["model"])
        clock = _defaults("CalibrateParams", p)["clock"]
        prog = Progress(conn, p["workDoneToken"]) if "workDoneToken" in p else None
        t0 = time.perf_counter()
        async with e.turn():
            device, cal, todo = await self.manager.on_device(calibration_start, e.engine, e.model, clock,
                                                              bool(p.get("refresh")))
            if cal is None:
                if prog:
                    prog.begin(f"Calibrating {e.id} on {device.name}")
                samples = []
                try:
                    for i, item in enumerate(todo):
                        if prog:
                            prog.report_message(100 * i // len(todo), f"shape {i + 1}/{len(todo)}: {shape_label(item)}")
                        samples.append(await self.manager.on_device(time_shape, e.engine, item, clock, device))
                except asyncio.CancelledError:
                    if prog:
                        prog.end(f"cancelled after {len(samples)}/{len(todo)} shapes; nothing was cached")
                    raise
                cal = await self.manager.on_device(calibration_finish, e.engine, device, clock, samples,
                                                    time.perf_counter() - t0)
                if prog:
                    prog.end(f"calibrated in {cal.seconds:.1f} s")
                cached = False
            else:
                cached = True
        return calibration_result(e.id, e.engine, device, cal, cached, time.perf_counter() - t0)

    async def dataset_inspect(self, conn: Connection, p: DatasetParams, rid: RequestId) -> DatasetInfo:
        from ..training.data import DatasetError, read_source

        e = self.manager.get(p["model"])
        seq = int(_defaults("DatasetParams", p)["seqLen"])

        def stats(r) -> LengthStats:
            n = sorted(len(x) for x in r.examples)
            return {"min": n[0] if n else 0, "median": float(np.median(n)) if n else 0.0, "max": n[-1] if n else 0,
                    "overSeqLen": sum(1 for q in r.problems if q.kind == "too_long")}

        prog = Progress(conn, p["workDoneToken"]) if "workDoneToken" in p else None
        told = _ReadReports(prog, p["path"], asyncio.get_running_loop())

        def inspect() -> DatasetInfo:
            tok = e.model.tokenizer
            src, valid = access.readable(p["path"]), None
            if src.is_dir() and (src / "train.jsonl").is_file():  # MLX-LM's layout: the splits apart
                valid = src / "valid.jsonl" if (src / "valid.jsonl").is_file() else None
                src = src / "train.jsonl"
            try:
                r = read_source(src, tok, max_seq_len=seq, progress=told)
                v = read_source(valid, tok, max_seq_len=seq, progress=told) if valid is not None else None
            except DatasetError as err:
                raise DomainError(ErrorCode.DatasetError, str(err)) from None
            assert tok is not None  # read_source tokenized the examples with it
            sample = tok.decode(r.examples[0].ids) if r.examples else ""
            if _control_chars(sample):  # text data only: a binary file's bytes are never sent back
                sample = ""
                r.problems.append(_no_sample(r.examples[0].file))
            split: DatasetSplit | None = None
            if v is not None:
                split = {"path": str(valid), "examples": len(v.examples), "tokens": int(sum(len(x) for x in v.examples)),
                         "trainedTokens": int(sum(int(x.mask.sum()) for x in v.examples)), "lengths": stats(v)}
            problems = list(r.problems) + (list(v.problems) if v is not None else [])
            return {"path": p["path"], "format": r.format, "examples": len(r.examples),
                    "tokens": int(sum(len(x) for x in r.examples)),
                    "trainedTokens": int(sum(int(x.mask.sum()) for x in r.examples)), "sample": sample[:4000],
                    "problems": [{"line": q.line, "file": q.file, "message": f"{q.kind}: {q.message}"} for q in problems],
                    "lengths": stats(r), "validation": split}
        # a data thread, not the device thread: the model's queue (generation, training steps) goes on meanwhile
        return await _with_progress(prog, f"Reading {p['path']}", told, self.manager.on_data(inspect))

    async def evaluate(self, conn: Connection, p: EvaluateParams, rid: RequestId) -> EvaluateResult:
        """Loss over a dataset's labelled tokens, in the model's turn, one device call."""
        from ..training.data import DatasetError, FileResult, read_source
        from ..training.packing import eval_batches

        e = self.manager.get(p["model"])
        q = _defaults("EvaluateParams", p)
        name = q.get("adapter")
        seq, bs = int(q["seqLen"]), int(q["batchSize"])

        def read() -> tuple[Path, FileResult]:
            src = access.readable(q["dataset"])
            if src.is_dir() and (src / "train.jsonl").is_file():
                src = src / "valid.jsonl" if (src / "valid.jsonl").is_file() else src / "train.jsonl"
            try:
                r = read_source(src, e.model.tokenizer, max_seq_len=seq, progress=_ReadReports(None, str(src), None))
            except DatasetError as err:
                raise DomainError(ErrorCode.DatasetError, str(err)) from None
            if not r.examples:
                raise DomainError(ErrorCode.DatasetError, f"{src}: no usable example to evaluate on; check the file "
                                                         "(dataset/inspect lists its problems)")
            return src, r

        def run(adapters: list, src: Path, r: FileResult) -> EvaluateResult:
            tok = e.model.tokenizer
            pad = tok.eos_id if tok is not None and tok.eos_id is not None else 0
            total, n = 0.0, 0
            for b in eval_batches(r.examples, seq, bs, pad, True, q.get("maxBatches")):
                if b.n_targets:
                    total += e.engine.loss(b.tokens, b.labels, adapters, b.segments, b.positions) * b.n_targets
                    n += b.n_targets
            loss = total / max(n, 1)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n, "examples": len(r.examples),
                    "path": str(src), "adapter": name, "adapterStep": None}

        src, data = await self.manager.on_data(read)  # tokenizing: off the model's queue
        async with e.turn():
            adapters, step = [], None
            if name:
                ad, step = await self.manager.adapter(e, name)
                adapters = [(ad, float(q["adapterScale"]))]
            out = await self.manager.on_device(run, adapters, src, data)
        out["adapterStep"] = step
        return out

    # -- training --------------------------------------------------------------------------------

    async def train_start(self, conn: Connection, p: TrainParams, rid: RequestId) -> JobInfo:
        e = self.manager.get(p["model"])
        _check_layers("train/start", p, e.model.args.num_hidden_layers, e.id)
        if await self.manager.on_io(adapter_info, p["adapter"]) is not None and not p.get("overwrite"):
            raise DomainError(ErrorCode.AdapterExists, f"an adapter named {p['adapter']!r} exists; choose another name "
                                               "or pass overwrite: true")
        if self.manager.running_job_for_adapter(p["adapter"]):
            raise DomainError(ErrorCode.AdapterExists, f"a running job already trains {p['adapter']!r}; choose another name")
        await self._check_reads(p)
        params = {k: v for k, v in p.items() if k not in ("workDoneToken", "wait")}
        job = await self.manager.start_job(e, params)
        return await self._follow(conn, job, p)

    async def train_resume(self, conn: Connection, p: ResumeParams, rid: RequestId) -> JobInfo:
        row = self.manager.job_row(p["jobId"])
        if not self.manager.resumable(row):
            raise DomainError(ErrorCode.JobNotResumable, f"job {row['id']} is {row['state']} at step {row['step']}/"
                                                 f"{row['total_steps']}; only interrupted or cancelled jobs resume (and "
                                                 "diverged ones with a checkpoint) — start a new job instead")
        import json

        params = json.loads(row["params"])
        if "lr" in p:  # the journal keeps the job's lr from now on: a later resume continues with it too
            params["optimizer"] = {**(params.get("optimizer") or {}), "lr": p["lr"]}
            await self.manager.journal_update(row["id"], params=json.dumps(params))
        await self._check_reads(params)  # this daemon's rule, which may differ from the one that started the job
        e = await self.manager.ensure(row["model"], params.get("model"))
        params["model"] = e.id
        job = await self.manager.start_job(e, params, jid=row["id"])
        return await self._follow(conn, job, p)

    async def _check_reads(self, p: Mapping[str, Any]) -> None:
        """A training job's data, where this daemon may read it (access.py: confined under --allow-remote)."""
        for key in ("dataset", "validation"):
            if p.get(key):
                await self.manager.on_io(access.readable, p[key], key)

    async def _follow(self, conn: Connection, job: Job, p: TrainParams | ResumeParams) -> JobInfo:
        if "workDoneToken" in p:
            self.manager.follow(job.id, Progress(conn, p["workDoneToken"]))
        if not _defaults("TrainParams", p)["wait"]:
            return job_info(self.manager.job_row(job.id))
        try:
            return await self.manager.wait_job(job.id)
        except asyncio.CancelledError:
            if conn.closed:  # the client went away: the job is the daemon's and keeps running
                raise
            # $/cancelRequest: stop between steps, checkpointed and resumable; answer once it has stopped
            self.manager.cancel(job.id)
            await self.manager.wait_job(job.id)
            raise

    async def train_cancel(self, conn: Connection, p: JobRef, rid: RequestId) -> JobInfo:
        self.manager.cancel(p["jobId"])
        return await self.manager.wait_job(p["jobId"])

    async def train_follow(self, conn: Connection, p: TrainFollowParams, rid: RequestId) -> JobInfo:
        self.manager.follow(p["jobId"], Progress(conn, p["workDoneToken"]))
        if not _defaults("TrainFollowParams", p)["wait"]:
            return job_info(self.manager.job_row(p["jobId"]))
        return await self.manager.wait_job(p["jobId"])

    async def train_status(self, conn: Connection, p: JobRef, rid: RequestId) -> JobInfo:
        return self.manager.info(self.manager.job_row(p["jobId"]))

    async def train_list(self, conn: Connection, p: Empty, rid: RequestId) -> JobList:
        return {"jobs": await self.manager.list_jobs()}

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, conn: Connection, p: GenerateParams, rid: RequestId) -> GenerateResult:
        """The whole generation runs on the device thread (one hop); its text deltas come back to the event
        loop through call_soon_threadsafe, coalesced to at most one notification per DELTA_INTERVAL."""
        e = self.manager.get(p["model"])
        name = p.get("adapter")
        scale = float(_defaults("GenerateParams", p)["adapterScale"])
        token = p.get("partialResultToken")
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def send(text: str, index: int) -> None:
            conn.notify("generate/delta", {"token": token, "index": index, "text": text})

        async with e.turn():  # the model's queue: whole generations, in arrival order, between training steps
            adapters, step = [], None
            if name:
                ad, step = await self.manager.adapter(e, name)
                adapters = [(ad, scale)]

            def run():
                g = generation(e.engine, e.model, p, adapters, stop.is_set)
                buf, last = "", time.monotonic()
                for d in g:
                    buf += d.text
                    if token is not None and buf and time.monotonic() - last >= DELTA_INTERVAL:
                        loop.call_soon_threadsafe(send, buf, len(g.token_ids))
                        buf, last = "", time.monotonic()
                if token is not None and buf:
                    loop.call_soon_threadsafe(send, buf, len(g.token_ids))
                return g

            t0 = time.monotonic()
            inner = asyncio.ensure_future(self.manager.on_device(run))
            try:
                g = await asyncio.shield(inner)
            except asyncio.CancelledError:
                stop.set()  # the device thread stops before its next token
                with contextlib.suppress(BaseException):
                    await inner
                raise
        dt = max(time.monotonic() - t0, 1e-9)
        return {"text": g.text, "tokens": len(g.token_ids), "finishReason": g.stats.finish_reason or "length",
                "tokensPerSecond": len(g.token_ids) / dt, "adapter": name, "adapterStep": step,
                "promptTokens": len(g.prompt_ids), "timeToFirstTokenSeconds": float(g.stats.time_to_first_token_s)}

    # -- adapters --------------------------------------------------------------------------------

    async def adapter_list(self, conn: Connection, p: Empty, rid: RequestId) -> AdapterList:
        return {"adapters": await self.manager.on_io(list_adapters)}

    async def adapter_export(self, conn: Connection, p: ExportParams, rid: RequestId) -> ExportResult:
        from .export_bridge import export_adapter, export_merged

        out = Path(p["path"]).expanduser() if p.get("path") else paths.exports_dir()
        if p["format"] != "merged":
            need = await self.manager.on_io(dir_bytes, paths.adapters_dir() / p["adapter"])  # about the adapter's size
            check_space(out, need, f"exporting {p['adapter']!r} as {p['format']}")
            return await self.manager.on_device(export_adapter, p)
        meta = await self.manager.on_io(adapter_meta, p["adapter"])
        e = self.manager.get(p["model"]) if p.get("model") else self.manager.model_for_base(meta.get("base_model"))
        check_space(out, 2 * e.info()["numParameters"], f"exporting {p['adapter']!r} merged into {e.id} (f16 weights)")
        async with e.turn():  # the merge reads the model's weights
            ad, _ = await self.manager.adapter(e, p["adapter"])
            return await self.manager.on_device(export_merged, p, e.model, ad)

    async def adapter_import(self, conn: Connection, p: ImportParams, rid: RequestId) -> AdapterInfo:
        from .export_bridge import import_peft

        e = self.manager.get(p["model"])
        if await self.manager.on_io(adapter_info, p["name"]) is not None and not p.get("overwrite"):
            raise DomainError(ErrorCode.AdapterExists, f"an adapter named {p['name']!r} exists; choose another name "
                                                       "or pass overwrite: true")
        return await self.manager.on_io(import_peft, p, e.model, e.source)


class _ReadReports:
    """A dataset read's progress(done, total), called on the reading thread about once per MiB: to `$/progress`
    when the request has a token, to the log every few seconds; once the request is cancelled it raises there,
    so the read stops at its next report instead of running on."""

    def __init__(self, prog: Progress | None, what: str, loop: asyncio.AbstractEventLoop | None):
        self.prog, self.what, self.loop = prog, what, loop
        self.cancelled = threading.Event()
        self.logged = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.cancelled.is_set():
            raise asyncio.CancelledError()
        msg = f"read {done / 2**20:.0f} of {total / 2**20:.0f} MiB"
        if self.prog is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.prog.report_message, 100 * done // max(total, 1), msg)
        if time.monotonic() - self.logged >= 5.0:
            self.logged = time.monotonic()
            log.info("%s: %s", self.what, msg)


async def _with_progress(prog: Progress | None, title: str, reports: _ReadReports, work: Awaitable[T]) -> T:
    """Await work (a read on a data thread) between `$/progress` begin and end; a cancel stops the read too."""
    if prog is not None:
        prog.begin(title)
    try:
        out = await work
    except BaseException:
        reports.cancelled.set()
        if prog is not None:
            prog.end("stopped")
        raise
    if prog is not None:
        prog.end("read")
    return out


def _check_layers(method: str, p: TrainParams | PlanParams, n_layers: int, model: str) -> None:
    """lora.layers against the loaded model (the schema cannot know its depth): -32602 naming the valid range,
    before any work (a layer past the end once trained every step, then failed at the save)."""
    layers = (p.get("lora") or {}).get("layers")
    if not layers:
        return
    where = f"invalid params for {method}: params.lora.layers"
    for i, x in enumerate(layers):
        if x >= n_layers:
            raise RpcError(ErrorCode.InvalidParams, f"{where}[{i}]: model {model!r} has {n_layers} layers, numbered "
                                                    f"0 to {n_layers - 1}, got {x}; pick layers in that range, or null "
                                                    "for every layer")
        if x in layers[:i]:
            raise RpcError(ErrorCode.InvalidParams, f"{where}[{i}]: layer {x} is listed twice; list each layer once")


def _control_chars(text: str) -> bool:
    """Control characters other than whitespace: what text data does not hold and binary files do."""
    return any(ord(ch) < 32 and ch not in "\t\n\r\f\v" or 0x7f <= ord(ch) < 0xa0 for ch in text)


def _no_sample(file: str):
    from ..training.data import Problem

    return Problem(file, None, "not_text", "holds control characters, so it looks like binary data rather than text; "
                                           "its sample is left out — check the file")


def _valid_id(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, str)
