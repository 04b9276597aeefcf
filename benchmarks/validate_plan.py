"""The plan against real jobs: predicted time and memory beside what the daemon's jobs took, measured from outside.

    python benchmarks/validate_plan.py --backend numpy                      # this CPU, the default model
    python benchmarks/validate_plan.py --backend webgpu --random-weights \\
        --tokenizer-gguf smollm2-tokenizer.gguf --out $OUT/validate_plan.json   # a GPU machine

What runs, as a new user would: a private LORALAB_HOME; one daemon (`python -m loralabd.server.main`, as
bench_daemon.py starts it) loads the model and runs `plan/calibrate`, then stops. Then, for each configuration, a
fresh daemon: `model/load`, `plan/estimate` (the configuration, `steps`, the job's dataset and seed — the plan
prices the batches the trainer will run on it — and the cached calibration), and `train/start`
on synthetic chat data (JSONL `messages`) or text data (JSONL `text`), packing on, evaluation and checkpoints at
their defaults (checkpointEvery 50, no validation set), progress streamed. A fresh daemon per configuration so
that each job's memory is its own and the engine starts cold, as the plan assumes (its time includes the first
step's warm-up).

Measured, from outside the daemon:
- time: the client's wall clock from train/start to its answer (data loading, the first step's warm-up, every
  step, the checkpoints and the adapter save), against the plan's `seconds`; and the median `tokensPerSecond` of
  the TrainProgress reports after the first three, against the plan's `tokensPerSecond` (with the dataset both
  count non-padding tokens; with --full-rows the plan's are batch x seq, so times the rows' fill);
- memory: the daemon's peak during the job — on the CPU its VmHWM (/proc/<pid>/status), reset through
  /proc/<pid>/clear_refs just before train/start; on NVIDIA its used GPU memory (NVML or nvidia-smi for the
  daemon's pid, sampled every 50 ms; where the driver does not list the pid, the GPU's memory.used minus what it
  was before the daemon started, and the table says so) — against the plan's `memory.total`; and the peak during
  model/load against the plan's `loadBytes`.

Configurations: --configs cpu (numpy) or gpu (webgpu), at least 8 each, at least 3 outside the calibrated shapes
(longer sequences, larger batches, other ranks and targets, 8-bit Adam, gradient accumulation). Targets: time
within 20% of the job's wall clock, memory within 15% of the measured peak, on every row (exit code 1 otherwise).
On a shared machine, give the daemon one BLAS thread (--threads 1): other processes then steal less.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_daemon import _SENTENCES, _TOPICS, Daemon, chat_records, train_job, write_gguf  # noqa: E402

from loralabd.plan import observe  # noqa: E402

# (data, batch, seq, rank, targets, optimizer, gradAccum). Calibrated CPU shapes: 1/4 x 32, 2 x 64, 1 x 128 at r8,
# 1/4 x 32 at r64, 2 x 32 as two micro-batches; GPU: 4 x 512 (also two micro-batches), 2 x 2048, 4/8 x 512 at r64,
# 8 x 512 q,v, 16 x 256 r16, 64 x 128 — all on every projection but the q,v one, all AdamW.
CPU = [
    ("chat", 2, 64, 8, ["all"], "adamw", 1),
    ("text", 4, 32, 8, ["all"], "adamw", 1),
    ("chat", 1, 256, 8, ["all"], "adamw", 1),  # longer sequence
    ("text", 8, 32, 16, ["all"], "adamw", 1),  # larger batch, another rank
    ("chat", 2, 64, 32, ["attn"], "adam8bit", 1),  # rank 32 on attention, 8-bit Adam
    ("text", 1, 64, 8, ["all"], "adamw", 4),  # gradient accumulation 4
    ("chat", 4, 64, 4, ["q", "v"], "adamw", 1),  # rank 4 on q, v
    ("text", 2, 128, 64, ["all"], "adamw", 1),  # rank 64 at a longer sequence
    ("chat", 1, 512, 8, ["mlp"], "adamw", 1),  # much longer sequence, MLP only
]
GPU = [
    ("chat", 8, 64, 8, ["all"], "adamw", 1),  # the example: below the calibrated sizes
    ("text", 4, 512, 8, ["all"], "adamw", 1),
    ("chat", 8, 512, 8, ["all"], "adamw", 1),
    ("text", 16, 256, 16, ["attn"], "adamw", 1),
    ("chat", 4, 1024, 64, ["all"], "adamw", 1),  # longer sequence at rank 64
    ("text", 32, 128, 8, ["mlp"], "adamw", 1),
    ("chat", 8, 384, 32, ["q", "v"], "adam8bit", 1),  # 8-bit Adam, rank 32 on q, v
    ("text", 4, 512, 8, ["all"], "adamw", 4),  # gradient accumulation 4
    ("chat", 2, 2048, 16, ["all"], "adamw", 1),  # long sequence at another rank
    ("text", 32, 256, 16, ["all"], "adamw", 1),  # larger batch
]
CONFIGS = {"cpu": CPU, "gpu": GPU}
TIME_TARGET, MEMORY_TARGET = 0.20, 0.15


def text_records(n: int = 400, seed: int = 1) -> list[dict]:
    """Plain-text examples of 2 to 24 sentences (~30 to ~500 tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(_TOPICS)
        body = " ".join(rng.choice(_SENTENCES).format(t=t, T=t[0].upper() + t[1:]) for _ in range(rng.randint(2, 24)))
        out.append({"text": body})
    return out


def write_data(tmp: Path) -> dict:
    paths = {"chat": tmp / "chat.jsonl", "text": tmp / "text.jsonl"}
    paths["chat"].write_text("".join(json.dumps(r) + "\n" for r in chat_records()))
    paths["text"].write_text("".join(json.dumps(r) + "\n" for r in text_records()))
    return paths


# -- memory from outside the daemon ------------------------------------------------------------------------

class Meter:
    """The daemon's memory in the plan's quantity, from outside: RSS (VmHWM reset per phase) or NVIDIA."""

    def __init__(self, backend: str, pid: int, nvidia_baseline: int | None):
        self.pid = pid
        self.quantity = observe.RSS if backend == "numpy" else None
        self.baseline = nvidia_baseline
        if backend == "webgpu":
            if observe.nvidia_device_used() is not None:
                self.quantity = observe.NVIDIA
            elif observe.rss_bytes(pid) is not None and _software_adapter():
                self.quantity = observe.RSS  # lavapipe: buffers are host memory
        self.source = ""

    def read(self) -> observe.Reading:
        r = observe.current(self.quantity, self.pid)
        if r.bytes is not None and "whole GPU" in r.source and self.baseline is not None:  # pid not listed
            return observe.Reading(r.bytes - self.baseline, "nvidia-smi memory.used minus before the daemon (whole GPU)")
        return r

    def phase(self) -> "Phase":
        return Phase(self)


class Phase:
    def __init__(self, meter: Meter):
        self.m, self.peak, self.source = meter, None, ""
        self._task: asyncio.Task | None = None

    async def _sample(self):
        while True:
            await asyncio.sleep(observe.SAMPLE_S)
            self._take(await asyncio.to_thread(self.m.read))

    def _take(self, r: observe.Reading):
        if r.bytes is not None:
            self.peak, self.source = max(self.peak or 0, r.bytes), r.source

    async def __aenter__(self):
        if self.m.quantity == observe.RSS:
            if not observe.reset_peak_rss(self.m.pid):
                raise SystemExit(f"cannot reset the daemon's peak resident set (/proc/{self.m.pid}/clear_refs)")
        elif self.m.quantity == observe.NVIDIA:
            self._take(self.m.read())
            self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    async def __aexit__(self, *exc):
        if self.m.quantity == observe.RSS:
            self.peak, self.source = observe.peak_rss_bytes(self.m.pid), f"VmHWM of pid {self.m.pid}, reset at the start"
        elif self._task is not None:
            self._task.cancel()
            self._take(self.m.read())
            self.source += ", sampled every 50 ms"
        return False


def _software_adapter() -> bool:
    try:
        from loralabd.engine.select import adapter_description, is_hardware

        return not is_hardware(adapter_description().get("type", ""))
    except Exception:
        return False


# -- one configuration -------------------------------------------------------------------------------------

def _params(cfg: tuple, data: dict, steps: int, full_rows: bool = False) -> tuple[dict, dict]:
    kind, B, T, r, targets, optim, ga = cfg
    lora = {"r": r, "alpha": 2 * r, "targets": targets}
    plan = {"model": "m", "lora": lora, "batchSize": B, "seqLen": T, "gradAccum": ga, "optimizer": optim,
            "steps": steps}
    if not full_rows:  # the job's data and order: the plan prices the batches the trainer will run
        plan.update(dataset=str(data[kind]), seed=0)
    train = {"model": "m", "dataset": str(data[kind]), "adapter": f"v-{kind}-{B}x{T}-r{r}-g{ga}", "steps": steps,
             "batchSize": B, "seqLen": T, "gradAccum": ga, "lora": lora, "optimizer": {"kind": optim}, "seed": 0,
             "overwrite": True}
    return plan, train


async def run_config(d: Daemon, meter: Meter, source: str, backend: str, cfg: tuple, data: dict, steps: int,
                     log, full_rows: bool = False, min_seconds: float = 0.0) -> dict:
    c = await d.client()
    try:
        async with meter.phase() as load:
            await c.request("model/load", {"source": source, "backend": backend, "name": "m"}, timeout=600)
        plan_p, train_p = _params(cfg, data, steps, full_rows)
        plan = await c.request("plan/estimate", plan_p)
        if min_seconds and plan.get("stepSeconds") and steps * plan["stepSeconds"] < min_seconds:
            steps = math.ceil(min_seconds / plan["stepSeconds"])  # a job of at least min_seconds of steps
            plan_p, train_p = _params(cfg, data, steps, full_rows)
            plan = await c.request("plan/estimate", plan_p)
        async with meter.phase() as job:
            info, reports, wall = await train_job(c, train_p)
        if info["state"] != "completed":
            raise RuntimeError(f"job {info['jobId']} ended {info['state']}: {info.get('error')}")
    finally:
        await c.close()
    kind, B, T, r, targets, optim, ga = cfg
    later = [x["tokensPerSecond"] for x in reports[3:] if x["tokensPerSecond"]] or \
            [x["tokensPerSecond"] for x in reports[-1:]]
    fill = info["tokensSeen"] / (info["step"] * B * T * ga)
    priced = plan["data"]  # the dataset's batches the plan priced (None: full rows)
    tps_scale = 1.0 if priced else fill  # the plan's tokens/s counts what TrainProgress counts only with the data
    row = {"config": {"data": kind, "batch": B, "seq": T, "r": r, "targets": targets, "optimizer": optim,
                      "gradAccum": ga, "steps": steps},
           "time_pred": plan["seconds"], "time_meas": wall, "step_pred": plan["stepSeconds"],
           "tps_pred": plan["tokensPerSecond"], "tps_progress": statistics.median(later) if later else None,
           "fill": fill, "mem_pred": plan["memory"]["total"], "mem_meas": job.peak, "mem_source": job.source,
           "load_pred": plan.get("loadBytes"), "load_meas": load.peak, "peak_phase": plan["peakPhase"],
           "tokens_seen": info["tokensSeen"], "tokens_pred": plan["tokens"], "priced": priced,
           "tps_scale": tps_scale, "reports": len(reports), "warnings": plan["warnings"],
           "parts": {p["part"]: p["bytes"] for p in plan["parts"]}}
    row["time_err"] = row["time_pred"] / wall - 1 if row["time_pred"] else None
    row["tps_err"] = (row["tps_pred"] * tps_scale / row["tps_progress"] - 1) if row["tps_pred"] and row["tps_progress"] \
        else None
    row["mem_err"] = row["mem_pred"] / job.peak - 1 if job.peak else None
    row["load_err"] = row["load_pred"] / load.peak - 1 if row["load_pred"] and load.peak else None
    full = None
    if priced and priced["fullRowsSeconds"] is not None and row["time_pred"]:  # the same run priced as full rows
        full = row["time_pred"] - plan["stepSeconds"] * plan["steps"] + priced["fullRowsSeconds"]
    row["time_full_rows"] = full
    how = (f"priced {priced['batches']} batches, fill {100 * priced['rowFill']:.0f}%; full rows {full or 0:.1f} s"
           if priced else "full rows")
    log(f"{_label(row)}: time {row['time_pred'] or 0:.1f} s predicted ({how}), {wall:.1f} s measured; memory "
        f"{_mib(row['mem_pred'])} predicted, {_mib(job.peak)} measured")
    return row


async def calibrate(d: Daemon, source: str, backend: str, log) -> dict:
    c = await d.client()
    try:
        await c.request("model/load", {"source": source, "backend": backend, "name": "m"}, timeout=600)
        s = c.stream("plan/calibrate", {"model": "m", "refresh": True})
        async for ev in s:
            if ev.get("message"):
                log(f"calibrating: {ev['message']}")
        return await s.result()
    finally:
        await c.close()


# -- report ------------------------------------------------------------------------------------------------

def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _label(row) -> str:
    c = row["config"]
    ga = f" ga{c['gradAccum']}" if c["gradAccum"] > 1 else ""
    return f"{c['data']} {c['batch']}x{c['seq']} r{c['r']} {','.join(c['targets'])} {c['optimizer']}{ga}, {c['steps']} steps"


def markdown(rows: list[dict]) -> str:
    out = ["| configuration | time predicted | job wall clock | error | as full rows (error) | tokens/s predicted | "
           "TrainProgress tokens/s | error | memory predicted | measured peak | error | load predicted | load measured |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tp = None if r["tps_pred"] is None else r["tps_pred"] * r["tps_scale"]
        fr = r.get("time_full_rows")
        full = "-" if fr is None else f"{fr:,.1f} s ({_pct(fr / r['time_meas'] - 1)})"
        out.append(f"| {_label(r)} | {r['time_pred'] or 0:,.1f} s | {r['time_meas']:,.1f} s | {_pct(r['time_err'])} "
                   f"| {full} "
                   f"| {tp or 0:,.1f} | {r['tps_progress'] or 0:,.1f} | {_pct(r['tps_err'])} | {_mib(r['mem_pred'])} "
                   f"| {_mib(r['mem_meas'])} | {_pct(r['mem_err'])} | {_mib(r['load_pred'])} | {_mib(r['load_meas'])} |")
    return "\n".join(out)


def worst(rows, key) -> float | None:
    xs = [abs(r[key]) for r in rows if r[key] is not None]
    return max(xs) if xs else None


# -- main --------------------------------------------------------------------------------------------------

async def main_async(a, source: str, data: dict, home: Path, log) -> dict:
    baseline = observe.nvidia_device_used() if a.backend == "webgpu" else None
    d = Daemon(home)
    try:
        cal = await calibrate(d, source, a.backend, log)
    finally:
        d.stop()
    cc = cal["calibration"]
    log(f"calibrated in {cc['seconds']:.1f} s: {cc['shapes']} shapes, {len(cc['terms'])} terms, residual "
        f"{100 * cc['residual']:.1f}%, leave-one-out {_pct(cc['leaveOneOutResidual'])}, runtime "
        f"{_mib(cc['runtimeBytes'])} ({cc['memoryMeasuredAs']})")
    rows = []
    cfgs = CONFIGS[a.configs or ("cpu" if a.backend == "numpy" else "gpu")]
    if a.only:
        cfgs = [cfgs[int(i)] for i in a.only.split(",")]
    for cfg in cfgs:
        d = Daemon(home)
        try:
            meter = Meter(a.backend, d.proc.pid, baseline)
            rows.append(await run_config(d, meter, source, a.backend, cfg, data, a.steps, log, a.full_rows,
                                         a.min_seconds))
        except BaseException:
            log("daemon log tail:\n" + d.tail())
            raise
        finally:
            d.stop()
    return {"calibration": cal, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("numpy", "webgpu"), default="numpy")
    ap.add_argument("--model", default="default", help="GGUF file or HF directory, or `default`")
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights of the default model's shape with its real tokenizer (bench_daemon.py)")
    ap.add_argument("--tokenizer-gguf", default=None, help="with --random-weights: the GGUF whose tokenizer to use")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 20 numpy, 60 webgpu)")
    ap.add_argument("--min-seconds", type=float, default=0.0,
                    help="more steps for a configuration whose --steps the plan prices under this many seconds "
                         "(a one-off stall of a second is 40%% of a 2.6 s job)")
    ap.add_argument("--configs", choices=sorted(CONFIGS), default=None, help="which list (default: by backend)")
    ap.add_argument("--only", default=None, help="run these configurations only: indexes into the list, e.g. 0,3")
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads of the daemons (numpy)")
    ap.add_argument("--full-rows", action="store_true",
                    help="plan without the dataset: every step priced as full batch x seq rows (as before issue 13)")
    ap.add_argument("--out", metavar="JSON", default=None, help="write every number here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon home, data, logs)")
    a = ap.parse_args(argv)
    a.steps = a.steps or (20 if a.backend == "numpy" else 60)
    if a.random_weights and a.model != "default":
        ap.error("--random-weights replaces --model; give one of them")
    if a.threads:
        for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[v] = str(a.threads)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="loralab-validate-"))
    t0 = time.perf_counter()
    try:
        home = tmp / "home"
        home.mkdir()
        data = write_data(tmp)
        if a.random_weights:
            source = str(write_gguf(tmp / "smollm2-135m-random.gguf", a.tokenizer_gguf))
        else:
            source = a.model if a.model == "default" else str(Path(a.model).expanduser().resolve())
        res = asyncio.run(main_async(a, source, data, home, log))
    finally:
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    rows, cal = res["rows"], res["calibration"]
    dev = cal["device"]
    print(f"device: {dev['name']} ({dev['type']}, {a.backend}{', ' + dev['api'] if dev.get('api') else ''}); "
          f"host {platform.machine()} x {os.cpu_count()}; BLAS threads {a.threads or 'default'}; {a.steps} steps a job"
          + (f", more where the plan priced them under {a.min_seconds:g} s" if a.min_seconds else ""))
    cc = cal["calibration"]
    print(f"calibration: {cc['seconds']:.1f} s, {cc['shapes']} shapes for {len(cc['terms'])} terms, time residual "
          f"{100 * cc['residual']:.1f}% (leave-one-out {_pct(cc['leaveOneOutResidual'])}), runtime fixed cost "
          f"{_mib(cc['runtimeBytes'])}, memory residual {_pct(cc['memoryResidual'])}; memory measured as "
          f"{cc['memoryMeasuredAs']}\n")
    print(markdown(rows))
    wt, wm, wp = worst(rows, "time_err"), worst(rows, "mem_err"), worst(rows, "tps_err")
    print(f"\nworst time error {_pct(wt)} (target ±{TIME_TARGET:.0%}), worst memory error {_pct(wm)} "
          f"(target ±{MEMORY_TARGET:.0%}), worst TrainProgress tokens/s error {_pct(wp)}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    if a.out:
        Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "backend": a.backend, "steps": a.steps, "threads": a.threads,
                                           "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
                                           **res}, indent=1))
    ok = all(r["time_err"] is not None and abs(r["time_err"]) <= TIME_TARGET for r in rows) and \
        all(r["mem_err"] is not None and abs(r["mem_err"]) <= MEMORY_TARGET for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
