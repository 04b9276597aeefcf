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
logits. Every allocation is one buffer, so each is checked against the adapter's binding limits. Where the
engine can list its own buffers (`engine.plan_buffers(batch, seq, lora_config, optim)`), that list is used.
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
    peak = max(totals, key=totals.get)
    parts = {p: int(phases[peak].get(p, 0)) for p in PARTS}
    notes = [f"weights: {weights} bytes, the loaded model's quantized tensors",
             "dequantized: the numpy engine keeps every base weight and the output matrix in f32",
             "activations: every layer's (no checkpointing in the numpy engine)",
             f"peak in the {peak} phase"]
    return MemoryEstimate("numpy", parts, peak, totals, kv_cache_bytes(a, 1, T), [], notes)


# -- the WebGPU engine ------------------------------------------------------------------------------

def _buf16(n: int) -> int:
    return max(16, (int(n) + 15) // 16 * 16)  # runtime.buffer rounds every allocation up to 16 bytes


def webgpu_chunk(args, N: int, limits: dict, vocab_chunk: int | None = None) -> int:
    """WebGPUEngine.chunk_size: (N, C) logits of at most ~16M floats and one storage binding."""
    V = args.vocab_size
    if vocab_chunk:
        return min(V, vocab_chunk)
    lim = min(1 << 24, limits.get("max-storage-buffer-binding-size", 1 << 27) // 4)
    return int(min(V, max(256, lim // max(N, 1))))


def webgpu_buffers(model, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw", limits: dict | None = None,
                   vocab_chunk: int | None = None) -> list[Buffer]:
    """The buffers WebGPUEngine + WebGPUTrainSession allocate for one training shape (engine/webgpu/engine.py,
    train.py): weights as stored (4-bit blocks + f16 scales), one flat f32 buffer each for LoRA params,
    grads and moments, per-layer checkpoints (L + 1 of (N, D)), one layer's activations and gradients,
    flash-style attention (only lse and delta per row), one (N, chunk) logits buffer."""
    a = model.args
    limits = limits or {}
    B, T = int(batch), int(seq)
    N = B * T
    D, F, H, KV, hd, V = (a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads,
                          a.head_dim, a.vocab_size)
    L, r = a.num_hidden_layers, cfg.r
    Hq, Hk = H * hd, KV * hd
    out: list[Buffer] = []

    def add(name, part, nbytes):
        out.append(Buffer(name, part, _buf16(nbytes)))

    def weight(name, qt):
        if qt.kind in ("q4_1", "q8_0"):
            add(name, "weights", qt.qs.nbytes)
            add(name + ".scales", "weights", qt.scales.nbytes + (2 if qt.kind == "q8_0" and qt.scales.size % 2 else 0))
        elif qt.kind == "f16":
            add(name, "weights", qt.shape[0] * -(-qt.shape[1] // 4) * 4 * 2)
        else:
            add(name, "weights", qt.shape[0] * qt.shape[1] * F32)

    for i, Lw in enumerate(model.layers):
        for n in LINEAR_NAMES:
            weight(f"{i}.{n}", Lw.linear[n])
        for n, b in Lw.bias.items():
            add(f"{i}.{n}.bias", "weights", b.nbytes)
        add(f"{i}.ln1", "weights", F32 * D)
        add(f"{i}.ln2", "weights", F32 * D)
    add("norm", "weights", F32 * D)
    weight("embed", model.embed_tokens)
    if model.lm_head is not None:
        weight("lm_head", model.lm_head)
    add("rope", "weights", a.max_position_embeddings * hd * F32)
    add("dyn0", "runtime", 16)
    add("dummy", "runtime", 64)
    # the train session: flat A/B (each tensor padded to 256 floats), grads, moments
    n = max(sum(-(-k // 256) * 256 for k in lora_tensors(a, cfg)), 256)
    add("lora.params", "lora", F32 * n)
    add("lora.grads", "gradients", F32 * n)
    add("gstat", "gradients", 16)
    add("gnorm.parts", "gradients", F32 * 64)
    if optim == "adamw":
        add("adam.m", "optimizer", F32 * n)
        add("adam.v", "optimizer", F32 * n)
    else:
        add("adam8.m", "optimizer", n)
        add("adam8.v", "optimizer", n)
        add("adam8.absmax", "optimizer", 8 * (n // QBLOCK))
        add("adam8.codes", "optimizer", F32 * 4 * 256)
    # Acts of the (B, T) shape
    for name, floats in (("tok", N), ("pos", N), ("seg", N), ("labels", N), ("r1", N), ("r2", N), ("rf", N)):
        add(name, "activations", F32 * floats)
    for name, floats in (("h", N * D), ("q", N * Hq), ("k", N * Hk), ("v", N * Hk), ("att", N * Hq), ("x1", N * D),
                         ("h2", N * D), ("g", N * F), ("u", N * F), ("act", N * F), ("hf", N * D)):
        add(name, "activations", F32 * floats)
    for t in cfg.targets:  # LoRA's x·Aᵀ, one per projection name (reused by every layer)
        add(f"xa0.{t}", "activations", F32 * N * r)
    for i in range(L + 1):
        add(f"x{i}", "activations", F32 * N * D)  # the checkpoints
    add("ce_state", "logits", F32 * N * 4)
    add("loss", "logits", F32)
    for name, floats in (("dhf", N * D), ("dx", N * D), ("dh", N * D), ("dact", N * F), ("dg", N * F), ("du", N * F),
                         ("datt", N * Hq), ("dq", N * Hq), ("dk", N * Hk), ("dv", N * Hk), ("dxa", N * r)):
        add(name, "workspace", F32 * floats)
    add("lse", "attention", F32 * B * H * T)
    add("delta", "attention", F32 * B * H * T)
    add("logits_chunk", "logits", F32 * N * webgpu_chunk(a, N, limits, vocab_chunk))
    return out


def webgpu_memory(model, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw", limits: dict | None = None,
                  engine=None) -> MemoryEstimate:
    notes = []
    bufs = None
    if engine is not None and hasattr(engine, "plan_buffers"):
        bufs = [Buffer(*b) if not isinstance(b, Buffer) else b for b in engine.plan_buffers(batch, seq, cfg, optim)]
        notes.append("buffers: the engine's own list for this shape")
    if bufs is None:
        bufs = webgpu_buffers(model, cfg, batch, seq, optim, limits, getattr(engine, "vocab_chunk", None))
        notes.append("buffers: WebGPUEngine's allocations for this shape, counted from its code")
    parts = dict.fromkeys(PARTS, 0)
    for b in bufs:
        parts[b.part] = parts.get(b.part, 0) + b.nbytes
    total = sum(parts.values())
    return MemoryEstimate("webgpu", parts, "training step", {"training step": total},
                          kv_cache_bytes(model.args, 1, seq), bufs, notes)


def training_memory(model, backend: str, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw",
                    limits: dict | None = None, engine=None) -> MemoryEstimate:
    """limits: the WebGPU adapter's (they set the logits chunk); engine: to read its settings / buffer list."""
    if backend == "numpy":
        return numpy_memory(model, cfg, batch, seq, optim, getattr(engine, "vocab_chunk", 8192))
    if backend == "webgpu":
        return webgpu_memory(model, cfg, batch, seq, optim, limits, engine)
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
