"""Calibrate the time model on this device by running the real engine for a few small training steps.

One training step (accumulate of B x T tokens, then one optimizer step) is modelled as

    t_accumulate = c0 + c_mm * matmul_flops + c_lora * lora_flops + c_att * attention_flops + c_p * lora_params
    t_step       = s0 + s_p * lora_params

matmul_flops: the frozen projections (forward y and backward dx: 4 N in out each) and the loss over the
vocabulary (forward, recompute, dh: 6 N D V); lora_flops: 6 N r (in + out) per adapted projection;
attention_flops: 16 B H T^2 hd (forward QK, PV and the backward's six products over the full T x T);
lora_params: work per parameter whatever the batch (adding each micro-batch's gradients into the
accumulator, copies) — at a small batch and a large rank it outweighs the LoRA matmuls; lora_mats: the
adapted projections (layers x targets), each a fixed number of small dispatches whatever its size — on a
GPU their launch overhead, not their FLOPs, is what LoRA costs at a small rank.
The coefficients come from a least-squares fit (non-negative) over a handful of shapes timed through
`engine.train_session(...)`, so any engine with that interface is calibrated the same way. Results are
cached per adapter + driver + BLAS threads + model shape in the data directory.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, asdict
from typing import TYPE_CHECKING, cast

import numpy as np

from ..engine.interface import Engine, OptimSettings
from ..engine.lora import LoraAdapter, LoraConfig
from ..training.packing import Batch
from ..models.args import LINEAR_NAMES
from .hardware import Device, describe

if TYPE_CHECKING:
    from ..protocol.types import Clock

VERSION = 6  # bump when the features or the shapes change: old cache entries are then ignored
CLOCKS = ("wall", "cpu")


# -- features -----------------------------------------------------------------------------------------

def features(args, cfg: LoraConfig, batch: int, seq: int) -> dict:
    B, T = int(batch), int(seq)
    N = B * T
    L = args.num_hidden_layers
    dense = sum(o * i for n in LINEAR_NAMES for (o, i) in [args.linear_shape(n)])
    mm = 4.0 * N * L * dense + 6.0 * N * args.hidden_size * args.vocab_size
    n_lay = len(cfg.layer_ids(L))
    lora = 6.0 * N * cfg.r * n_lay * sum(sum(args.linear_shape(t)) for t in cfg.targets)
    att = 16.0 * L * B * args.num_attention_heads * T * T * args.head_dim
    params = n_lay * sum(cfg.r * sum(args.linear_shape(t)) for t in cfg.targets)
    return {"matmul_flops": mm, "lora_flops": lora, "attention_flops": att, "lora_params": float(params),
            "lora_mats": float(n_lay * len(cfg.targets))}


ACC_TERMS = ("const", "matmul_flops", "lora_flops", "attention_flops", "lora_params", "lora_mats")
STEP_TERMS = ("const", "lora_params")


@dataclass
class Calibration:
    key: str
    device: dict
    clock: Clock
    acc: dict  # term -> seconds per unit
    step: dict
    samples: list = field(default_factory=list)  # what was timed: shape, features, seconds
    warmup_s: float = 0.0  # the first step of a new engine (dequantization / pipeline builds)
    seconds: float = 0.0  # how long calibrating took
    created: float = 0.0

    def predict(self, args, cfg: LoraConfig, batch: int, seq: int) -> dict:
        f = features(args, cfg, batch, seq)
        acc = self.acc["const"] + sum(self.acc[k] * f[k] for k in ACC_TERMS[1:])
        st = self.step["const"] + self.step["lora_params"] * f["lora_params"]
        return {"accumulate_s": acc, "step_s": st, **f}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)

    def achieved(self) -> dict:
        """Throughputs the fit implies, for people: GFLOP/s of the base matmuls, LoRA, attention."""
        g = {k: (1e-9 / v if v > 0 else None) for k, v in self.acc.items() if k != "const"}
        return {"matmul_gflops": g["matmul_flops"], "lora_gflops": g["lora_flops"],
                "attention_gflops": g["attention_flops"], "step_overhead_s": self.acc["const"],
                "accumulate_s_per_mparam": self.acc["lora_params"] * 1e6,
                "optimizer_s_per_mparam": self.step["lora_params"] * 1e6}


# -- the fit ------------------------------------------------------------------------------------------

def nnls(X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least squares with x >= 0 (few columns: drop the most negative coefficient until none is)."""
    w = np.ones(len(y)) if weights is None else weights
    Xw, yw = X * w[:, None], y * w
    active = list(range(X.shape[1]))
    while True:
        coef = np.zeros(X.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(Xw[:, active], yw, rcond=None)
            coef[active] = sol
        neg = [j for j in active if coef[j] < 0]
        if not neg:
            return coef
        active.remove(min(neg, key=lambda j: coef[j]))


def fit(samples: list[dict]) -> tuple[dict, dict]:
    """Coefficients of the accumulate and step models; relative errors weigh every shape alike."""
    Xa = np.array([[1.0] + [s["features"][k] for k in ACC_TERMS[1:]] for s in samples])
    ya = np.array([s["accumulate_s"] for s in samples])
    Xa[:, 1:][:, np.ptp(Xa[:, 1:], axis=0) == 0] = 0.0  # a term no shape varies is the constant's: not fitted
    scale = Xa.max(axis=0)
    scale[scale == 0] = 1.0
    ca = nnls(Xa / scale, ya, 1.0 / ya) / scale
    Xs = np.array([[1.0, s["features"]["lora_params"]] for s in samples])
    ys = np.array([s["step_s"] for s in samples])
    ss = Xs.max(axis=0)
    ss[ss == 0] = 1.0
    if not (ys > 0).all():  # steps timed whole (one submit: the optimizer's share is in accumulate_s)
        return dict(zip(ACC_TERMS, map(float, ca))), dict.fromkeys(STEP_TERMS, 0.0)
    cs = nnls(Xs / ss, ys, 1.0 / ys) / ss
    return dict(zip(ACC_TERMS, map(float, ca))), dict(zip(STEP_TERMS, map(float, cs)))


# -- running it ---------------------------------------------------------------------------------------

def shapes_for(device: Device, args=None) -> list[tuple]:
    """(batch, seq, rank[, targets]) to time.
    CPUs and software adapters: a base shape, more rows, a longer sequence (attention), a larger rank at two
    batch sizes (LoRA work per token against work per parameter) — small, the numpy engine runs ~30-100
    tokens/s there. Discrete GPUs: 2k-8k tokens a step, where the step is compute-bound (at <= 1k tokens a
    big GPU measures mostly the fixed cost of ~2,700 dispatches, and larger batches came out over-predicted
    by up to 43%), the large rank at two batch sizes, and one shape with fewer adapted projections (the
    per-dispatch cost of LoRA); one timed step each, so that it stays within 10 s with the pipelines
    compiled cold (~9 s on an H100). Other GPUs: 256-1k tokens.
    With the model's args, the shapes scale with it: the longest stays within the context, and the large
    rank within the width (a tiny test model calibrates in about a second)."""
    r_hi, ctx = 64, 0
    if args is not None:
        ctx = int(getattr(args, "max_position_embeddings", 0) or 0)
        r_hi = max(16, min(64, args.hidden_size // 2))
    if device.backend != "numpy" and not device.software and "discrete" in device.type.lower().replace("-", ""):
        s = 512 if not ctx else max(8, min(512, ctx // 4 // 8 * 8))
        # 2k-8k tokens: (4, s) against (16 x 4, s / 4) moves the matmuls at equal attention work (B x T^2)
        return [(4, s, 8), (16 * 4, max(8, s // 4), 8), (4, s, r_hi), (8, s, r_hi), (8, s, 8, ("q_proj", "v_proj"))]
    s = 32 if device.backend == "numpy" or device.software else 256
    if ctx:
        s = max(8, min(s, ctx // 4 // 8 * 8))
    return [(1, s, 8), (4, s, 8), (2, 2 * s, 8), (1, 4 * s, 8), (1, s, r_hi), (4, s, r_hi)]


def repeats_for(device: Device) -> int:
    """Timed steps per shape after the warm-up, best kept: one on GPUs (steady, and the <= 10 s budget goes to
    larger shapes) and software adapters (too slow for more), two on the CPU (other processes steal time)."""
    return 2 if device.backend == "numpy" else 1


def _clock(kind: str):
    if kind not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, not {kind!r}")
    return time.perf_counter if kind == "wall" else time.process_time


def time_shape(engine: Engine, cfg: LoraConfig, batch: int, seq: int, clock: Clock = "wall", repeats: int = 1,
               seed: int = 0) -> dict:
    """Seconds of one optimizer step of one micro-batch for one shape, read back (best of `repeats`, after one
    warm-up step). A step is one submit, so the optimizer's share is not timed apart: step_s is 0 and
    accumulate_s the whole step."""
    args = engine.args
    clk = _clock(clock)
    ad = LoraAdapter.init(args, cfg, seed=seed)
    sess = engine.train_session(ad, OptimSettings())
    rng = np.random.default_rng(seed)
    best_a, best_s = float("inf"), 0.0
    warm = 0.0
    for i in range(repeats + 1):
        b = Batch.of(rng.integers(0, args.vocab_size, (batch, seq)))
        t0 = clk()
        sess.step([b], 1e-4, 1.0)
        sess.metrics()  # waits for the device
        t1 = clk()
        if i == 0:
            warm = t1 - t0
        else:
            best_a = min(best_a, t1 - t0)
    sess.close()  # the session's buffers go back now, not when Python collects them
    return {"batch": batch, "seq": seq, "r": cfg.r, "targets": list(cfg.targets), "accumulate_s": best_a,
            "step_s": best_s, "first_step_s": warm, "features": features(args, cfg, batch, seq)}


def calibrate(engine: Engine, device: Device | None = None, clock: Clock = "wall", shapes=None, repeats: int | None = None,
              targets=LINEAR_NAMES) -> Calibration:
    """Time the real engine on a few small shapes and fit the model. Seconds on a GPU or a tiny model,
    about half a minute for the default model on a CPU; use cached_calibration() to do it once.
    (The daemon runs the same plan_shapes / time_shape / finish steps one shape per call, so that
    progress and cancellation land between shapes.)"""
    device = device or describe(engine)
    t_start = time.perf_counter()
    samples = [time_shape(engine, cfg, B, T, clock, n) for cfg, B, T, n in
               plan_shapes(engine, device, shapes, repeats, targets)]
    return finish(engine, device, clock, samples, time.perf_counter() - t_start)


def plan_shapes(engine: Engine, device: Device, shapes=None, repeats: int | None = None, targets=LINEAR_NAMES) -> list:
    """[(LoraConfig, batch, seq, repeats)] a calibration times, in order."""
    args = engine.args
    repeats = repeats or repeats_for(device)
    return [(LoraConfig(r=sh[2], alpha=2 * sh[2], targets=tuple(sh[3] if len(sh) > 3 else targets)), sh[0], sh[1],
             repeats) for sh in (shapes or shapes_for(device, args))]


def finish(engine: Engine, device: Device, clock: Clock, samples: list, seconds: float) -> Calibration:
    """The fitted Calibration of timed samples (the first one's extra first-step time is the warm-up)."""
    s0 = samples[0]
    warm = s0["first_step_s"] - s0["accumulate_s"] - s0["step_s"]  # the engine's one-time setup
    acc, step = fit(samples)
    return Calibration(key=cache_key(device, engine.model, clock), device=device.to_dict(), clock=clock, acc=acc,
                       step=step, samples=samples, warmup_s=max(0.0, warm), seconds=seconds, created=time.time())


# -- the cache ------------------------------------------------------------------------------------------

def model_signature(model) -> str:
    a = model.args
    kinds = sorted({w.kind for L in model.layers for w in L.linear.values()} | {model.output.kind})
    return (f"{a.arch} D{a.hidden_size} F{a.intermediate_size} L{a.num_hidden_layers} H{a.num_attention_heads} "
            f"KV{a.num_key_value_heads} hd{a.head_dim} V{a.vocab_size} {'+'.join(kinds)}")


def cache_key(device: Device, model, clock: Clock) -> str:
    raw = f"v{VERSION}|{device.key()}|{model_signature(model)}|{clock}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def cache_path():
    from ..paths import data_dir

    p = data_dir() / "plan"
    p.mkdir(parents=True, exist_ok=True)
    return p / "calibration.json"


def load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def cached(device: Device, model, clock: Clock = "wall") -> Calibration | None:
    d = load_cache().get(cache_key(device, model, clock))
    return Calibration.from_dict(d) if d else None


def save(cal: Calibration) -> None:
    from ..paths import write_private_json

    entries = load_cache()
    entries[cal.key] = cal.to_dict()
    write_private_json(cache_path(), entries)


def cached_calibration(engine: Engine, device: Device | None = None, clock: Clock = "wall", refresh: bool = False) -> Calibration:
    """The cached calibration for this device + model shape, running (and saving) it when missing."""
    device = device or describe(engine)
    if not refresh:
        hit = cached(device, engine.model, clock)
        if hit is not None:
            return hit
    cal = calibrate(engine, device, clock)
    save(cal)
    return cal


if __name__ == "__main__":  # python -m loralabd.plan.calibrate [backend] [model] [clock]: calibrate, print JSON
    import sys

    from ..engine.select import make_engine
    from ..models.random import load_spec

    backend = sys.argv[1] if len(sys.argv) > 1 else "numpy"
    m = load_spec(sys.argv[2] if len(sys.argv) > 2 else "default")
    eng = make_engine(m, backend)
    clock = cast("Clock", sys.argv[3] if len(sys.argv) > 3 else "wall")  # checked by _clock() before timing
    c = cached_calibration(eng, clock=clock,
                           refresh="--refresh" in sys.argv)
    print(json.dumps(c.to_dict()))
