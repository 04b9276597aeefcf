"""The model-state manager: loaded models, one serialized queue per model, one device thread, jobs.

- One device thread owns every engine (and so the GPU): all engine work runs there, one call at a time.
- Each model has a FIFO turn (asyncio.Lock hands itself to waiters in arrival order). A request holds
  its model's turn for its whole run; a training job takes the turn for one optimizer step at a time,
  so a `generate` that arrives during training runs between two steps, on a snapshot of the adapter.
- Training jobs belong to the daemon, not to a connection: a client that goes away leaves its job running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import paths
from .jobs import job_info, open_journal, resumable
from ..protocol import ErrorCode
from .adapters import adapter_stamp, load_adapter
from .engines import engine_for
from .errors import DomainError
from .storage import check_space, storage_error, write_failed
from ..training.trainer import DivergedError
from .training import TrainRun, disk_need, load_dataset

if TYPE_CHECKING:
    from ..engine.interface import Engine
    from ..engine.lora import LoraAdapter
    from ..models.load import LoadedModel
    from ..protocol.types import JobInfo, ModelInfo, TrainProgress

log = logging.getLogger("loralabd.manager")
T = TypeVar("T")


class DeviceThread:
    """The single thread that touches engines. await run(fn) is cancel-safe: a cancelled caller still
    waits for the call in flight to finish, so the model's state is never left mid-operation."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await fut
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class ModelEntry:
    id: str
    source: str
    backend: str
    model: LoadedModel
    engine: Engine
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    jobs: set[str] = field(default_factory=set)
    # saved adapters read for this model: name -> (stamp, LoraAdapter, meta). The same object (and so the same
    # GPU slot, uploaded once) serves every request until the adapter is saved again
    adapters: dict[str, tuple[tuple | None, LoraAdapter, dict]] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        async with self.lock:
            yield

    def info(self) -> ModelInfo:
        a, m = self.model.args, self.model
        n_params = sum(t.shape[0] * t.shape[1] for L in m.layers for t in L.linear.values())
        n_params += m.embed_tokens.shape[0] * m.embed_tokens.shape[1] + (0 if m.lm_head is None else m.lm_head.shape[0] * m.lm_head.shape[1])
        return {"id": self.id, "name": m.name, "source": self.source, "backend": self.engine.backend,
                "architecture": a.arch,
                "numLayers": a.num_hidden_layers, "hiddenSize": a.hidden_size, "vocabSize": a.vocab_size,
                "contextLength": int(getattr(a, "max_position_embeddings", 0) or 0), "numParameters": int(n_params),
                "weightBytes": int(m.weight_bytes()), "busy": self.lock.locked()}


class Job:
    """A running training job: its run, its listeners (progress sinks) and how it should stop."""

    def __init__(self, jid: str, entry: ModelEntry, params: dict):
        self.id, self.entry, self.params = jid, entry, params
        self.run: TrainRun | None = None
        self.stop_as: str | None = None  # "cancelled" | "interrupted": stop after the current step
        self.task: asyncio.Task[JobInfo] | None = None
        self.sinks: list[Any] = []  # Progress objects (handlers.py imports this module)
        self.started = time.monotonic()


