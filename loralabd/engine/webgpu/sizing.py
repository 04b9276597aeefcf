"""The engine's own buffer plan for a training shape, without a GPU: the real allocation code on a sizing runtime.

`plan_buffers` builds a ModelGraph and its train session's program for (batch, seq, lora, optim) on
`SizingRuntime`, which records every `buffer()` instead of allocating it and records no dispatch. So the
list is what Acts / WebGPUTrainSession.prepare / upload_weight allocate on a device with these limits and
kernel variants (tiled = hardware GPU: flash attention, split dA/dB scratch, 48M-float logit rows) — the
plan and the engine cannot drift apart. loralabd/plan/memory.py turns it into the plan's memory parts.
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from ..interface import OptimSettings
from ..memory import PARTS as MEMORY_PARTS, MemoryPlan, kv_cache_bytes
from .graph import ModelGraph
from .runtime import UPLOAD_CHUNK, Buf, WebGPUError, view
from .train import WebGPUTrainSession

# which part of the plan each buffer is (by the name the engine gives it); the rest of a program: activations
PARTS = {"lora.params": "lora", "lora.grads": "gradients", "gstat": "gradients", "gnorm.parts": "gradients",
         "adam.m": "optimizer", "adam.v": "optimizer", "adam8.m": "optimizer", "adam8.v": "optimizer",
         "adam8.absmax": "optimizer", "adam8.codes": "optimizer", "dropout.dyn": "runtime", "dyn0": "runtime",
         "dummy": "runtime", "dummy_rw": "runtime", "lse": "attention", "delta": "attention",
         "logits_rows": "logits", "logits_chunk": "logits", "ce_state": "logits", "loss": "logits",
         "hyp": "runtime", "inputs": "runtime", "metrics": "runtime"}
WORKSPACE = ("dhf", "dx", "dh", "dact", "dg", "du", "datt", "dq", "dk", "dv", "dxa", "dw_split", "mm_split")


def default_tiled(hardware: bool) -> bool:
    """Runtime.tiled: the GPU-only kernel variants run on hardware adapters (LORALAB_WGPU_TILED=0/1 forces)."""
    env = os.environ.get("LORALAB_WGPU_TILED")
    return hardware if env is None else env == "1"


class SizingRuntime:
    """Runtime's buffer interface, recording sizes (rounded as Runtime.buffer rounds them); ops are not built."""

    def __init__(self, limits: dict | None = None, tiled: bool = False):
        self.limits = dict(limits or {})
        self.tiled = bool(tiled)
        self.align = int(self.limits.get("min-storage-buffer-offset-alignment", 256))
        self.features = ()
        self.allocs: list[tuple[str, int]] = []
        self.live_bytes = self.peak_bytes = 0

    def buffer(self, nbytes: int, name: str = "", data=None, readable=False) -> Buf:
        nbytes = max(16, (int(nbytes) + 15) // 16 * 16)
        self.allocs.append((name, nbytes))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return Buf(object(), nbytes, name)

    def view(self, buf: Buf, offset: int, nbytes: int, name: str = "") -> Buf:
        return view(buf, offset, nbytes, name)

    def free(self, buf: Buf):
        if buf is not None and buf.buffer is not None and buf.offset == 0:
            buf.buffer = None
            self.live_bytes -= buf.nbytes

    def write(self, buf: Buf, data, offset: int = 0):
        pass

    def op(self, *a, **k):
        return None  # nothing runs: only the allocations matter

    def run(self, *a, **k):
        raise WebGPUError("a sizing runtime plans buffers; it cannot run kernels")


class _ZeroAdapter:
    """What WebGPUTrainSession reads of an adapter (config, A/B shapes), with zero (unmaterialised) arrays."""

    def __init__(self, args, cfg):
        self.config = cfg
        self.uid, self.version = 0, 0
        self.A, self.B = {}, {}
        for i in cfg.layer_ids(args.num_hidden_layers):
            for n in cfg.targets:
                o, k = args.linear_shape(n)
                self.A[f"{i}.{n}"] = np.broadcast_to(np.float32(0), (cfg.r, k))
                self.B[f"{i}.{n}"] = np.broadcast_to(np.float32(0), (o, cfg.r))


_ENGINES: dict = {}  # id(model) -> (weakref to the model, {settings: (engine on a SizingRuntime, n weight allocs)})


def _sizing_graph(model, limits, tiled, vocab_chunk, ce_row_chunk):
    ref, engines = _ENGINES.get(id(model), (None, None))
    if ref is None or ref() is not model:
        engines = {}
        _ENGINES[id(model)] = (weakref.ref(model), engines)
    key = (tuple(sorted((k, v) for k, v in (limits or {}).items() if isinstance(v, (int, float)))), bool(tiled),
           vocab_chunk, ce_row_chunk)
    if key not in engines:
        rt = SizingRuntime(limits, tiled)
        engines[key] = (ModelGraph(rt, model, vocab_chunk, ce_row_chunk), len(rt.allocs))
    return engines[key]


def plan_buffers(model, batch: int, seq: int, lora_config, optim: str = "adamw", limits: dict | None = None,
                 tiled: bool = False, vocab_chunk: int | None = None, ce_row_chunk: int | None = None,
                 recompute: bool = False) -> list:
    """[(name, part, nbytes)] of every buffer WebGPUEngine(model) + its train session allocate to train
    (batch, seq) with this LoRA config and optimizer (adamw | adam8bit) on an adapter with these limits,
    keeping activations or recomputing them (OptimSettings.recompute)."""
    if optim not in ("adamw", "adam8bit"):
        raise ValueError(f"optimizer must be 'adamw' or 'adam8bit', not {optim!r}")
    graph, n_weights = _sizing_graph(model, limits, tiled, vocab_chunk, ce_row_chunk)
    rt = graph.rt
    del rt.allocs[n_weights:]
    sess = WebGPUTrainSession(graph, _ZeroAdapter(model.args, lora_config), OptimSettings(kind=optim, recompute=recompute))  # type: ignore[arg-type]
    n_sess = len(rt.allocs)
    sess.reserve(int(batch), int(seq))
    sess.prepare_eval(int(batch), int(seq))  # validation runs on its own program, kept beside the step's
    out = []
    for j, (name, nbytes) in enumerate(rt.allocs):
        part = PARTS.get(name) or PARTS.get(name.split(".")[0])  # "lse.3": a kept layer's own
        if part is None:
            part = "weights" if j < n_weights else ("workspace" if name in WORKSPACE else "activations")
        out.append((name, part, nbytes))
    del rt.allocs[n_weights:]
    if n_sess <= n_weights:
        raise WebGPUError("the train session allocated nothing")  # the plan would silently miss its state
    # Runtime.dummy / dummy_rw: bound where a kernel's optional buffer is absent (every training program)
    return out + [("dummy", "runtime", 64), ("dummy_rw", "runtime", 64)]


def memory_plan(model, batch: int, seq: int, lora_config, optim: str = "adamw", limits: dict | None = None,
                tiled: bool = False, vocab_chunk: int | None = None, ce_row_chunk: int | None = None,
                recompute: bool = False) -> MemoryPlan:
    """plan_buffers by part: the training step's buffers (all live together: the peak), the weights resident
    after loading, and the load peak: the weights plus at most UPLOAD_CHUNK of staging (Runtime.write)."""
    bufs = plan_buffers(model, batch, seq, lora_config, optim, limits, tiled, vocab_chunk, ce_row_chunk, recompute)
    parts = dict.fromkeys(MEMORY_PARTS, 0)
    for _, part, nbytes in bufs:
        parts[part] = parts.get(part, 0) + nbytes
    resident = parts["weights"]
    notes = [f"buffers: WebGPUEngine's allocations for this shape ({'hardware' if tiled else 'software'} adapter "
             "kernels), planned by the engine's own code",
             "activations: " + ("each layer's input kept, the rest recomputed in the backward" if recompute
                                else "every layer's kept for the backward"),
             f"loading: the weights plus at most {UPLOAD_CHUNK >> 20} MiB of upload staging at a time"]
    total = sum(parts.values())
    return MemoryPlan("webgpu", parts, "training step", {"training step": total}, resident=resident,
                      load=resident + min(UPLOAD_CHUNK, resident), kv_cache=kv_cache_bytes(model.args, 1, seq),
                      buffers=bufs, notes=notes)
