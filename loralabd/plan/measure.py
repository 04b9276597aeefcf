"""Measure one training configuration for real, in a fresh process: peak memory and tokens/s.

The validation of the plan (tests/test_plan.py, benchmarks/validate_plan.py) compares these numbers with
estimate(). Memory: on the numpy backend the process's peak resident set (VmHWM, reset after the model is
loaded) minus its resident set before loading; on WebGPU the runtime's peak of live buffer bytes. Time: the
steps after a warm-up step, each one accumulate() of batch x seq tokens and one optimizer step().

    python -m loralabd.plan.measure '{"backend": "numpy", "batch": 1, "seq": 64, "r": 8}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from ..engine.select import make_engine
from ..models.random import load_spec

if TYPE_CHECKING:
    from ..protocol.types import Clock


def _status() -> dict:
    out = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux)
            f.write("5")
        return True
    except OSError:
        return False


def run_config(cfg: dict) -> dict:
    """In this process (which should be fresh): load, train `steps` + 1 steps, report."""
    import numpy as np

    from ..engine.interface import OptimSettings
    from ..engine.lora import LoraAdapter, LoraConfig
    from ..training.packing import Batch

    import gguf  # noqa: F401  (imported before the baseline: library code is not the run's memory)
    import tokenizers  # noqa: F401

    backend = cfg.get("backend", "numpy")
    rss0 = _status().get("VmRSS", 0)
    model = load_spec(cfg.get("model"))
    engine = make_engine(model, backend)
    reset = _reset_peak()
    lcfg = LoraConfig(r=int(cfg.get("r", 8)), alpha=float(cfg.get("alpha", 16)), targets=tuple(cfg.get("targets", ("all",))),
                      dropout=float(cfg.get("dropout", 0.0)))
    ad = LoraAdapter.init(model.args, lcfg, seed=0)
    sess = engine.train_session(ad, OptimSettings(kind=cfg.get("optim", "adamw")))
    del ad  # the caller's adapter: the daemon keeps none while training (the session holds its copy)
    B, T = int(cfg["batch"]), int(cfg["seq"])
    rng = np.random.default_rng(0)
    walls, cpus = [], []
    for i in range(int(cfg.get("steps", 1)) + 1):
        b = Batch.of(rng.integers(0, model.args.vocab_size, (B, T)))
        w0, c0 = time.perf_counter(), time.process_time()
        sess.step([b], 1e-4, 1.0)
        sess.metrics()  # waits for the device
        w1, c1 = time.perf_counter(), time.process_time()
        if i:  # the first step warms up (dequantization, pipelines)
            walls.append(w1 - w0)
            cpus.append(c1 - c0)
    out = {"config": cfg, "tokens": B * T, "wall_s": walls, "cpu_s": cpus,
           "tokens_per_s_wall": B * T / min(walls), "tokens_per_s_cpu": B * T / min(cpus)}
    if backend == "numpy":
        st = _status()
        out.update(peak_bytes=st["VmHWM"] - rss0, rss0=rss0, peak_reset=reset)
    else:
        from ..engine.webgpu.engine import WebGPUEngine

        if not isinstance(engine, WebGPUEngine):
            raise RuntimeError(f"the {backend} engine has no runtime whose peak buffer bytes can be read")
        rt = engine.rt
        out.update(peak_bytes=int(rt.peak_bytes), rss0=rss0, peak_reset=True)
    return out


def measure(cfg: dict, threads: int | None = None, timeout: float = 900) -> dict:
    """run_config in a fresh interpreter (so its memory is its own). threads: BLAS threads for numpy."""
    env = dict(os.environ)
    if threads:
        for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            env[v] = str(threads)
    p = subprocess.run([sys.executable, "-m", "loralabd.plan.measure", json.dumps(cfg)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"measuring {cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_config(json.loads(sys.argv[1]))))


# -- predicted against measured -------------------------------------------------------------------------

CPU_GRID = [  # (batch, seq, r, targets, optim): every axis moves at least twice; small, the CPU engine is slow
    (1, 64, 8, ("all",), "adamw"),
    (2, 128, 8, ("all",), "adamw"),
    (1, 192, 16, ("attn",), "adamw"),
    (4, 64, 64, ("all",), "adamw"),
    (8, 32, 8, ("mlp",), "adamw"),
    (2, 96, 32, ("q", "v"), "adam8bit"),
]
SMALL_GRID = [  # software adapters (lavapipe) and quick checks
    (1, 32, 8, ("all",), "adamw"),
    (2, 32, 16, ("attn",), "adamw"),
    (1, 64, 4, ("q", "v"), "adam8bit"),
]
GPU_GRID = [
    (4, 256, 8, ("all",), "adamw"),
    (8, 512, 8, ("all",), "adamw"),
    (16, 256, 16, ("attn",), "adamw"),
    (4, 1024, 64, ("all",), "adamw"),
    (32, 128, 8, ("mlp",), "adamw"),
    (8, 384, 32, ("q", "v"), "adam8bit"),
]


GRIDS = {"cpu": CPU_GRID, "gpu": GPU_GRID, "small": SMALL_GRID}


def calibrate_in_subprocess(backend: str, model: str, clock: Clock, threads: int | None, refresh=False) -> dict:
    env = dict(os.environ)
    if threads:
        for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            env[v] = str(threads)
    cmd = [sys.executable, "-m", "loralabd.plan.calibrate", backend, model, clock] + (["--refresh"] if refresh else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"calibration failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def validate(backend: str = "numpy", model: str = "default", grid=None, clock: Clock = "wall",
             threads: int | None = None, parallel: int = 1, refresh: bool = False, engine=None, steps: int = 2) -> dict:
    """Calibrate (cached), then predict and measure every configuration of the grid (the best of `steps`
    timed steps after a warm-up, as the calibration keeps its best). Rows of numbers."""
    from concurrent.futures import ThreadPoolExecutor

    from ..engine.lora import LoraConfig
    from .calibrate import Calibration
    from .estimate import estimate
    from .hardware import Device

    t0 = time.perf_counter()
    grid = GRIDS[grid] if isinstance(grid, str) else (grid or (CPU_GRID if backend == "numpy" else GPU_GRID))
    cfgs = [dict(backend=backend, model=model, batch=B, seq=T, r=r, alpha=2 * r, targets=list(tg), optim=opt, steps=steps)
            for B, T, r, tg, opt in grid]
    # with the cpu clock the calibration can run beside the measurements (each counts its own CPU time)
    with ThreadPoolExecutor(max(1, parallel)) as ex:
        fut = ex.submit(calibrate_in_subprocess, backend, model, clock, threads, refresh)
        if parallel <= 1:
            fut.result()
        measured = list(ex.map(lambda c: measure(c, threads), cfgs))
        cal = Calibration.from_dict(fut.result())
    m = load_spec(model)
    device = Device(**cal.device)
    rows = []
    for c, meas in zip(cfgs, measured):
        plan = estimate(m, engine if engine is not None else backend, lora=LoraConfig(r=c["r"], alpha=c["alpha"], targets=tuple(c["targets"])),
                        batch=c["batch"], seq=c["seq"], steps=1, optim=c["optim"], calibration=cal, device=device,
                        clock=clock)
        tps_meas = meas["tokens_per_s_cpu" if clock == "cpu" else "tokens_per_s_wall"]
        rows.append({"config": c, "mem_pred": plan.memory.total, "mem_meas": meas["peak_bytes"],
                     "mem_err": plan.memory.total / meas["peak_bytes"] - 1, "peak_phase": plan.memory.phase,
                     "tps_pred": plan.tokens_per_s, "tps_meas": tps_meas, "tps_err": plan.tokens_per_s / tps_meas - 1,
                     "tps_wall": meas["tokens_per_s_wall"], "tps_cpu": meas["tokens_per_s_cpu"]})
    return {"backend": backend, "model": model, "clock": clock, "threads": threads, "device": cal.device,
            "calibration": {"seconds": cal.seconds, **cal.achieved()}, "rows": rows,
            "seconds": time.perf_counter() - t0}


def markdown(result: dict) -> str:
    d = result["device"]
    out = [f"Device: {d['name']} ({d['type']}, backend {result['backend']}"
           + (f", {d['api']}" if d.get("api") else "") + (f", BLAS threads {result['threads']}" if result["threads"] else "")
           + f"); clock: {result['clock']}; calibration took {result['calibration']['seconds']:.1f} s.", "",
           "| batch | seq | rank | targets | optim | memory predicted | memory measured | error | tokens/s predicted "
           "| tokens/s measured | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r["config"]
        out.append(f"| {c['batch']} | {c['seq']} | {c['r']} | {','.join(c['targets'])} | {c['optim']} "
                   f"| {r['mem_pred'] / 2**20:,.0f} MiB | {r['mem_meas'] / 2**20:,.0f} MiB | {100 * r['mem_err']:+.1f}% "
                   f"| {r['tps_pred']:,.1f} | {r['tps_meas']:,.1f} | {100 * r['tps_err']:+.1f}% |")
    return "\n".join(out)
