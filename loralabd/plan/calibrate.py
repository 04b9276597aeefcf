"""Calibrate the plan on this device: time the real engine on more training shapes than the time model has
coefficients, and measure from outside what the process or driver holds beyond the engine's own account.

Time. One optimizer step of `grad_accum` micro-batches of B x T tokens is modelled as

    t_step = ga * (c0 + c_mm * matmul_flops + c_lora * lora_flops + c_att * attention_flops + c_n * lora_mats)
             + c_p * lora_params [+ c_8 * lora_params with adam8bit]

matmul_flops: the frozen projections (forward y and backward dx: 4 N in out each) and the loss over the
vocabulary (forward, recompute, dh: 6 N D V); lora_flops: 6 N r (in + out) per adapted projection;
attention_flops: 16 B H T^2 hd (forward QK, PV and the backward's six products over the full T x T);
lora_mats: the adapted projections (layers x targets), each a fixed number of small dispatches whatever its
size — on a GPU their launch cost, not their FLOPs, is what LoRA costs at a small rank; lora_params: work per
parameter once per step (the optimizer update, the gradient normalisation and clipping), plus c_8 per parameter
with 8-bit Adam (blockwise (de)quantisation of the moments; one shape is timed with it). A step is one submit,
so its parts are not timed apart: a shape with two micro-batches per step separates the per-micro-batch terms
from the per-step one. A term no shape varies is left out (zero): lora_mats where every shape adapts every
projection. The coefficients come from a non-negative least-squares fit of relative errors; the calibration
reports its residual (RMS relative error over the timed shapes) and the leave-one-out error (each shape
predicted by the fit of the others), which is what a prediction for an untimed shape can expect. Shapes are
timed keeping activations (plan/activations.py); recomputing them adds the layers' forward once more — the
frozen projections but the down projection's base product (2 N (dense - down) per layer), a third of the LoRA
FLOPs, a quarter of the attention ones — priced at the same coefficients (features(recompute=True)).

Memory. Around each shape a PeakProbe (plan/observe.py) measures the process's peak — resident set on the CPU,
the driver's used memory on NVIDIA — and the engine's own account for that shape (Engine.memory_plan, plus
what it held already) is subtracted: the median difference is the runtime's fixed cost (interpreter and
libraries; device context, pipelines, staging, allocator pools), stored with the calibration and added by every
later plan. Its spread over the shapes is reported as the memory residual. A checkpoint of one shape's state
is timed too (the job's checkpoints and adapter save cost time in proportion to their bytes).

Results are cached per adapter + driver + BLAS threads + model shape in the data directory.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np

from ..engine.interface import Engine, OptimSettings
from ..engine.lora import LoraAdapter, LoraConfig
from ..models.args import LINEAR_NAMES
from ..training.packing import Batch
from . import observe
from .hardware import UNKNOWN_GPU_MEMORY, Device, describe
from .memory import RuntimeCost

if TYPE_CHECKING:
    from ..protocol.types import Clock

VERSION = 11  # bump when the features or the shapes change: old cache entries are then ignored
CLOCKS = ("wall", "cpu")

TERMS = ("micro_batches", "matmul_flops", "lora_flops", "attention_flops", "lora_mats", "lora_params", "adam8bit_params")
PER_MICRO = ("micro_batches", "matmul_flops", "lora_flops", "attention_flops", "lora_mats")


# -- features -----------------------------------------------------------------------------------------

def features(args, cfg: LoraConfig, batch: int, seq: int, grad_accum: int = 1, optim: str = "adamw",
             recompute: bool = False, attention_share: float = 1.0) -> dict:
    """The work of one optimizer step by term. attention_share: the share of the causal attention an engine
    computes on the run's rows (RunBatches.attention_share: packed rows' blocks that see nothing of each other
    are skipped on the GPU); calibration's rows are one sequence each (1.0)."""
    B, T, ga = int(batch), int(seq), int(grad_accum)
    N = B * T
    L = args.num_hidden_layers
    dense = sum(o * i for n in LINEAR_NAMES for (o, i) in [args.linear_shape(n)])
    mm = 4.0 * N * L * dense + 6.0 * N * args.hidden_size * args.vocab_size
    n_lay = len(cfg.layer_ids(L))
    lora = 6.0 * N * cfg.r * n_lay * sum(sum(args.linear_shape(t)) for t in cfg.targets)
    att = 16.0 * L * B * args.num_attention_heads * T * T * args.head_dim * float(attention_share)
    if recompute:  # the backward runs each layer's forward again (all but the down projection's base product)
        o, i = args.linear_shape("down_proj")
        mm += 2.0 * N * L * (dense - o * i)
        lora, att = lora * 4 / 3, att * 5 / 4
    params = n_lay * sum(cfg.r * sum(args.linear_shape(t)) for t in cfg.targets)
    return {"micro_batches": float(ga), "matmul_flops": ga * mm, "lora_flops": ga * lora, "attention_flops": ga * att,
            "lora_mats": float(ga * n_lay * len(cfg.targets)), "lora_params": float(params),
            "adam8bit_params": float(params if optim == "adam8bit" else 0)}


