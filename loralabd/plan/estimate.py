"""plan/estimate: will this training run fit on this device, how long will it take, what to change.

    plan = estimate(model, "numpy", dataset_tokens=200_000, lora=LoraConfig(r=16), batch=4, seq=256,
                    epochs=2, time_budget_s=3600)
    plan.fits, plan.exceeded, plan.tokens_per_s, plan.seconds, plan.advice, plan.to_dict()

Memory comes from memory.py (the engine as built, the model's real tensor sizes), time from a calibration
of the real engine on this device (calibrate.py, cached), limits from the adapter (hardware.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ..engine.lora import LoraConfig
from ..protocol import DEFAULTS, read_settings
from ..protocol.types import Clock, MemoryBreakdown, OptimizerKind, PlanActivations, PlanAdvice, PlanCalibration, \
    PlanData, PlanDevice, PlanEstimate, PlanLimit, PlanMemoryPart
from ..engine.memory import optimizer_bytes
from . import observe
from .activations import Choice, choose as choose_activations, peaks as activation_peaks
from .batches import RunBatches
from .calibrate import Calibration, cached, cached_calibration, memory_quantity
from .hardware import UNKNOWN_GPU_MEMORY, Device, describe, memory_override
from .memory import MemoryEstimate, binding_violations, lora_params, mib, training_memory

RANKS = (64, 32, 16, 8, 4, 2, 1)  # what the rank advice picks from, largest first
HEADROOM = 0.9  # of the available memory a plan may take (the OS, the driver and fragmentation need some)


@dataclass
class Plan:
    model: str
    backend: str
    device: Device
    lora: LoraConfig
    batch: int
    seq: int
    grad_accum: int
    optim: OptimizerKind
    steps: int
    tokens: int  # trained tokens over the run
    memory: MemoryEstimate
    available_bytes: int | None
    available_source: str
    exceeded: list  # every limit exceeded: limit, what, needed, available, over, change
    tokens_per_s: float | None
    step_s: float | None  # one optimizer step (grad_accum micro-batches)
    seconds: float | None  # the whole run, with the engine's warm-up
    calibration: dict | None
    advice: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    batches: RunBatches | None = None  # the dataset's real micro-batches the time was priced on (None: full rows)
    activations: PlanActivations | None = None  # keep or recompute: mode, reason, each mode's memory and time

    @property
    def fits(self) -> bool | None:
        if self.exceeded:
            return False
        return None if self.available_bytes is None else True

    @property
    def lora_parameters(self) -> int:
        return lora_params(self.memory_args, self.lora)

    memory_args = None  # set by estimate(): the model's ModelArgs

    def to_dict(self) -> dict:
        return {
            "model": self.model, "backend": self.backend, "device": self.device.to_dict(),
            "lora": self.lora.to_dict(), "batch": self.batch, "seq": self.seq, "gradAccum": self.grad_accum,
            "optimizer": self.optim, "steps": self.steps, "tokens": self.tokens,
            "memory": self.memory.to_dict(), "availableBytes": self.available_bytes,
            "availableSource": self.available_source, "fits": self.fits, "exceeded": list(self.exceeded),
            "loraParameters": self.lora_parameters, "tokensPerStep": self.batch * self.seq * self.grad_accum,
            "tokensPerSecond": self.tokens_per_s, "stepSeconds": self.step_s, "seconds": self.seconds,
            "loadBytes": self.memory.load, "calibration": self.calibration, "advice": dict(self.advice), "warnings": list(self.warnings),
            "notes": list(self.notes),
            "data": self._data_protocol(), "activations": self.activations,
        }

    def to_protocol(self) -> PlanEstimate:
        """The protocol's PlanEstimate (protocol/protocol.json): the fixed memory groups, every part against
        the available memory, the device, each limit exceeded, advice, warnings and time — structured —
        and the same as sentences in `notes`."""
        p = self.memory.parts
        memory: MemoryBreakdown = {
            "weights": int(p["weights"] + p["dequantized"] + p["runtime"] + p["caches"]), "lora": int(p["lora"]),
            "gradients": int(p["gradients"]), "optimizer": int(p["optimizer"]),
            "activations": int(p["activations"] + p["attention"] + p["workspace"]), "logits": int(p["logits"]),
            "total": int(self.memory.total)}
        avail = self.available_bytes
        parts: list[PlanMemoryPart] = [{"part": k, "bytes": int(v), "fraction": (v / avail if avail else None)}
                                       for k, v in p.items()]
        exceeded: list[PlanLimit] = [
            {"limit": e["limit"], "what": e["what"], "unit": "positions" if e["limit"] == "context length" else "bytes",
             "needed": int(e["needed"]), "available": int(e["available"]), "over": int(e["over"]),
             "change": e["change"]} for e in self.exceeded]
        adv = self.advice
        advice: PlanAdvice = {
            "maxBatch": adv.get("maxBatch"), "maxSeq": adv.get("maxSeq"), "rankForBudget": adv.get("rankForBudget"),
            "budgetSeconds": adv.get("budgetSeconds"), "secondsAtRank": adv.get("secondsAtRank"),
            "stepsInBudget": adv.get("stepsInBudget"), "text": list(adv.get("text", []))}
        notes = [f"device: {self.device.name} ({self.device.type}, {self.backend}"
                 + (f", {self.device.api}" if self.device.api else "") + ")"]
        notes += [limit_sentence(e) for e in exceeded]
        notes += [f"warning: {w}" for w in self.warnings]
        notes += [f"advice: {a}" for a in advice["text"]]
        notes += self.notes
        return {"memory": memory, "availableBytes": avail,
                "fits": self.fits, "loraParameters": int(self.lora_parameters),
                "tokensPerStep": self.batch * self.seq * self.grad_accum,
                "tokensPerSecond": self.tokens_per_s, "seconds": self.seconds,
                "backend": self.backend, "device": protocol_device(self.device, self.available_source),
                "parts": parts, "peakPhase": self.memory.phase, "kvCacheBytes": int(self.memory.kv_cache),
                "availableSource": self.available_source, "exceeded": exceeded, "advice": advice,
                "warnings": list(self.warnings), "batchSize": self.batch, "seqLen": self.seq,
                "gradAccum": self.grad_accum, "optimizer": self.optim, "steps": self.steps, "tokens": self.tokens,
                "stepSeconds": self.step_s, "calibration": self._cal_protocol, "data": self._data_protocol(),
                "activations": self.activations, "notes": notes,
                "loadBytes": None if self.memory.load is None else int(self.memory.load),
                "memoryMeasuredAs": observe.describe_quantity(self.memory.quantity)}

    _cal_protocol: PlanCalibration | None = None  # set by estimate(): the calibration's protocol summary
    full_rows_s: float | None = None  # set by estimate() with batches: the steps' seconds as full rows

    def _data_protocol(self) -> PlanData | None:
        b = self.batches
        if b is None:
            return None
        return {"examples": int(b.examples), "batches": int(b.micro_batches), "tokens": int(b.tokens),
                "rowFill": float(b.row_fill), "meanLength": float(b.mean_length),
                "fullRowsSeconds": None if self.full_rows_s is None else float(self.full_rows_s)}


def limit_sentence(e: Mapping[str, Any]) -> str:
    f = mib if e.get("unit", "bytes") == "bytes" else (lambda n: f"{n} positions")
    return (f"limit exceeded: {e['what']} needs {f(e['needed'])}, {e['limit']} is {f(e['available'])} "
            f"(over by {f(e['over'])}); {e['change']}")


def protocol_device(d: Device, available_source: str = "") -> PlanDevice:
    """The protocol's PlanDevice."""
    return {"name": d.name, "type": d.type, "backend": d.backend, "api": d.api, "vendor": d.vendor,
            "driver": d.driver, "software": bool(d.software),
            "limits": {k: int(v) for k, v in d.limits.items()}, "features": [str(f) for f in d.features],
            "memoryBytes": None if d.memory_bytes is None else int(d.memory_bytes), "memorySource": d.memory_source,
            "memoryEstimated": available_source.startswith("an estimate")}


