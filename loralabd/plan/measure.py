"""Measure one training configuration for real, in a fresh process, from outside the program's own counters.

tests/test_plan.py compares the plan with these numbers (benchmarks/validate_plan.py does the same through the
daemon). Memory: the process's peak resident set from the OS (plan/observe.py: VmHWM, reset once the model is
loaded, so the number is the training phase's peak of the whole process — interpreter, libraries and model
included, as the plan predicts it), and the load phase's peak before that. Time: wall clock of the steps after a
warm-up step, each one optimizer step of batch x seq tokens.

    python -m loralabd.plan.measure '{"backend": "numpy", "model": "random-smollm2:4", "batch": 1, "seq": 64, "r": 8}'

Nothing here imports the planner's estimate: what is measured cannot depend on what is predicted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import observe


def run_config(cfg: dict) -> dict:
    """In this process (which should be fresh): load, train `steps` + 1 steps, report what the OS measured."""
    import numpy as np

    from ..engine.interface import OptimSettings
    from ..engine.lora import LoraAdapter, LoraConfig
    from ..engine.select import make_engine
    from ..models.random import load_spec
    from ..training.packing import Batch

    backend = cfg.get("backend", "numpy")
    model = load_spec(cfg.get("model"))
    engine = make_engine(model, backend)
    load_peak = observe.peak_rss_bytes()
    reset = observe.reset_peak_rss()
    lcfg = LoraConfig(r=int(cfg.get("r", 8)), alpha=float(cfg.get("alpha", 16)), targets=tuple(cfg.get("targets", ("all",))),
                      dropout=float(cfg.get("dropout", 0.0)))
    ad = LoraAdapter.init(model.args, lcfg, seed=0)
    sess = engine.train_session(ad, OptimSettings(kind=cfg.get("optim", "adamw")))
    del ad  # the caller's adapter: the daemon keeps none while training (the session holds its copy)
    B, T, ga = int(cfg["batch"]), int(cfg["seq"]), int(cfg.get("grad_accum", 1))
    rng = np.random.default_rng(0)
    walls = []
    for i in range(int(cfg.get("steps", 1)) + 1):
        bs = [Batch.of(rng.integers(0, model.args.vocab_size, (B, T))) for _ in range(ga)]
        w0 = time.perf_counter()
        sess.step(bs, 1e-4, 1.0)
        sess.metrics()  # waits for the device
        if i:  # the first step warms up (dequantization, pipelines)
            walls.append(time.perf_counter() - w0)
    if cfg.get("checkpoint", True):  # a job ends with one, as the trainer writes it
        import tempfile

        from ..training.checkpoint import save_checkpoint

        with tempfile.TemporaryDirectory(prefix="loralab-measure-") as d:
            save_checkpoint(d, 1, sess.state_dict(), {"measure": True}, 1)
    sess.close()
    return {"config": cfg, "tokens": B * T * ga, "wall_s": walls, "peak_bytes": observe.peak_rss_bytes(),
            "peak_reset": reset, "load_peak_bytes": load_peak, "rss_bytes": observe.rss_bytes(),
            "tokens_per_s": B * T * ga / min(walls) if walls else None}


def measure(cfg: dict, threads: int | None = None, timeout: float = 900, env: dict | None = None) -> dict:
    """run_config in a fresh interpreter (so its memory is its own). threads: BLAS threads for numpy."""
    env = dict(os.environ if env is None else env)
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
