"""Memory of one training run, by part, in the quantity measured from outside (plan/observe.py).

The engine says what it allocates (`Engine.memory_plan`, engine/memory.py: weights as stored, the numpy
engine's f32 copies, LoRA, gradients, optimizer, activations, attention, logits, workspace — per phase of a step
on the CPU, the exact buffer list on WebGPU). The plan adds what no allocation list shows:

- `runtime`: the fixed cost of the process or driver — interpreter, libraries and malloc slack on the CPU;
  device context, pipelines, uniforms, staging and allocator pools on a GPU — measured once per device at
  calibration as measured peak minus the engine's account (plan/calibrate.py), else a stated estimate;
- `caches`: what the engine holds now beyond its weights (a decode arena and KV cache after generating, other
  models on the same device), from `Engine.memory_in_use()`.

The total is then the process's peak resident set (CPU) or its used GPU memory (NVIDIA), which
benchmarks/validate_plan.py and tests/test_plan.py compare with the measured peak. `load` is the peak while
the model loads (WebGPU: the weights plus the bounded upload staging), reported beside the training peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.lora import LoraConfig
from ..engine.memory import PARTS as ENGINE_PARTS, MemoryPlan, lora_params  # noqa: F401  (lora_params: re-exported)
from . import observe

PARTS = ENGINE_PARTS + ("caches",)
# Without a calibration: the numpy daemon's own resident set (Python, numpy, the daemon, the tokenizer and
# GGUF metadata) measured on this project's CPU machine; on a GPU nothing is assumed (the plan warns).
CPU_RUNTIME_ESTIMATE = 96 << 20


@dataclass(frozen=True)
class RuntimeCost:
    """The fixed cost added to the engine's account, and where it came from."""

    bytes: int
    source: str
    measured: bool  # False: an estimate (the plan warns)
    factor: float = 1.0  # what the driver holds per byte of buffers (its allocator's rounding and pools; GPUs)
    load_bytes: int | None = None  # the fixed cost while a model loads, before any step (None: `bytes`)


@dataclass
class MemoryEstimate:
    backend: str
    parts: dict  # part -> bytes, at the peak phase
    phase: str  # which phase is the peak
    phases: dict  # phase -> total bytes
    kv_cache: int  # generation after training: batch 1, `seq` positions
    buffers: list = field(default_factory=list)  # single allocations (WebGPU: each is one binding)
    notes: list = field(default_factory=list)
    load: int | None = None  # peak while the model loads, same quantity (None: not predicted)
    quantity: str | None = None  # what the totals predict (observe.RSS / observe.NVIDIA / None: buffers only)
    runtime: RuntimeCost | None = None

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def to_dict(self) -> dict:
        return {"backend": self.backend, "parts": {k: int(v) for k, v in self.parts.items()}, "total": self.total,
                "peakPhase": self.phase, "phases": {k: int(v) for k, v in self.phases.items()},
                "kvCache": int(self.kv_cache), "load": self.load, "measuredAs": observe.describe_quantity(self.quantity),
                "notes": list(self.notes)}


def default_runtime(backend: str) -> RuntimeCost:
    if backend == "numpy":
        return RuntimeCost(CPU_RUNTIME_ESTIMATE, "an estimate (the daemon's own resident set on a typical machine); "
                                                 "plan/calibrate measures it on this one", False)
    return RuntimeCost(0, "not measured: the driver's own memory (context, pipelines, pools) is not counted until "
                          "plan/calibrate measures it", False)


def engine_plan(model, backend: str, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw",
                limits: dict | None = None, engine=None, hardware: bool = True, recompute: bool = False) -> MemoryPlan:
    """The engine's own account: from the engine when there is one, else from its code for this model."""
    if engine is not None:
        return engine.memory_plan(batch, seq, cfg, optim, recompute=recompute)
    from ..engine.select import memory_plan

    return memory_plan(model, backend, batch, seq, cfg, optim, limits, hardware, recompute=recompute)


def training_memory(model, backend: str, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw",
                    limits: dict | None = None, engine=None, hardware: bool = True,
                    runtime: RuntimeCost | None = None, quantity: str | None = None,
                    recompute: bool = False) -> MemoryEstimate:
    """limits: the WebGPU adapter's (they size the logits); engine: to ask it (and what it holds now);
    hardware: without an engine, whether the adapter runs the hardware-GPU kernel variants; runtime: the
    calibration's fixed cost (default: default_runtime); recompute: activation checkpointing (plan/activations.py)."""
    if backend not in ("numpy", "webgpu"):
        raise ValueError(f"unknown backend {backend!r}; use 'numpy' or 'webgpu'")
    mp = engine_plan(model, backend, cfg, batch, seq, optim, limits, engine, hardware, recompute)
    rt = runtime or default_runtime(backend)
    caches = max(0, int(engine.memory_in_use()) - mp.resident) if engine is not None else 0
    k = rt.factor  # the step's buffers as the driver holds them (the weights as asked: calibrate.fixed_memory)
    parts = {p: int(mp.parts.get(p, 0) * (1.0 if p == "weights" else k)) for p in ENGINE_PARTS}
    parts["runtime"] += rt.bytes
    parts["caches"] = caches = int(k * caches)
    extra = rt.bytes + caches
    phases = {ph: mp.resident + int(k * (v - mp.resident)) + extra for ph, v in mp.phases.items()}
    notes = list(mp.notes) + [f"runtime: {rt.bytes / 2**20:,.0f} MiB fixed cost, {rt.source}"]
    if k != 1.0:
        notes.append(f"buffers: x {k:.2f} — what the driver held per byte the step's buffers ask for (the weights "
                     "counted as asked), measured at calibration (its allocator's block rounding and pools)")
    if caches:
        notes.append(f"caches: {caches / 2**20:,.1f} MiB the engine holds now besides its weights "
                     "(decode arena, adapter slots, other models on the device)")
    load = None if mp.load is None else mp.load + (rt.bytes if rt.load_bytes is None else rt.load_bytes) + caches
    return MemoryEstimate(mp.backend, parts, mp.phase, phases, mp.kv_cache, list(mp.buffers), notes, load, quantity, rt)


# -- limits -----------------------------------------------------------------------------------------

def binding_violations(mem: MemoryEstimate, limits: dict) -> list[dict]:
    """Every buffer larger than one storage binding or one buffer may be on this adapter."""
    out = []
    for key, what in (("max-storage-buffer-binding-size", "storage binding"), ("max-buffer-size", "buffer")):
        lim = limits.get(key)
        if not lim:
            continue
        for name, part, nbytes in mem.buffers:
            if nbytes > lim:
                out.append({"limit": key, "what": f"buffer {name!r} ({part})", "needed": int(nbytes),
                            "available": int(lim), "over": int(nbytes - lim)})
    return out


def mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"