@dataclass(frozen=True)
class Shape:
    """One calibration shape: batch x seq tokens a micro-batch, rank r on `targets` (None: all), grad_accum,
    the optimizer."""

    batch: int
    seq: int
    r: int
    targets: tuple | None = None
    grad_accum: int = 1
    optim: str = "adamw"

    def lora(self, default=LINEAR_NAMES) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=2 * self.r, targets=tuple(self.targets or default))

    def label(self) -> str:
        t = "" if self.targets is None else f" on {','.join(self.targets)}"
        g = f", {self.grad_accum} micro-batches" if self.grad_accum > 1 else ""
        o = f", {self.optim}" if self.optim != "adamw" else ""
        return f"batch {self.batch} x seq {self.seq}, r={self.r}{t}{g}{o}"


@dataclass
class Calibration:
    key: str
    device: dict
    clock: Clock
    coef: dict  # term -> seconds per unit (0 for a term left out)
    samples: list = field(default_factory=list)  # what was timed: shape, features, seconds, memory
    warmup_s: float = 0.0  # the first step of a new engine (dequantization / pipeline builds)
    seconds: float = 0.0  # how long calibrating took
    created: float = 0.0
    fitted: list = field(default_factory=list)  # the terms the fit used
    residual: float = 0.0  # RMS relative error of the fit over the timed shapes
    loo_residual: float | None = None  # RMS relative error of each shape predicted by the fit of the others
    memory_quantity: str | None = None  # observe.RSS / observe.NVIDIA / None (nothing measurable here)
    runtime_bytes: int | None = None  # the runtime's fixed memory cost (None: not measured)
    runtime_source: str = ""
    memory_residual: float | None = None  # RMS relative error of fixed cost + engine account vs measured peaks
    checkpoint_s_per_byte: float | None = None  # a checkpoint's seconds per byte of state
    runtime_factor: float = 1.0  # driver bytes per byte of the engine's buffers (fixed_memory)
    load_runtime_bytes: int | None = None  # the process at rest before the first shape, less the engine's account

    def predict(self, args, cfg: LoraConfig, batch: int, seq: int, grad_accum: int = 1, optim: str = "adamw",
                recompute: bool = False, attention_share: float = 1.0) -> dict:
        f = features(args, cfg, batch, seq, grad_accum, optim, recompute, attention_share)
        return {"step_s": float(sum(self.coef[k] * f[k] for k in TERMS)), **f}

    def predict_step(self, args, cfg: LoraConfig, micro, optim: str = "adamw", recompute: bool = False,
                     attention_share: float = 1.0) -> float:
        """Seconds of one optimizer step whose micro-batches have these (rows, length) shapes (as the trainer cuts
        them, plan/batches.py): each one's per-micro-batch terms, the per-step terms once."""
        t = 0.0
        for b, T in micro:
            f = features(args, cfg, b, T, 1, optim, recompute, attention_share)
            t += sum(self.coef[k] * f[k] for k in PER_MICRO)
        f = features(args, cfg, 1, 1, 1, optim)
        return float(t + sum(self.coef[k] * f[k] for k in TERMS if k not in PER_MICRO))

    def runtime_cost(self) -> RuntimeCost | None:
        if self.runtime_bytes is None:
            return None
        return RuntimeCost(int(self.runtime_bytes), self.runtime_source, True, float(self.runtime_factor),
                           self.load_runtime_bytes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)

    def achieved(self) -> dict:
        """Throughputs the fit implies, for people: GFLOP/s of the base matmuls, LoRA, attention."""
        g = {k: (1e-9 / v if v > 0 else None) for k, v in self.coef.items()}
        return {"matmul_gflops": g["matmul_flops"], "lora_gflops": g["lora_flops"],
                "attention_gflops": g["attention_flops"], "step_overhead_s": self.coef["micro_batches"],
                "optimizer_s_per_mparam": self.coef["lora_params"] * 1e6}


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