def protocol_calibration(cal: Calibration) -> PlanCalibration:
    """The protocol's PlanCalibration: the measured throughput model, summarised."""
    a = cal.achieved()
    return {"key": cal.key, "clock": cal.clock, "seconds": float(cal.seconds), "shapes": len(cal.samples),
            "created": float(cal.created), "matmulGflops": a["matmul_gflops"], "loraGflops": a["lora_gflops"],
            "attentionGflops": a["attention_gflops"], "stepOverheadSeconds": float(a["step_overhead_s"]),
            "optimizerSecondsPerMParam": float(a["optimizer_s_per_mparam"]), "warmupSeconds": float(cal.warmup_s),
            "terms": list(cal.fitted), "residual": float(cal.residual),
            "leaveOneOutResidual": None if cal.loo_residual is None else float(cal.loo_residual),
            "runtimeBytes": None if cal.runtime_bytes is None else int(cal.runtime_bytes),
            "memoryMeasuredAs": observe.describe_quantity(cal.memory_quantity),
            "memoryResidual": None if cal.memory_residual is None else float(cal.memory_residual),
            "runtimeFactor": float(cal.runtime_factor)}


# -- inputs ---------------------------------------------------------------------------------------------

def _lora(cfg) -> LoraConfig:
    """A LoraConfig as it is, else the protocol's LoraSettings (a dict; None: every default)."""
    return cfg if isinstance(cfg, LoraConfig) else LoraConfig.from_protocol(cfg)


