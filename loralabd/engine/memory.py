"""What an engine allocates to load a model and to train it: the engine's own account, read by the planner.

Each engine answers `Engine.memory_plan(batch, seq, lora_config, optim)` (engine/interface.py) with a
MemoryPlan; without an engine, `engine.select.memory_plan(model, backend, ...)` asks the engine's code the same
question. The numbers are the engine's allocations only: what the process or driver adds on top (interpreter,
device context, pipelines, allocator pools) is measured by the planner at calibration (plan/observe.py).

numpy engine (numpy_engine.py): dequantizes every base weight to f32 once and keeps it; keeps every layer's
activations for backward (no checkpointing); materialises attention scores (B, H, T, T); cross-entropy in
vocabulary chunks of (N, chunk). A step goes through phases; the peak is the largest phase.
WebGPU engine (webgpu/sizing.py): its allocation code run on a sizing runtime, one buffer per allocation.
Shapes: B batch, T sequence, N = B*T, D width, F FFN width, H heads, KV key/value heads, hd head dim,
V vocabulary, L layers, P LoRA parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.args import LINEAR_NAMES
from .lora import LoraConfig

F32 = 4
QBLOCK = 256  # 8-bit optimizer block (numpy_train.QBLOCK)

PARTS = ("weights", "dequantized", "lora", "gradients", "optimizer", "activations", "attention", "logits",
         "workspace", "runtime")


@dataclass
class MemoryPlan:
    """An engine's allocations for one training shape.

    parts: bytes by part at the training step's peak; phase/phases: which phase of a step is the peak and every
    phase's total; resident: what the engine keeps between steps once it has trained (weights as stored, and the
    numpy engine's f32 copies); load: its peak while loading (the weights, plus upload staging on a GPU); buffers: single allocations (name, part, bytes) — on WebGPU
    each is one binding, checked against the adapter's limits; kv_cache: generating after training at batch 1."""

    backend: str
    parts: dict
    phase: str
    phases: dict
    resident: int
    load: int | None  # None: the engine allocates nothing at load (the CPU holds what the model reader made)
    kv_cache: int
    buffers: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


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

def numpy_memory_plan(model, cfg: LoraConfig, batch: int, seq: int, optim: str = "adamw", vocab_chunk: int = 8192,
                      first_step: bool = True) -> MemoryPlan:
    """The numpy engine's arrays at each phase of a training step (first_step: the output matrix is still to be
    dequantized, inside the first loss)."""
    a = model.args
    B, T = int(batch), int(seq)
    N = B * T
    D, F, H, hd, V = a.hidden_size, a.intermediate_size, a.num_attention_heads, a.head_dim, a.vocab_size
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

    const = {"weights": weights, "dequantized": dequantized, "lora": lora, "optimizer": opt, "runtime": 0}
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
    # a checkpoint between steps (the trainer's, every checkpointEvery steps and at the end): state_dict copies
    # A, B and the moments, and safetensors.numpy.save holds each tensor's bytes and the joined blob at once
    # (measured: twice the state)
    state = F32 * P + opt
    phases["checkpoint"] = dict(const, gradients=0, activations=0, attention=0, logits=0, workspace=3 * state)
    for ph in phases.values():
        ph["gradients"] += grads_acc if ph is not phases["optimizer step"] else 0
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    parts = {p: int(phases[peak].get(p, 0)) for p in PARTS}
    notes = [f"weights: {weights} bytes, the loaded model's quantized tensors",
             "dequantized: the numpy engine keeps every base weight and the output matrix in f32",
             "activations: every layer's (no checkpointing in the numpy engine)",
             "loading: not predicted on the CPU (the model file reader's own objects: the GGUF reader holds "
             "about twice the file while it parses the metadata); the training step's peak is far above it",
             f"peak in the {peak} phase"]
    return MemoryPlan("numpy", parts, peak, totals, resident=weights + dequantized, load=None,
                      kv_cache=kv_cache_bytes(a, 1, T), notes=notes)