def varied_terms(samples: list[dict]) -> list[str]:
    """micro_batches, and every other term whose value per micro-batch (per step for lora_params) differs
    between shapes: a term no shape varies cannot be told from the constant."""
    out = ["micro_batches"]
    for k in TERMS[1:]:
        per = [s["features"][k] / (s["features"]["micro_batches"] if k in PER_MICRO else 1.0) for s in samples]
        if max(per) - min(per) > 1e-9 * max(abs(max(per)), 1e-30):
            out.append(k)
    return out


def _solve(samples: list[dict], terms: list[str]) -> dict:
    X = np.array([[s["features"][k] for k in terms] for s in samples])
    y = np.array([s["seconds"] for s in samples])
    scale = X.max(axis=0)
    scale[scale == 0] = 1.0
    c = nnls(X / scale, y, 1.0 / y) / scale  # relative errors weigh every shape alike
    return {**dict.fromkeys(TERMS, 0.0), **{k: float(v) for k, v in zip(terms, c)}}


def _rel_err(coef: dict, s: dict) -> float:
    return sum(coef[k] * s["features"][k] for k in TERMS) / s["seconds"] - 1.0


def fit(samples: list[dict]) -> tuple[dict, list[str], float, float | None]:
    """(coefficients, terms fitted, RMS relative residual, leave-one-out RMS relative error or None when the
    shapes are too few to leave one out). Leave-one-out predicts each shape from the fit of the others where
    the others still vary every term (a shape that alone varies a term, such as the only 8-bit Adam one, cannot
    be predicted without it, and says nothing about untimed shapes that keep within the timed terms)."""
    terms = varied_terms(samples)
    coef = _solve(samples, terms)
    res = float(np.sqrt(np.mean([_rel_err(coef, s) ** 2 for s in samples])))
    errs = []
    for i, s in enumerate(samples):
        rest = samples[:i] + samples[i + 1:]
        if len(rest) > len(terms) and varied_terms(rest) == terms:
            errs.append(_rel_err(_solve(rest, terms), s))
    loo = float(np.sqrt(np.mean(np.square(errs)))) if errs else None
    return coef, terms, res, loo