_PLAN = DEFAULTS["PlanParams"]  # estimate()'s defaults are the protocol's (protocol/protocol.json)


def count_dataset_tokens(dataset, seq: int) -> int:
    """Tokens of a dataset: a count, a list of token-id sequences, or rows with input_ids/tokens."""
    if isinstance(dataset, int):
        return dataset
    n = 0
    for ex in dataset:
        if isinstance(ex, Mapping):
            ex = ex.get("input_ids", ex.get("tokens", ex.get("ids", ())))
        n += len(ex)
    return n


def _engine_and_backend(engine):
    if isinstance(engine, str):
        return None, engine
    return engine, engine.backend


def _available(device: Device, cap: int | None, quantity: str | None = None) -> tuple[int | None, str]:
    """What the run may use, in the plan's quantity: free memory is what the process may add to what it holds,
    so its own usage now (resident set, or its used GPU memory) counts as available too."""
    if cap is not None:
        return int(cap), "the memory cap (given)"
    o = memory_override()
    if o is not None:
        return o, "LORALAB_DEVICE_MEMORY (given)"
    if device.memory_bytes is not None:
        own = observe.current(quantity).bytes or 0
        src = f"{HEADROOM:.0%} of {device.memory_source}"
        if own:
            src += f", plus the {mib(own)} this process holds now"
        return int(device.memory_bytes * HEADROOM) + own, src
    return int(UNKNOWN_GPU_MEMORY * HEADROOM), (f"an estimate: the adapter does not say how much memory it has; "
                                                f"assumed {mib(UNKNOWN_GPU_MEMORY)} (set LORALAB_DEVICE_MEMORY "
                                                "or memory_cap_bytes to the real amount)")


def activations_for_engine(engine, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw",
                           mode: str = "auto") -> Choice:
    """What a run on this engine chooses: the plan's memory of both modes (with the runtime's fixed cost when this
    device is calibrated) against the device's available memory — as plan/estimate decides it."""
    if engine.backend == "numpy" or mode != "auto":  # (choose checks the mode)
        return choose_activations(mode, None, None, None, engine.backend)
    device = describe(engine)
    cal = cached(device, engine.model, "wall") or cached(device, engine.model, "cpu")
    quantity = cal.memory_quantity if cal is not None else memory_quantity(device)
    p = activation_peaks(engine.model, engine.backend, cfg, batch, seq, optim, engine=engine, quantity=quantity,
                        hardware=not device.software, runtime=None if cal is None else cal.runtime_cost())
    available, src = _available(device, None, quantity)
    return choose_activations(mode, p["keep"].total, p["recompute"].total, available, engine.backend,
                              assumed=src.startswith("an estimate"))


