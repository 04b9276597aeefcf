"""Memory of one training run, by part, for the engine as built.

Counted from the loaded model's real tensors (quantized weight bytes) and the exact shapes each engine
allocates. A step goes through phases (forward, loss, backward, optimizer); the peak is the largest phase,
and the parts reported are that phase's. Shapes: B batch, T sequence, N = B*T, D width, F FFN width,
H heads, KV key/value heads, hd head dim, V vocabulary, L layers, P LoRA parameters.

numpy engine (loralabd/engine/numpy_engine.py): dequantizes every base weight to f32 once and keeps it;
keeps every layer's activations for backward (no checkpointing); materialises attention scores
(B, H, T, T) in float32; cross-entropy in vocabulary chunks of (N, chunk).

WebGPU engine (loralabd/engine/webgpu/): base weights stay quantized; per-layer checkpointing (each layer
keeps its input, one layer's activations are reused by all); flash-style attention; vocabulary-chunked
logits. Every allocation is one buffer, so each is checked against the adapter's binding limits. The list is
the engine's own (`WebGPUEngine.plan_buffers`, engine/webgpu/sizing.py: its allocation code run without
allocating), so it follows the kernel variants each adapter runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.lora import LoraConfig
from ..models.args import LINEAR_NAMES

F32 = 4
QBLOCK = 256  # 8-bit optimizer block (numpy_train.QBLOCK)
# What loading the model leaves in the process besides its weight tensors: tokenizer, GGUF metadata and
# freed-but-kept malloc arenas. Measured: +40 MiB of resident memory beyond the default model's tensors.
RUNTIME_BYTES = 40 << 20

PARTS = ("weights", "dequantized", "lora", "gradients", "optimizer", "activations", "attention", "logits",
         "workspace", "runtime")


@dataclass
class Buffer:
    name: str
    part: str
    nbytes: int


@dataclass
class MemoryEstimate:
    backend: str
    parts: dict  # part -> bytes, at the peak phase
    phase: str  # which phase is the peak
    phases: dict  # phase -> total bytes
    kv_cache: int  # generation after training: batch 1, `seq` positions
    buffers: list = field(default_factory=list)  # single allocations (WebGPU: each is one binding)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def to_dict(self) -> dict:
        return {"backend": self.backend, "parts": {k: int(v) for k, v in self.parts.items()}, "total": self.total,
                "peakPhase": self.phase, "phases": {k: int(v) for k, v in self.phases.items()},
                "kvCache": int(self.kv_cache), "notes": list(self.notes)}


# -- sizes shared by both engines -------------------------------------------------------------------

def lora_params(args, cfg: LoraConfig) -> int:
    n_layers = len(cfg.layer_ids(args.num_hidden_layers))
    return n_layers * sum(cfg.r * (i + o) for n in cfg.targets for (o, i) in [args.linear_shape(n)])


def lora_tensors(args, cfg: LoraConfig) -> list[int]:
    """Element counts of every A and B (the optimizer's 8-bit blocks are per tensor)."""
    out = []
    for _ in cfg.layer_ids(args.num_hidden_layers):
        for n in cfg.targets:
            o, i = args.linear_shape(n)
            out += [cfg.r * i, o * cfg.r]
    return out


def optimizer_bytes(args, cfg: LoraConfig, optim: str) -> int:
    if optim == "adamw":
        return 2 * F32 * lora_params(args, cfg)
    if optim == "adam8bit":  # uint8 codes + one f32 absmax per block of 256, for m and for v
        return 2 * sum(n + F32 * -(-n // QBLOCK) for n in lora_tensors(args, cfg))
    raise ValueError(f"optimizer must be 'adamw' or 'adam8bit', not {optim!r}")


def dense_weight_elems(args) -> int:
    """Elements of the 7 projections of every layer (all of them, targeted or not)."""
    return args.num_hidden_layers * sum(o * i for n in LINEAR_NAMES for (o, i) in [args.linear_shape(n)])


def kv_cache_bytes(args, batch: int, max_len: int) -> int:
    return 2 * args.num_hidden_layers * batch * max_len * args.num_key_value_heads * args.head_dim * F32


def layer_saved_floats(args, cfg: LoraConfig, layer_targeted: bool) -> int:
    """f32 values per token that one layer keeps for its backward (numpy_engine._forward, keep=True):
    x, hN, x1, h2N (D each); q, attN (H*hd); k, v (KV*hd); g, u, act (F); rstd x2; lse (H);
    LoRA xa (r) per target, plus a dropout mask (in_features) per target when dropout > 0."""
    D, F, H, KV, hd = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
    n = 4 * D + 2 * H * hd + 2 * KV * hd + 3 * F + 2 + H
    if layer_targeted:
        n += cfg.r * len(cfg.targets)
        if cfg.dropout > 0:
            n += sum(args.linear_shape(t)[1] for t in cfg.targets)
    return n


# -- the numpy engine -------------------------------------------------------------------------------

def numpy_memory(model, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw", vocab_chunk: int = 8192,
                 first_step: bool = True) -> MemoryEstimate:
    a = model.args
    B, T = int(batch), int(seq)
    N = B * T
    D, F, H, KV, hd, V = (a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads,
                          a.head_dim, a.vocab_size)
    L = a.num_hidden_layers
    chunk = min(vocab_chunk, V)
    P = lora_params(a, cfg)
    targeted = set(cfg.layer_ids(L))

    weights = int(model.weight_bytes())
    out_dense = V * D * F32  # the output matrix (tied embedding), dequantized once and kept
    dequantized = dense_weight_elems(a) * F32 + out_dense
    # the session's copy of A/B (the caller's adapter is the caller's), the gradient accumulator, the moments
    lora = F32 * P
    grads_acc = F32 * P
    opt = optimizer_bytes(a, cfg, optim)

    saved = N * F32 * sum(layer_saved_floats(a, cfg, i in targeted) for i in range(L))
    saved += 2 * B * T * hd * F32 + T * T  # rope cos/sin (B, T, hd), causal mask (1, T, T) bool
    final = N * (2 * D + 1) * F32  # x_final, hf, rstd

    const = {"weights": weights, "dequantized": dequantized, "lora": lora, "optimizer": opt, "runtime": RUNTIME_BYTES}
    S = B * H * T * T  # attention score elements
    qkv_rep = 2 * N * H * hd * F32  # np.repeat of k and v to H heads
    phases: dict[str, dict] = {}

    # last layer's attention forward: scores f32, masked copy, exp temp, probabilities -> 3 live (B,H,T,T) f32
    phases["attention forward"] = dict(const, gradients=0, activations=saved, attention=3 * S * F32 + qkv_rep,
                                       logits=0, workspace=N * H * hd * (F32 + F32))
    # loss: logits chunk z, z - max, exp -> 3 (N, chunk) f32
    phases["loss"] = dict(const, gradients=0, activations=saved + final, attention=0, logits=3 * N * chunk * F32,
                          workspace=4 * N * F32)
    if first_step:  # the output matrix is dequantized inside the first loss: q8 -> f32 temp, then the product
        nb = D // 32
        phases["first loss (dequantize output)"] = dict(
            const, gradients=0, activations=saved + final, attention=0, logits=0, workspace=out_dense + V * nb * F32)
    # loss backward: exp(z - lse) in place, p * w -> 2 (N, chunk) f32 + dh (N, D)
    phases["loss backward"] = dict(const, gradients=0, activations=saved + final, attention=0,
                                   logits=2 * N * chunk * F32, workspace=N * D * F32 + 2 * N * F32)
    # top layer's attention backward: scores s, P, dP, dP - delta (f32) -> 16 bytes per score;
    # repeated k, v (f32), dv (f32) and dq, dk (B, T, H, hd); dx, dx1, dh (N, D) alive across the loop
    phases["attention backward"] = dict(const, gradients=F32 * P // L * 2, activations=saved + final,
                                        attention=S * (3 * F32 + F32) + qkv_rep,
                                        logits=0, workspace=N * (H * hd * (F32 + 2 * F32) + 4 * D * F32))
    # MLP backward of the top layer: dact, dg, du, swiglu temps (N, F) and dh2 (N, D)
    phases["mlp backward"] = dict(const, gradients=F32 * P // L, activations=saved + final, attention=0, logits=0,
                                  workspace=N * (6 * F + 4 * D) * F32)
    # optimizer step: normalized gradient copy (+ dequantized moments per tensor with adam8bit)
    biggest = max(lora_tensors(a, cfg) or [0])
    phases["optimizer step"] = dict(const, gradients=grads_acc + F32 * P, activations=0, attention=0, logits=0,
                                    workspace=(3 * F32 * biggest if optim == "adam8bit" else 0))
    for ph in phases.values():
        ph["gradients"] += grads_acc if ph is not phases["optimizer step"] else 0
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    parts = {p: int(phases[peak].get(p, 0)) for p in PARTS}
    notes = [f"weights: {weights} bytes, the loaded model's quantized tensors",
             "dequantized: the numpy engine keeps every base weight and the output matrix in f32",
             "activations: every layer's (no checkpointing in the numpy engine)",
             f"peak in the {peak} phase"]
    return MemoryEstimate("numpy", parts, peak, totals, kv_cache_bytes(a, 1, T), [], notes)


# -- the WebGPU engine ------------------------------------------------------------------------------

def webgpu_memory(model, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw", limits: dict | None = None,
                  engine=None, tiled: bool | None = None) -> MemoryEstimate:
    """The engine's own buffer list for this shape (engine/webgpu/sizing.py: WebGPUEngine's allocation code run
    without allocating). With an engine, its device's limits and kernel variants; without one, `limits` and
    `tiled` (the GPU-only variants of hardware adapters: split dA/dB scratch, larger logit rows)."""
    from ..engine.webgpu.engine import WebGPUEngine

    if isinstance(engine, WebGPUEngine):
        raw = engine.plan_buffers(batch, seq, cfg, optim)
        notes = ["buffers: the engine's own list for this shape"]
    else:
        from ..engine.webgpu.sizing import default_tiled, plan_buffers

        t = default_tiled(True) if tiled is None else tiled
        raw = plan_buffers(model, batch, seq, cfg, optim, limits or {}, t)
        notes = [f"buffers: WebGPUEngine's allocations for this shape ({'hardware' if t else 'software'} "
                 "adapter kernels), planned by the engine's own code"]
    bufs = [b if isinstance(b, Buffer) else Buffer(*b) for b in raw]
    parts = dict.fromkeys(PARTS, 0)
    for b in bufs:
        parts[b.part] = parts.get(b.part, 0) + b.nbytes
    total = sum(parts.values())
    return MemoryEstimate("webgpu", parts, "training step", {"training step": total},
                          kv_cache_bytes(model.args, 1, seq), bufs, notes)


def training_memory(model, backend: str, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw",
                    limits: dict | None = None, engine=None, tiled: bool | None = None) -> MemoryEstimate:
    """limits: the WebGPU adapter's (they size the logits); engine: to read its settings / buffer list;
    tiled: without an engine, whether the adapter runs the hardware-GPU kernel variants (default: yes)."""
    if backend == "numpy":
        from ..engine.numpy_engine import NumpyEngine

        return numpy_memory(model, cfg, batch, seq, optim, engine.vocab_chunk if isinstance(engine, NumpyEngine)
                            else 8192)
    if backend == "webgpu":
        return webgpu_memory(model, cfg, batch, seq, optim, limits, engine, tiled)
    raise ValueError(f"unknown backend {backend!r}; use 'numpy' or 'webgpu'")


# -- limits -----------------------------------------------------------------------------------------

def binding_violations(mem: MemoryEstimate, limits: dict) -> list[dict]:
    """Every buffer larger than one storage binding or one buffer may be on this adapter."""
    out = []
    for key, what in (("max-storage-buffer-binding-size", "storage binding"), ("max-buffer-size", "buffer")):
        lim = limits.get(key)
        if not lim:
            continue
        for b in mem.buffers:
            if b.nbytes > lim:
                out.append({"limit": key, "what": f"buffer {b.name!r} ({b.part})", "needed": int(b.nbytes),
                            "available": int(lim), "over": int(b.nbytes - lim)})
    return out


def mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"