def fixed_memory(samples: list[dict], proportional: bool = False) -> tuple[int | None, float, float | None]:
    """(runtime fixed cost, factor, RMS relative error of fixed + weights + factor x the rest of the account against
    the measured peaks) over the shapes whose peak was measured. Without `proportional` the factor is 1 and the
    fixed cost the median of peak minus account. With it (a GPU driver's used memory) both come from a
    least-squares fit of relative errors: a driver's allocator rounds each buffer up to its blocks and keeps
    pools, which grows with the step's buffers (measured on an H200 through Vulkan: about twice the bytes asked
    for at 4096 tokens a step). The weights (`resident_bytes`, the same in every shape) are counted once: a
    calibration of one model cannot tell how the driver holds them, and a few large buffers are held as asked."""
    got = [s for s in samples if s.get("peak_bytes")]
    if not got:
        return None, 1.0, None
    w = np.array([s.get("resident_bytes", 0) for s in got], np.float64)
    p = np.array([s["peak_bytes"] for s in got], np.float64)
    e = np.array([s["engine_bytes"] for s in got], np.float64) - w  # the step's own buffers
    fixed, factor = float(np.median(p - w - e)), 1.0
    if proportional and len(got) >= 3 and np.ptp(e) > 0.25 * e.mean():
        (a, b), *_ = np.linalg.lstsq(np.stack([1.0 / p, e / p], 1), (p - w) / p, rcond=None)
        if b > 1.0 and a >= 0.0:
            fixed, factor = float(a), float(b)
    err = (max(0.0, fixed) + w + factor * e) / p - 1.0
    return max(0, int(fixed)), factor, float(np.sqrt(np.mean(np.square(err))))


# -- running it ---------------------------------------------------------------------------------------

