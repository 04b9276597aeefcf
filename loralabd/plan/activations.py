"""Keep every layer's activations for the backward, or recompute them (per-layer activation checkpointing).

Keeping is faster — the backward does not run the forward a second time (a step at batch 8 x 512 on an H200:
283 against 366 ms) — and holds more memory (there: 4.4 against 0.9 GiB). `train/start`'s `activations`
setting picks: "keep", "recompute", or "auto" (the default): keep when the step's memory with every activation
kept fits what the device has (the plan's available memory, within its headroom), else recompute. Both give
the same bits, so the choice never changes a run's results, and a resumed run may choose otherwise (a resume
decides `auto` again; a checkpoint does not pin the mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.lora import LoraConfig
from .memory import mib, training_memory

MODES = ("auto", "keep", "recompute")


@dataclass(frozen=True)
class Choice:
    recompute: bool
    reason: str

    @property
    def mode(self) -> str:
        return "recompute" if self.recompute else "keep"


def peaks(model, backend: str, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw", **kw) -> dict:
    """{"keep": MemoryEstimate, "recompute": MemoryEstimate} of a training step (plan/memory.training_memory's
    keywords: limits, engine, hardware, runtime, quantity)."""
    return {m: training_memory(model, backend, cfg, batch, seq, optim, recompute=m == "recompute", **kw)
            for m in ("keep", "recompute")}


def choose(mode: str, keep_bytes: int | None, recompute_bytes: int | None, available: int | None,
           backend: str = "webgpu", assumed: bool = False) -> Choice:
    """The activation mode of a run: `mode` unless it is "auto"; then keep if keeping fits `available` (assumed:
    that figure is a guess, the device's memory unknown — the reason says so and how to give it)."""
    if mode not in MODES:
        raise ValueError(f"activations must be one of {', '.join(MODES)}, not {mode!r}")
    if backend == "numpy":  # the numpy engine always keeps its activations
        return Choice(False, "the numpy engine keeps its activations")
    if mode != "auto":
        return Choice(mode == "recompute", f"activations: {mode} (given)")
    guess = (" — the device's memory is not known, so that figure is assumed (set LORALAB_DEVICE_MEMORY, or choose "
             "activations keep or recompute)") if assumed else ""
    if keep_bytes is None or available is None or keep_bytes <= available:
        why = "fits" if available is not None and keep_bytes is not None else "no memory limit known"
        room = "" if available is None or keep_bytes is None else f" ({mib(keep_bytes)} of {mib(available)})"
        return Choice(False, f"activations kept: {why}{room}{guess}")
    rec = "" if recompute_bytes is None else f" (recomputing: {mib(recompute_bytes)})"
    return Choice(True, f"activations recomputed in the backward: keeping them needs {mib(keep_bytes)}, more than the "
                        f"{mib(available)} available{rec}{guess}")