class ModelManager:
    def __init__(self) -> None:
        self.device = DeviceThread()
        # disk work (the journal's fsync'd writes, the adapter store) runs here, in order, off the event loop
        self.io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="io")
        # reading and tokenizing datasets (seconds to minutes) runs here: off the model's queue and the journal's
        self.data = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="data")
        self.models: dict[str, ModelEntry] = {}
        self.jobs: dict[str, Job] = {}
        self._loading: dict[str, asyncio.Future] = {}
        # a damaged journal is set aside and rebuilt from the checkpoints; the note goes to device/info
        self.journal, note = open_journal(paths.data_dir() / "jobs.sqlite", paths.checkpoints_dir())
        self.notes: list[str] = [note] if note else []
        self.shutting_down = False

    # -- models ----------------------------------------------------------------------------------

    def get(self, model_id: str) -> ModelEntry:
        e = self.models.get(model_id)
        if e is None:
            loaded = ", ".join(self.models) or "none"
            raise DomainError(ErrorCode.ModelNotLoaded, f"model {model_id!r} is not loaded (loaded: {loaded}); "
                                                "load it with model/load (loralab models --load PATH)")
        return e

    async def load(self, source: str | None, name: str | None, backend: str = "auto", weights: str = "q4_1") -> ModelEntry:
        from ..models.load import load_model

        src = "default" if source in (None, "", "default") else str(Path(source).expanduser().resolve())
        mid = name or ("default" if src == "default" else Path(src).stem if Path(src).is_file() else Path(src).name)
        if mid in self.models:
            e = self.models[mid]
            if e.source != src:
                raise DomainError(ErrorCode.ModelLoadFailed, f"a different model is loaded as {mid!r} ({e.source}); "
                                                     "pass another name, or unload it first")
            return e
        if mid in self._loading:  # two clients loading the same model share one load
            return await asyncio.shield(self._loading[mid])
        fut = asyncio.get_running_loop().create_future()
        self._loading[mid] = fut
        try:
            def _load():
                m = load_model(None if src == "default" else src, weights=weights)
                return m, engine_for(m, backend)

            try:
                model, engine = await self.device.run(_load)
            except DomainError:
                raise
            except Exception as e:
                raise DomainError(ErrorCode.ModelLoadFailed, f"{e}") from e
            entry = ModelEntry(mid, src, backend, model, engine)
            self.models[mid] = entry
            fut.set_result(entry)
            return entry
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else DomainError(ErrorCode.ModelLoadFailed, "load cancelled"))
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._loading[mid]

    async def unload(self, model_id: str) -> None:
        e = self.get(model_id)
        if e.jobs:
            raise DomainError(ErrorCode.ModelBusy, f"job(s) {', '.join(sorted(e.jobs))} train on {model_id!r}; "
                                           "cancel them with train/cancel first")
        async with e.turn():  # wait for its queue to drain
            self.models.pop(model_id, None)
            await self.device.run(e.engine.close)  # WebGPU: free the device memory now, not at GC

    def list_models(self) -> list[ModelInfo]:
        return [e.info() for e in self.models.values()]

    def model_for_base(self, base: str | None) -> ModelEntry:
        """The loaded model an adapter was trained on (its stored base source)."""
        for e in self.models.values():
            if base is not None and e.source == base:
                return e
        raise DomainError(ErrorCode.ModelNotLoaded, f"the adapter's base model ({base or 'unknown'}) is not loaded; "
                                                    "load it with model/load, or pass model")

    async def ensure(self, source: str, name: str | None = None) -> ModelEntry:
        """The loaded model with this source, else load it (under `name` when that id is free)."""
        for e in self.models.values():
            if e.source == source:
                return e
        return await self.load(source, name if name not in self.models else None)

    # -- jobs ------------------------------------------------------------------------------------

    async def journal_update(self, jid: str, **fields) -> None:
        await self.on_io(lambda: self.journal.update(jid, **fields))

    async def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the device thread (the only thread that touches engines), cancel-safe (DeviceThread.run)."""
        return await self.device.run(fn, *args)

    async def on_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the I/O thread (disk work that must not stall the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def on_data(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on a data thread (dataset reading and tokenizing): generation and training steps go on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.data, fn, *args)

    def job_row(self, jid: str) -> dict:
        row = self.journal.get(jid)
        if row is None:
            raise DomainError(ErrorCode.JobNotFound, f"no job {jid!r}; see train/list (loralab train --list)")
        return row

    def running_job_for_adapter(self, adapter: str) -> Job | None:
        for j in self.jobs.values():
            if j.params.get("adapter") == adapter and j.run is not None:
                return j
        return None

    async def start_job(self, entry: ModelEntry, params: dict, jid: str | None = None) -> Job:
        if self.shutting_down:
            raise DomainError(ErrorCode.ShuttingDown, "the daemon is stopping; start it again with `loralab serve`")
        resume = jid is not None
        if jid is not None and jid in self.jobs:
            raise DomainError(ErrorCode.JobNotResumable, f"job {jid} is running now; follow it with train/status")
        check_space(paths.checkpoints_dir(), disk_need(params, entry.model.args, resume),
                    f"training {params['adapter']!r} (checkpoints of the adapter and its optimizer state, then the adapter)")
        if jid is None:
            try:
                jid = self.journal.create("train", entry.source, params["adapter"], params, params.get("steps", 0))
            except sqlite3.Error as e:
                raise storage_error(e, Path(self.journal.path), "recording the job in the job journal") from None
        row = self.job_row(jid)
        # the job as each checkpoint records it (the journal can be rebuilt from it); a job that got past step 0
        # resumes from a whole checkpoint or not at all
        meta = {"id": jid, "model": entry.source, "adapter": params["adapter"], "params": params, "created": row["created"]}
        need_checkpoint = resume and (int(row["step"]) > 0 or bool(row["checkpoint"]))
        job = Job(jid, entry, params)
        self.jobs[jid] = job
        entry.jobs.add(jid)
        try:
            ds = await self.on_data(load_dataset, entry.model, params)  # tokenizing: off the model's queue
            async with entry.turn():
                job.run = await self.device.run(lambda: TrainRun(entry.engine, entry.model, jid, params, resume, meta,
                                                                 need_checkpoint, ds))
        except BaseException as e:
            self.jobs.pop(jid, None)
            entry.jobs.discard(jid)
            if not resume:
                self.journal.update(jid, state="failed", error=str(e))
            raise
        note = job.run.note
        if note is not None:  # a warning when a resume passed over damaged checkpoints
            (log.warning if job.run.tr.passed_over else log.info)("job %s: %s", jid, note)
        await self.journal_update(jid, state="running", step=job.run.step_count, total_steps=job.run.total, error=None,
                                  **({"note": note} if note is not None else {}))
        job.task = asyncio.get_running_loop().create_task(self._train(job), name=f"job-{jid}")
        return job

    async def _train(self, job: Job) -> JobInfo:
        run, entry, j = job.run, job.entry, self.journal
        assert run is not None  # start_job sets it before this task starts
        state, error = "completed", None
        try:
            while not run.done and job.stop_as is None:
                async with entry.turn():
                    if job.stop_as is not None:
                        break
                    rep = await self.device.run(run.step)  # checkpoints itself every checkpointEvery steps
                if rep is None:
                    break
                if rep.checkpoint is not None and not run.done:
                    await self.journal_update(job.id, step=rep.step, loss=run.last_loss, tokens_seen=rep.tokens_seen,
                                              checkpoint=str(rep.checkpoint))
                if rep.loss is not None or run.done:  # a report per read of the metrics (<= 4 a second)
                    for s in list(job.sinks):
                        s.report(self.metrics(job))
            if job.stop_as is not None and not run.done:
                state = job.stop_as
            async with entry.turn():  # final checkpoint (and adapter) between steps, never mid-step
                ck = await self.device.run(run.save_checkpoint)
                if run.done:
                    await self.device.run(run.save_adapter, entry.source)
            await self.journal_update(job.id, state=state, step=run.step_count, loss=run.last_loss,
                                      tokens_seen=run.tokens_seen, checkpoint=str(ck))
        except asyncio.CancelledError:
            j.update(job.id, state="interrupted", error="daemon stopped")
            raise
        except OSError as e:  # a checkpoint or the adapter could not be written: resumable from the last whole one
            log.warning("job %s stopped: %s", job.id, e)
            state, error = "interrupted", self._write_failed(job, e)
            lc = run.last_checkpoint
            j.update(job.id, state=state, error=error, step=run.saved_step, checkpoint=None if lc is None else str(lc))
        except DivergedError as e:  # nothing non-finite was written: the last checkpoint resumes, with a lower lr
            log.warning("job %s: %s", job.id, e)
            state, error = "failed", run.diverged(e)
            lc = run.last_checkpoint
            j.update(job.id, state=state, error=error, step=run.saved_step, checkpoint=None if lc is None else str(lc))
        except Exception as e:
            log.exception("job %s failed", job.id)
            state, error = "failed", f"{type(e).__name__}: {e}"
            j.update(job.id, state="failed", error=error, step=run.step_count)
        finally:
            self.jobs.pop(job.id, None)
            entry.jobs.discard(job.id)
            for s in list(job.sinks):
                s.end(f"{state} at step {run.step_count}/{run.total}" + (f": {error}" if error else ""), self.metrics(job))
        row = j.get(job.id)
        assert row is not None  # the journal keeps every job it created
        return job_info(row)

    def metrics(self, job: Job) -> TrainProgress:
        assert job.run is not None  # a job's sinks are only told about a started run
        return job.run.progress()

    def info(self, row: dict) -> JobInfo:
        """JobInfo of a journal row, with live step/loss/tokens while the job runs in this daemon."""
        out = job_info(row)
        job = self.jobs.get(row["id"])
        if job is not None and job.run is not None:
            out["step"], out["loss"] = job.run.step_count, job.run.last_loss
            out["tokensSeen"], out["totalSteps"] = int(job.run.tokens_seen), job.run.total
        return out

    def follow(self, jid: str, sink: Any) -> None:
        """Send a running job's progress to sink (begin now, reports at report cadence, end)."""
        job = self.jobs.get(jid)
        if job is None or job.run is None:
            raise DomainError(ErrorCode.JobNotFound, f"job {jid!r} is not running; see train/list")
        job.sinks.append(sink)
        sink.begin(f"Training {job.params['adapter']}", job.run.progress(), job.run.note)

    async def adapter(self, entry: ModelEntry, name: str) -> tuple[LoraAdapter, int | None]:
        """(adapter, its training step) for a request on entry's model: a running job's adapter is a snapshot
        taken now, between two steps; a saved one comes from the store (read on the device thread)."""
        job = self.running_job_for_adapter(name)
        if job is not None and job.entry is entry:
            run = job.run
            assert run is not None  # running_job_for_adapter only returns started runs
            return await self.device.run(run.snapshot), run.step_count

        def stored() -> tuple[LoraAdapter, dict]:
            stamp = adapter_stamp(name)
            hit = entry.adapters.get(name)
            if hit is not None and stamp is not None and hit[0] == stamp:
                return hit[1], hit[2]
            ad, meta = load_adapter(name, entry.model.args)
            entry.adapters.pop(name, None)
            while len(entry.adapters) >= 8:
                entry.adapters.pop(next(iter(entry.adapters)))
            entry.adapters[name] = (stamp, ad, meta)
            return ad, meta

        ad, meta = await self.device.run(stored)
        return ad, int(meta.get("steps", 0))

    async def list_jobs(self) -> list[JobInfo]:
        return [self.info(r) for r in await self.on_io(self.journal.list)]

    def cancel(self, jid: str, how: str = "cancelled") -> JobInfo:
        row = self.job_row(jid)
        job = self.jobs.get(jid)
        if job is not None and job.stop_as is None:
            job.stop_as = how
        return job_info(row)

    async def wait_job(self, jid: str) -> JobInfo:
        """The job's JobInfo once it has ended (at once when it is not running here)."""
        job = self.jobs.get(jid)
        if job is not None and job.task is not None:
            return await asyncio.shield(job.task)
        return job_info(self.job_row(jid))

    async def shutdown(self) -> None:
        """Stop every job after its current step with a checkpoint (state `interrupted`), then close."""
        self.shutting_down = True
        tasks = []
        for job in list(self.jobs.values()):
            job.stop_as = "interrupted"
            if job.task:
                tasks.append(job.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def resumable(self, row: dict) -> bool:
        return resumable(row)

    def _write_failed(self, job: Job, e: OSError) -> str:
        """A job's error when saving it failed: the disk, what it needs, and how to continue."""
        run = job.run
        assert run is not None  # only a started run saves
        msg = write_failed(e, run.run_dir, f"saving job {job.id} at step {run.step_count}",
                           disk_need(job.params, job.entry.model.args, resume=True))
        return (f"{msg}, then resume it with train/resume (`loralab train --resume {job.id}`); it continues from "
                f"step {run.saved_step}, its last whole checkpoint")