# -- the search for what fits -----------------------------------------------------------------------------

def _fits(memory, cfg, B, T, optim, available, limits) -> bool:
    mem = memory(cfg, B, T, optim)
    return (available is None or mem.total <= available) and not binding_violations(mem, limits)


def largest(pred, lo: int, hi: int, step: int = 1) -> int | None:
    """Largest multiple of `step` in [lo, hi] with pred true, pred monotone (true then false)."""
    lo_k, hi_k = -(-lo // step), hi // step
    if lo_k > hi_k or not pred(lo_k * step):
        return None
    while lo_k < hi_k:
        mid = (lo_k + hi_k + 1) // 2
        if pred(mid * step):
            lo_k = mid
        else:
            hi_k = mid - 1
    return lo_k * step


# -- the estimate ------------------------------------------------------------------------------------------

def estimate(model, engine="numpy", *, dataset_tokens: int | None = None, dataset=None, lora=None,
             batch: int = _PLAN["batchSize"], seq: int = _PLAN["seqLen"], steps: int | None = None,
             tokens: int | None = None, epochs: float | None = None, grad_accum: int = _PLAN["gradAccum"],
             optim: OptimizerKind = _PLAN["optimizer"],
             time_budget_s: float | None = None, memory_cap_bytes: int | None = None,
             calibration="auto", device: Device | None = None, clock: Clock = "wall",
             checkpoint_every: int = 50, batches: RunBatches | None = None, activations: str = "auto"):
    """A Plan for training `model` with LoRA on `engine` (an engine object or a backend name).

    How long: give steps, tokens, or epochs with dataset_tokens / dataset (default: 1 epoch of the
    dataset, else 100 steps). calibration: "auto" (cached, run once when missing), "cached" (use the
    cache, no run), None (no time, and the runtime's fixed memory cost estimated), or a Calibration.
    checkpoint_every: the job's checkpoints (their time is part of the run's). batches: the run's real
    micro-batches (plan/batches.py run_batches over the dataset): then they set the steps and tokens, and the
    time prices each one's cut shape instead of full batch x seq rows (memory stays at full rows: the trainer
    reserves them). activations: "auto" (keep them when the step fits, as train/start does), "keep" or
    "recompute" (plan/activations.py): the plan is the chosen mode's, with both modes' memory and time beside.

    The protocol form estimate(model, params: dict) — what the daemon calls with PlanParams — returns
    the protocol's PlanEstimate dict (see plan_from_params)."""
    if isinstance(engine, Mapping):
        return plan_from_params(model, engine)
    cfg = _lora(lora)
    eng, backend = _engine_and_backend(engine)
    B, T, ga = int(batch), int(seq), max(1, int(grad_accum))
    if B < 1 or T < 1:
        raise ValueError(f"batch and seq must be >= 1 (got batch={B}, seq={T})")
    a = model.args
    device = device or describe(eng if eng is not None else backend)
    warnings, notes = [], []

    # -- how much work
    ds = dataset_tokens if dataset_tokens is not None else (count_dataset_tokens(dataset, T) if dataset is not None else None)
    per_step = B * T * ga
    if batches is not None:
        n_steps = batches.n_steps
    elif steps is not None:
        n_steps = int(steps)
    elif tokens is not None:
        n_steps = math.ceil(int(tokens) / per_step)
    elif ds is not None:
        n_steps = math.ceil((epochs if epochs is not None else 1.0) * ds / per_step)
    else:
        if epochs is not None:
            raise ValueError("epochs needs dataset_tokens or dataset; or give steps or tokens")
        n_steps = 100
        notes.append("length: 100 steps (no steps, tokens or dataset given)")
    n_steps = max(1, n_steps)
    if batches is None and ds is not None and ds < per_step:
        warnings.append(f"the dataset has {ds} tokens, fewer than one step's {per_step}: lower batch or seq")

    # -- the calibration: time, and the runtime's fixed memory cost measured on this device
    cal = _calibration(calibration, eng, backend, model, device, clock, notes)
    quantity = cal.memory_quantity if cal is not None else memory_quantity(device)
    runtime = cal.runtime_cost() if cal is not None else None

    # -- memory and limits
    limits = device.limits if backend == "webgpu" else {}

    def memory_as(c, b, t, o, recompute):
        return training_memory(model, backend, c, b, t, o, limits, engine=eng, hardware=not device.software,
                               runtime=runtime, quantity=quantity, recompute=recompute)

    available, avail_src = _available(device, memory_cap_bytes, quantity)
    both = {m: memory_as(cfg, B, T, optim, m == "recompute") for m in ("keep", "recompute")}
    choice = choose_activations(activations, both["keep"].total, both["recompute"].total, available, backend,
                                assumed=avail_src.startswith("an estimate"))
    mem = both[choice.mode]
    # what fits: with "auto" a run that does not fit keeping its activations recomputes them
    least = activations == "keep" or backend == "numpy"

    def memory(c, b, t, o):
        return memory_as(c, b, t, o, not least)

    exceeded = []
    fits_batch = lambda b: _fits(memory, cfg, b, T, optim, available, limits)  # noqa: E731
    fits_seq = lambda t: _fits(memory, cfg, B, t, optim, available, limits)  # noqa: E731
    max_b = largest(fits_batch, 1, 4096)
    max_t = largest(fits_seq, 8, max(8, a.max_position_embeddings), 8)
    change = _what_to_change(memory, cfg, B, T, optim, max_b, max_t, ga, mem)
    if available is not None and mem.total > available:
        exceeded.append({"limit": "memory", "what": f"the training step (peak in {mem.phase})",
                         "needed": mem.total, "available": available, "over": mem.total - available,
                         "change": change})
    if available is not None and mem.load is not None and mem.load > available and mem.load > mem.total:
        exceeded.append({"limit": "memory", "what": "loading the model", "needed": mem.load, "available": available,
                         "over": mem.load - available, "change": "free memory, or use a smaller model"})
    for v in binding_violations(mem, limits):
        exceeded.append(dict(v, change=change))
    if T > a.max_position_embeddings:
        exceeded.append({"limit": "context length", "what": f"seq {T}", "needed": T,
                         "available": a.max_position_embeddings, "over": T - a.max_position_embeddings,
                         "change": f"use seq <= {a.max_position_embeddings} (the model's context length)"})
    warnings += _memory_warnings(mem, backend)

    # -- time
    tps = step_s = seconds = full_s = None
    # what a micro-batch computes: the numpy engine runs it as the trainer cut it; the WebGPU session pads every
    # one into its single step program of batch x seq (engine/webgpu/train.py), so there only the count is real
    cut = backend == "numpy"

    # packed rows: the engine's blocked attention skips the blocks that see nothing of each other
    share = batches.attention_share(eng.attention_block) if batches is not None and eng is not None else 1.0

    def steps_s(c: LoraConfig, recompute: bool = choice.recompute) -> float:
        """Seconds of the run's steps at LoRA settings c: each real micro-batch shape, else full rows."""
        if batches is not None:
            return sum(k * cal.predict_step(a, c, shapes if cut else [(B, T)] * len(shapes), optim, recompute,
                                            share)
                       for shapes, k in batches.steps.items())
        return n_steps * cal.predict(a, c, B, T, ga, optim, recompute)["step_s"]

    modes = {m: {"memoryBytes": int(both[m].total), "seconds": None} for m in ("keep", "recompute")}
    if cal is not None:
        run_s = steps_s(cfg)
        step_s = run_s / max(1, n_steps)
        # with the data: the real tokens a second (what TrainProgress reports); else batch x seq ones
        tps = (batches.tokens if batches is not None else n_steps * per_step) / run_s
        jobs_s, how = _job_overhead(cal, a, cfg, optim, n_steps, checkpoint_every)
        seconds = cal.warmup_s + run_s + jobs_s
        for m in modes:
            modes[m]["seconds"] = cal.warmup_s + jobs_s + (run_s if (m == "recompute") == choice.recompute
                                                            else steps_s(cfg, m == "recompute"))
        loo = "n/a" if cal.loo_residual is None else f"{100 * cal.loo_residual:.0f}%"
        notes.append(f"time: calibrated on this device ({cal.clock} clock, {len(cal.samples)} shapes, "
                     f"{cal.seconds:.1f} s; fit residual {100 * cal.residual:.0f}%, leave-one-out {loo}); "
                     f"{_achieved(cal)}; {how}")
        notes.append("time: a validation loss (a validation set, evalEvery) is not included: each validation batch "
                     "costs about a third of a training step")
        if batches is not None:
            full_s = n_steps * cal.predict(a, cfg, B, T, ga, optim, choice.recompute)["step_s"]
            notes.append(f"{batches.note()}; {run_s:.1f} s of steps (full {B} x {T} rows would be {full_s:.1f} s)"
                         + ("" if cut else f"; the {backend} engine pads every batch into its {B} x {T} step "
                                           "program, so each is priced at that shape")
                         + ("" if share >= 1.0 else f"; packed rows: {100 * share:.0f}% of the causal attention "
                                                    "blocks see each other and are computed"))
        else:
            notes.append(f"time: every step priced as full {B} x {T} rows (pass the dataset to price its real "
                         "batches: the trainer cuts each to its longest row)")

    # -- advice
    advice: dict[str, Any] = {"maxBatch": max_b, "maxSeq": max_t, "text": []}
    if max_b is not None and max_b != B:
        advice["text"].append(f"the largest batch that fits at seq {T} is {max_b}")
    if max_t is not None and max_t < T:
        advice["text"].append(f"the longest sequence that fits at batch {B} is {max_t}")
    if cal is not None and time_budget_s is not None:
        def rank_fits(c):
            return _fits(memory, c, B, T, optim, available, limits)
        def steps_as_run(c: LoraConfig) -> float:  # each rank in the mode the run would take at that rank
            rc = choice.recompute if activations != "auto" or backend == "numpy" else \
                choose_activations("auto", memory_as(c, B, T, optim, False).total, None, available).recompute
            return steps_s(c, rc)
        advice.update(_rank_for_budget(model, cal, cfg, n_steps, time_budget_s, per_step, rank_fits, optim,
                                       checkpoint_every, steps_as_run))
        advice["text"].append(advice.pop("_text"))

    # -- warnings
    if backend == "numpy":
        warnings.append("CPU fallback: training runs on the numpy engine (no hardware WebGPU adapter in use); "
                        "expect tens of tokens/s on a laptop CPU — with a GPU driver (Vulkan, Metal or D3D12) "
                        "installed, --backend webgpu trains on the GPU")
    if device.software:
        warnings.append(f"software adapter: {device.name} runs WebGPU on the CPU; it works, slowly — "
                        "a hardware GPU adapter is much faster")
    if device.memory_bytes is None and memory_cap_bytes is None and memory_override() is None:
        warnings.append(f"device memory unknown: {avail_src}")
    plan = Plan(model=model.name, backend=backend, device=device, lora=cfg, batch=B, seq=T,
                grad_accum=ga, optim=optim, steps=n_steps,
                tokens=batches.tokens if batches is not None else n_steps * per_step, memory=mem,
                available_bytes=available, available_source=avail_src, exceeded=exceeded, tokens_per_s=tps,
                step_s=step_s, seconds=seconds, calibration=None if cal is None else {
                    "key": cal.key, "clock": cal.clock, "seconds": cal.seconds, **_achieved_dict(cal)},
                advice=advice, warnings=warnings, notes=notes + [choice.reason] + mem.notes, batches=batches,
                activations=None if backend == "numpy" else cast(PlanActivations, {"mode": choice.mode,
                                                                                   "reason": choice.reason, **modes}))
    plan.memory_args = a
    plan._cal_protocol = None if cal is None else protocol_calibration(cal)
    plan.full_rows_s = full_s
    return plan


def _calibration(calibration, eng, backend, model, device, clock, notes):
    if isinstance(calibration, Calibration):
        return calibration
    if calibration is None:
        notes.append("time: not predicted (calibration turned off)")
        return None
    hit = cached(device, model, clock)
    if hit is not None or calibration == "cached":
        if hit is None:
            notes.append("time: not predicted — this device is not calibrated yet; run `loralab plan --calibrate` "
                         "(or estimate(..., calibration='auto')) once")
        return hit
    if eng is None:
        from ..engine.select import make_engine

        eng = make_engine(model, backend)
    return cached_calibration(eng, device, clock)


def _job_overhead(cal: Calibration, args, cfg: LoraConfig, optim, n_steps: int, every: int) -> tuple[float, str]:
    """Seconds a job spends besides its steps: a checkpoint every `every` steps and at the end, and the adapter
    saved at the end, each in proportion to its bytes (the calibration timed one checkpoint)."""
    if not cal.checkpoint_s_per_byte:
        return 0.0, "checkpoints: not timed at calibration"
    P = lora_params(args, cfg)
    n = math.ceil(n_steps / max(1, every))
    state = 4 * P + optimizer_bytes(args, cfg, optim)
    s = cal.checkpoint_s_per_byte * (n * state + 4 * P)
    return s, f"{n} checkpoint(s) of {mib(state)} and the adapter: {s:.1f} s"


def _memory_warnings(mem: MemoryEstimate, backend: str) -> list[str]:
    """Each term of the memory the plan could not predict or measure here."""
    out = []
    rt = mem.runtime
    if rt is not None and not rt.measured:
        out.append(f"memory: the runtime's fixed cost is {rt.source}" + (f" ({mib(rt.bytes)})" if rt.bytes else ""))
    if mem.quantity is None:
        out.append("memory: this device's driver memory cannot be read from outside (wgpu exposes neither Metal's "
                   "currentAllocatedSize nor VK_EXT_memory_budget), so the plan counts the engine's buffers and "
                   "cannot see the driver's own pools; leave headroom")
    return out


def _achieved_dict(cal) -> dict:
    return {k: v for k, v in cal.achieved().items()}


def _achieved(cal) -> str:
    a = cal.achieved()
    g = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    return (f"achieved {g(a['matmul_gflops'])} GFLOP/s on base matmuls, {g(a['lora_gflops'])} on LoRA, "
            f"{g(a['attention_gflops'])} on attention; {a['step_overhead_s'] * 1e3:.1f} ms fixed per micro-batch")


def _what_to_change(memory, cfg, B, T, optim, max_b, max_t, ga, mem) -> str:
    """The changes that make the run fit, most useful first."""
    opts = []
    if max_b is not None and max_b < B:
        k = math.ceil(B / max_b)
        opts.append(f"batch {max_b} at seq {T}" + (f" with grad_accum {ga * k} to keep {B * ga} sequences per step"
                                                     if k > 1 else ""))
    if max_t is not None and max_t < T:
        opts.append(f"seq {max_t} at batch {B}")
    if optim == "adamw" and mem.parts.get("optimizer", 0) > 0:
        eight = memory(cfg, B, T, "adam8bit")
        saved = mem.parts["optimizer"] - eight.parts["optimizer"]
        if saved > 0:
            opts.append(f"optimizer adam8bit (saves {mib(saved)})")
    if cfg.r > 8:
        small = LoraConfig(r=8, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, targets=cfg.targets,
                           layers=cfg.layers)
        saved = mem.total - memory(small, B, T, optim).total
        if saved > 0:
            opts.append(f"rank {small.r} (saves {mib(saved)})")
    if max_b is None and max_t is None:  # not even the smallest step: the changes above cannot be enough alone
        return ("nothing at this rank fits, not even batch 1 at seq 8: free memory, use a smaller model, or raise the "
                "memory cap" + ("; smaller still: " + ", ".join(opts) if opts else ""))
    return "use " + ", or ".join(opts) if opts else "free memory or raise the memory cap"


def _rank_for_budget(model, cal, cfg, n_steps, budget, per_step, fits, optim, every, steps_s) -> dict:
    """The original plan's adaptive rank (LoRA Lab's hardware-aware rank scheduler, decided up front): the
    largest rank that fits the memory (within the headroom) and whose run meets the time budget; when
    none does, how many steps the budget buys at the smallest rank. steps_s(cfg): seconds of the run's steps."""
    def with_rank(r):
        return LoraConfig(r=r, alpha=cfg.alpha * r / cfg.r if not cfg.use_rslora else cfg.alpha, dropout=cfg.dropout,
                          use_rslora=cfg.use_rslora, targets=cfg.targets, layers=cfg.layers)

    def run_s(r):
        s = steps_s(with_rank(r))
        return s + cal.warmup_s + _job_overhead(cal, model.args, with_rank(r), optim, n_steps, every)[0], s / n_steps

    for r in sorted(set(RANKS) | {cfg.r}, reverse=True):
        if r > max(cfg.r, RANKS[0]) or not fits(with_rank(r)):
            continue
        total, _ = run_s(r)
        if total <= budget:
            keep = "keeps" if r == cfg.r else ("raises" if r > cfg.r else "lowers")
            return {"rankForBudget": r, "budgetSeconds": budget, "secondsAtRank": total,
                    "_text": f"rank {r} meets the {budget:.0f} s budget ({total:.0f} s predicted; {keep} r={cfg.r})"}
    total, step = run_s(1)
    fit_steps = max(0, int((budget - (total - n_steps * step)) / step))
    return {"rankForBudget": None, "budgetSeconds": budget, "secondsAtRank": total, "stepsInBudget": fit_steps,
            "_text": f"no rank meets the {budget:.0f} s budget: even r=1 needs {total:.0f} s; the budget buys "
                     f"{fit_steps} steps ({fit_steps * per_step} tokens) — train fewer steps or shorter sequences"}


# -- the protocol form ---------------------------------------------------------------------------------------

def plan_from_params(model, p: Mapping, engine=None, batches: RunBatches | None = None) -> PlanEstimate:
    """PlanParams (protocol) -> PlanEstimate dict for a LoadedModel on an engine (None: the numpy backend).
    Time comes from the cache only (plan/calibrate fills it): the wall-clock calibration, else the CPU-clock one.
    batches: the run's real micro-batches over p's `dataset` (run_batches; the daemon reads the data off the
    model's queue first), priced instead of full rows."""
    m = model
    eng, backend = _engine_and_backend(engine if engine is not None else "numpy")
    device = describe(eng if eng is not None else backend)
    cal = cached(device, m, "wall") or cached(device, m, "cpu") or "cached"
    q = read_settings("PlanParams", p)  # every default from protocol/protocol.json; a wrong field is named
    ds = q.get("datasetTokens")
    if p.get("epochs") is not None and ds is None and q.get("steps") is None and batches is None:
        raise ValueError("epochs needs datasetTokens (dataset/inspect's `tokens`) or dataset; or give steps")
    plan = estimate(m, eng if eng is not None else backend, lora=LoraConfig.from_protocol(q["lora"]),
                    batch=int(q["batchSize"]), seq=int(q["seqLen"]), steps=q.get("steps"), dataset_tokens=ds,
                    epochs=float(q["epochs"]) if ds is not None else None, grad_accum=int(q["gradAccum"]),
                    optim=q["optimizer"], time_budget_s=q.get("timeBudgetSeconds"),
                    memory_cap_bytes=q.get("memoryCapBytes"), calibration=cal, device=device,
                    checkpoint_every=int(q["checkpointEvery"]), batches=batches, activations=q["activations"])
    return plan.to_protocol()