def shapes_for(device: Device, args=None) -> list[Shape]:
    """The shapes to time, more than the model has coefficients.
    CPUs and software adapters: a base shape, two micro-batches of two rows (per-step against per-micro-batch
    work), 4 and 8 rows (tokens from 32 to 256: the fixed cost per micro-batch against the matmuls, which noise
    on a shared machine confounds over a narrower range), one row 4x and one 8x as long (attention: two shapes,
    so that each predicts the other when left out), a middle rank and a large rank at two batch sizes (LoRA work
    per token against work per parameter), and the middle rank with 8-bit Adam — 10 shapes for 6 coefficients, small (the numpy engine runs ~30-150 tokens/s there), in rising memory order (malloc keeps
    what a larger shape took, and a later shape's measured peak would start from it). Discrete GPUs: 2k-8k tokens a step, where the step is
    compute-bound (at <= 1k tokens a big GPU measures mostly the fixed cost of ~2,700 dispatches), the large
    rank at two batch sizes, two shapes with fewer adapted projections (q,v and attention: the per-dispatch cost
    of LoRA), two micro-batches, a sequence 4x as long at two rows (attention: 2 x 1024 left the attention backward's
    few workgroups mostly idle on an H200, and the fit priced 2 x 2048 jobs 36% over; one row 4x as long idles
    it more), a middle rank and the large
    rank with 8-bit Adam, and one small step (8 x 64: bound by its dispatches, where the issue's 8 x 64 job ran 40%
    under its plan) — 10 shapes for 7 coefficients, in rising memory order
    (a driver's pools keep what a larger shape took). Other GPUs: the CPU list at 256-1k tokens.
    With the model's args, the shapes scale with it: the longest stays within the context, and the large
    rank within the width (a tiny test model calibrates in about a second)."""
    r_hi, ctx = 64, 0
    if args is not None:
        ctx = int(getattr(args, "max_position_embeddings", 0) or 0)
        r_hi = max(16, min(64, args.hidden_size // 2))
    if device.backend != "numpy" and not device.software and "discrete" in device.type.lower().replace("-", ""):
        s = 512 if not ctx else max(8, min(512, ctx // 4 // 8 * 8))
        qv = ("q_proj", "v_proj")
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        return [Shape(8, max(8, s // 8), 8), Shape(4, s, 8), Shape(4, s, 8, None, 2),
                Shape(4, s, r_hi, None, 1, "adam8bit"),
                Shape(4, s, r_hi), Shape(8, s, 8, qv), Shape(2, 4 * s, 8), Shape(8, s, r_hi),
                Shape(16, max(8, s // 2), 16, attn),
                Shape(64, max(8, s // 4), 8)]
    s = 32 if device.backend == "numpy" or device.software else 256
    if ctx:
        s = max(8, min(s, ctx // 4 // 8 * 8))
    long = min(8 * s, ctx) if ctx else 8 * s
    return [Shape(1, s, 8), Shape(2, s, 8, None, 2), Shape(4, s, 8), Shape(1, 4 * s, 8), Shape(2, s, r_hi // 2),
            Shape(2, s, r_hi // 2, None, 1, "adam8bit"), Shape(8, s, 8), Shape(1, long, 8), Shape(1, s, r_hi),
            Shape(4, s, r_hi)]


def repeats_for(device: Device) -> int:
    """Timed steps per shape after the warm-up: three back to back on hardware GPUs (time_shape), one on software
    adapters (too slow for more), the best of two on the CPU (other processes steal time)."""
    if device.backend == "numpy":
        return 2
    return 1 if device.software else 3


def memory_quantity(device: Device) -> str | None:
    return observe.quantity_for(device.backend, device.vendor, device.name, device.software)


def _clock(kind: str):
    if kind not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, not {kind!r}")
    return time.perf_counter if kind == "wall" else time.process_time


def _time_checkpoint(sess) -> tuple[float, int]:
    """Seconds and bytes of one checkpoint of the session's state, written as the trainer writes it."""
    from ..training.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    state = sess.state_dict()
    with tempfile.TemporaryDirectory(prefix="loralab-calibrate-") as d:
        save_checkpoint(d, 1, state, {"calibration": True}, 1)
    return time.perf_counter() - t0, int(sum(v.nbytes for v in state.values()))


def _exercised(mp, checkpoint: bool) -> int:
    """The engine's peak over the phases this shape ran (a checkpoint phase only when one was written)."""
    return int(max(v for k, v in mp.phases.items() if checkpoint or k != "checkpoint"))


BLOCK_S = 0.5  # a GPU timing runs back-to-back steps for at least this long (up to MAX_BLOCK steps)
MAX_BLOCK = 64


def time_shape(engine: Engine, shape: Shape, clock: Clock = "wall", repeats: int = 1, seed: int = 0,
               quantity: str | None = None, checkpoint: bool = False, warm_up: bool = True,
               recompute: bool = False) -> dict:
    """Seconds of one optimizer step of `shape` (after a warm-up step when warm_up): the best of `repeats` steps
    each read back on the CPU; on a GPU engine `repeats` steps (more, up to BLOCK_S of them) submitted back to
    back and read back once, as a job runs them (it reads at report cadence, so the host records the next step while the GPU runs this one),
    the peak memory measured around it (quantity: observe.RSS / observe.NVIDIA / None) beside the engine's own
    account, and with checkpoint=True the time of one checkpoint of its state."""
    args = engine.args
    clk = _clock(clock)
    cfg = shape.lora()
    B, T, ga = shape.batch, shape.seq, shape.grad_accum
    mp = engine.memory_plan(B, T, cfg, shape.optim, recompute=recompute)
    held = int(engine.memory_in_use())
    caches = max(0, held - mp.resident)
    idle = observe.current(quantity).bytes  # the process at rest: its context, the weights, no step yet
    probe = observe.PeakProbe(quantity).start()
    ad = LoraAdapter.init(args, cfg, seed=seed)
    sess = engine.train_session(ad, OptimSettings(kind=shape.optim, recompute=recompute))
    del ad  # the trainer keeps none either: the session holds its own copy
    rng = np.random.default_rng(seed)
    times = []
    ck_s, ck_bytes = None, None
    block = engine.backend != "numpy"
    try:
        for i in range(int(warm_up) + (1 if block else repeats)):
            k = repeats if block and i >= int(warm_up) else 1  # steps in this timing
            bs = [Batch.of(rng.integers(0, args.vocab_size, (B, T))) for _ in range(ga)]
            while True:
                t0 = clk()
                for _ in range(k):
                    sess.step(bs, 1e-4, 1.0)
                sess.metrics()  # waits for the device
                took = clk() - t0
                # short GPU steps: a run of 3 (79 ms a step at 8 x 64 on an H200) timed the host's record of
                # the first step and the GPU's clock ramp, where a job's steady steps took 56 ms
                if not (block and repeats > 1 and i >= int(warm_up)) or took >= BLOCK_S or k >= MAX_BLOCK:
                    break
                k = min(MAX_BLOCK, max(2 * k, int(np.ceil(k * BLOCK_S / max(took, 1e-6)))))
            times.append(took / k)
        if checkpoint:
            ck_s, ck_bytes = _time_checkpoint(sess)
    finally:
        sess.close()  # the session's buffers go back now, not when Python collects them
    peak = probe.stop()
    timed = times[1:] if warm_up else times
    return {"batch": B, "seq": T, "r": cfg.r, "targets": list(cfg.targets), "grad_accum": ga, "seconds": min(timed),
            "first_step_s": times[0] if warm_up else None,
            "features": features(args, cfg, B, T, ga, shape.optim, recompute), "optim": shape.optim,
            "recompute": recompute, "resident_bytes": int(mp.resident),
            "peak_bytes": peak.bytes, "memory_source": peak.source,
            "engine_bytes": int(_exercised(mp, checkpoint) + caches), "checkpoint_s": ck_s, "checkpoint_bytes": ck_bytes,
            "idle_bytes": idle, "held_bytes": held}


def calibrate(engine: Engine, device: Device | None = None, clock: Clock = "wall", shapes=None,
              repeats: int | None = None) -> Calibration:
    """Time the real engine on the shapes and fit the model. Seconds on a GPU or a tiny model, under a minute
    for the default model on a CPU; use cached_calibration() to do it once.
    (The daemon runs the same plan_shapes / time_shape / finish steps one item per call, so that
    progress and cancellation land between shapes.)"""
    device = device or describe(engine)
    t_start = time.perf_counter()
    q = memory_quantity(device)
    samples = [run_item(engine, item, clock, q) for item in plan_shapes(engine, device, shapes, repeats)]
    return finish(engine, device, clock, samples, time.perf_counter() - t_start)


@dataclass(frozen=True)
class Item:
    """One call of a calibration: a shape in one pass (passes go round every shape, so that a burst of load from
    other processes slows one timing of several shapes rather than every timing of one)."""

    shape: Shape
    repeats: int
    warm_up: bool  # a first, untimed step (the engine's first, and on a GPU each shape's program build)
    checkpoint: bool  # also time a checkpoint of the shape's state
    pass_no: int = 1
    restart: bool = False  # the engine forgets its compiled kernels first: a new job's warm start (GPU engines)
    recompute: bool = False  # recompute activations (a shape too large to keep them on this device)

    def label(self) -> str:
        if self.restart:
            return self.shape.label() + " (a new job's start)"
        return self.shape.label() + (f" (pass {self.pass_no})" if self.pass_no > 1 else "")


def run_item(engine: Engine, item: Item, clock: Clock = "wall", quantity: str | None = None) -> dict:
    if item.restart:
        engine.forget_compiled()
    out = time_shape(engine, item.shape, clock, item.repeats, quantity=quantity, checkpoint=item.checkpoint,
                     warm_up=item.warm_up, recompute=item.recompute)
    out["pass"], out["restart"] = item.pass_no, item.restart
    return out


def plan_shapes(engine: Engine, device: Device, shapes=None, repeats: int | None = None) -> list[Item]:
    """The calibration's calls, in order. The numpy engine has nothing to build per shape, so only its first step
    warms up, and each shape is timed once per pass, `repeats` passes; GPU engines build each shape's program on
    its first step, so each shape warms up and is timed `repeats` times in one pass. A checkpoint is timed on the
    first shape (the smallest state, rank 8). GPU engines end with the first shape again after forgetting their
    compiled kernels: a job's warm-up is that, with the driver's shader cache warm (a new daemon's job on an H200
    paid ~0.8 s where the calibration's very first step, compiling cold, took ~2.3 s)."""
    repeats = repeats or repeats_for(device)
    out = [sh if isinstance(sh, Shape) else Shape(*sh) for sh in (shapes or shapes_for(device, engine.args))]
    if device.backend != "numpy":
        rc = [_recompute(engine, device, sh) for sh in out]
        return [Item(sh, repeats, True, i == 0, recompute=rc[i]) for i, sh in enumerate(out)] + \
            [Item(out[0], 1, True, False, 2, True, rc[0])]
    return [Item(sh, 1, i == 0 and p == 1, i == 0 and p == 1, p) for p in range(1, repeats + 1)
            for i, sh in enumerate(out)]


def _recompute(engine: Engine, device: Device, shape: Shape) -> bool:
    """A GPU shape recomputes its activations where keeping them might not fit: the engine's account of keeping,
    doubled (what a driver held per buffer byte on an H200, fixed_memory), over 90% of the device's memory (4 GiB
    when unknown). Samples record their mode and price it (features(recompute=...))."""
    if engine.backend == "numpy":
        return False
    keep = engine.memory_plan(shape.batch, shape.seq, shape.lora(), shape.optim, recompute=False).total
    return 2 * keep > 0.9 * (device.memory_bytes or UNKNOWN_GPU_MEMORY)


def merge(samples: list[dict]) -> list[dict]:
    """One sample per shape: its best time over the passes; memory, warm-up and checkpoint from its first pass
    (shapes run in rising memory order there, so the peak is the shape's own)."""
    out: dict = {}
    for s in samples:
        key = (s["batch"], s["seq"], s["r"], tuple(s["targets"]), s["grad_accum"], s["optim"])
        if key not in out:
            out[key] = dict(s)
        else:
            out[key]["seconds"] = min(out[key]["seconds"], s["seconds"])
    return list(out.values())


def finish(engine: Engine, device: Device, clock: Clock, samples: list, seconds: float) -> Calibration:
    """The fitted Calibration of timed samples (the first one's extra first-step time is the warm-up)."""
    restart = [s for s in samples if s.get("restart")]
    samples = merge([s for s in samples if not s.get("restart")])
    s0 = restart[0] if restart else samples[0]
    warm = (s0["first_step_s"] or s0["seconds"]) - s0["seconds"]  # a job's one-time setup
    coef, terms, res, loo = fit(samples)
    q = memory_quantity(device)
    fixed, factor, mem_res = fixed_memory(samples, proportional=q == observe.NVIDIA)
    src = ""
    n = sum(1 for s in samples if s.get("peak_bytes"))
    if fixed is not None and factor != 1.0:
        src = (f"measured at calibration: {observe.describe_quantity(q)} against the engine's own account over {n} "
               f"shapes, fitted as a fixed cost plus {factor:.2f} x the account")
    elif fixed is not None:
        src = (f"measured at calibration: {observe.describe_quantity(q)} minus the engine's own account, median "
               f"over {n} shapes")
    # the fixed cost while loading: the process at rest before the first shape (no step's pipelines or pools yet)
    rest = [s["idle_bytes"] - s["held_bytes"] for s in samples if s.get("idle_bytes") and "held_bytes" in s]
    load_fixed = max(0, int(rest[0])) if rest and fixed is not None else None
    ck = [s for s in samples if s.get("checkpoint_s") and s.get("checkpoint_bytes")]
    ck_rate = ck[0]["checkpoint_s"] / ck[0]["checkpoint_bytes"] if ck else None
    return Calibration(key=cache_key(device, engine.model, clock), device=device.to_dict(), clock=clock, coef=coef,
                       samples=samples, warmup_s=max(0.0, warm), seconds=seconds, created=time.time(), fitted=terms,
                       residual=res, loo_residual=loo, memory_quantity=q, runtime_bytes=fixed, runtime_source=src,
                       memory_residual=mem_res, checkpoint_s_per_byte=ck_rate, runtime_factor=factor,
                       load_runtime_bytes=load_fixed)


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
    if not d:
        return None
    try:
        return Calibration.from_dict(d)
    except TypeError:  # an entry written by another version under the same key: measure again
        return None


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
    c = cached_calibration(eng, clock=clock, refresh="--refresh" in sys.argv)
    print(json.dumps(c.to_dict()))
