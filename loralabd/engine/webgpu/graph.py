"""The model as a graph of WGSL dispatches: weights on the GPU and the ops of a layer, shared by inference
(engine.py) and training (train.py). Nothing here runs anything: it records ops into programs.

Base weights are uploaded once in their stored format (4-bit blocks stay 4-bit); q/k/v and gate/up are
row ranges of one fused weight where the parts share a format.
"""

from __future__ import annotations

import os
import copy
from dataclasses import dataclass, field

import numpy as np

from ...models.args import LINEAR_NAMES
from ...models.load import LoadedModel
from .. import reference as R
from . import kernels as K
from .runtime import Buf, WebGPUError

def drop_salt(layer: int, name: str) -> int:
    """Distinguishes the dropout masks of the 7 projections of each layer."""
    return layer * 8 + LINEAR_NAMES.index(name)


@dataclass
class LayerGpu:
    ln1: Buf
    ln2: Buf
    W: dict  # name -> (GpuWeight, first row, rows): q/k/v and gate/up are row ranges of one fused weight
    bias: dict  # name -> Buf
    fused: dict = field(default_factory=dict)  # "qkv" | "gu" -> (GpuWeight, bias Buf | None, row bounds)


GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gu": ("gate_proj", "up_proj")}


def _concat_rows(parts):
    """One QuantTensor of the rows of several with the same format and width (blocks run along rows)."""
    from ...models.quant import QuantTensor

    q0 = parts[0]
    sc = None if q0.scales is None else np.concatenate([p.scales for p in parts], axis=0)
    return QuantTensor(q0.kind, (sum(p.shape[0] for p in parts), q0.shape[1]),
                       np.concatenate([p.qs for p in parts], axis=0), sc)


class Acts:
    """Activation buffers of one (batch, seq) shape, allocated once (the arena)."""

    def __init__(self, rt, args, B, T, tag=""):
        self.rt, self.B, self.T, self.N = rt, B, T, B * T
        a = args
        N, D, F = self.N, a.hidden_size, a.intermediate_size
        Hq, Hk = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        self.bufs: list[Buf] = []
        f = self.alloc
        # seg: the (B, T) segment ids, then room for their block ranges (kernels.segment_ranges: blocks >= 16)
        self.tok, self.pos, self.lab = f(N, "tok"), f(N, "pos"), f(N, "labels")
        self.seg = f(N + 2 * B * -(-T // 16), "seg")
        self.h, self.r1, self.q, self.k, self.v = f(N * D, "h"), f(N, "r1"), f(N * Hq, "q"), f(N * Hk, "k"), f(N * Hk, "v")
        self.att, self.lse = f(N * Hq, "att"), f(B * a.num_attention_heads * T, "lse")
        self.x1, self.h2, self.r2 = f(N * D, "x1"), f(N * D, "h2"), f(N, "r2")
        self.g, self.u, self.act = f(N * F, "g"), f(N * F, "u"), f(N * F, "act")
        self.hf, self.rf = f(N * D, "hf"), f(N, "rf")
        self._xa: dict = {}
        self._split_n = K.split_scratch_floats(N, max(D, F, Hq)) if rt.tiled else 0

    # what a layer's backward reads of its forward: kept per layer when training keeps activations
    LAYER = ("h", "r1", "q", "k", "v", "att", "lse", "x1", "h2", "r2", "g", "u", "act")

    def layer_copy(self, i: int) -> "Acts":
        """These Acts with layer i's own forward buffers (LAYER and the LoRA inputs xa); inputs, the final norm
        and scratch stay shared. Its buffers are freed with this one's."""
        self.split_scratch()  # created before the copy so every layer shares it
        c = copy.copy(self)
        c._xa = {k: v for k, v in self._xa.items() if not isinstance(k, tuple)}
        for name in self.LAYER:
            setattr(c, name, self.alloc(getattr(self, name).nbytes // 4, f"{name}.{i}"))
        return c

    def alloc(self, n, name) -> Buf:
        b = self.rt.buffer(4 * n, name)
        self.bufs.append(b)
        return b

    def lazy(self, name, n) -> Buf:
        """A buffer only some programs need (fused q/k/v and gate/up outputs), allocated on first use."""
        if name not in self._xa:
            self._xa[name] = self.alloc(n, name)
        return self._xa[name]

    def split_scratch(self) -> Buf | None:
        """Scratch of the K-split tiled matmuls (kernels.matmul_ops): small batches on hardware GPUs."""
        return self.lazy("mm_split", self._split_n) if self._split_n else None

    def xa(self, j, name, r) -> Buf:
        key = (j, name, r)
        if key not in self._xa:
            self._xa[key] = self.alloc(self.N * r, f"xa{j}.{name}")
        return self._xa[key]

    def free(self):
        for b in self.bufs:
            self.rt.free(b)
        self.bufs = []


@dataclass
class Program:
    ops: list
    acts: Acts
    out: Buf | None = None  # logits or sampled ids
    extra: dict = field(default_factory=dict)



class ModelGraph:
    """A loaded model's weights on one runtime, and the recorded ops of its layers (forward and decode)."""

    def __init__(self, rt, model: LoadedModel, vocab_chunk: int | None = None, ce_row_chunk: int | None = None):
        self.rt = rt  # runtime.Runtime, or sizing.SizingRuntime (plan only: records allocations)
        self.model, self.args = model, model.args
        a = self.args
        if a.head_dim % 2:
            raise WebGPUError(f"head_dim {a.head_dim} must be even for RoPE")
        self.layers = []
        for i, L in enumerate(model.layers):
            W, fused = {}, {}
            for g, names in GROUPS.items():  # fused when the parts share a format: one dispatch for decode
                parts = [L.linear[n] for n in names]
                if len({(q.kind, q.shape[1]) for q in parts}) != 1:
                    continue
                w = K.upload_weight(rt, _concat_rows(parts), f"{i}.{g}")
                bounds, r0 = [], 0
                for n, q in zip(names, parts):
                    W[n] = (w, r0, q.shape[0])
                    r0 += q.shape[0]
                    bounds.append(r0)
                fb = None
                if any(n in L.bias for n in names):
                    cat = np.concatenate([L.bias.get(n, np.zeros(q.shape[0], np.float32)) for n, q in zip(names, parts)])
                    fb = rt.buffer(cat.nbytes, f"{i}.{g}.bias", cat.astype(np.float32))
                fused[g] = (w, fb, bounds[:-1])
            for n in LINEAR_NAMES:
                if n not in W:
                    W[n] = (K.upload_weight(rt, L.linear[n], f"{i}.{n}"), 0, L.linear[n].shape[0])
            bias = {n: rt.buffer(b.nbytes, f"{i}.{n}.bias", b.astype(np.float32)) for n, b in L.bias.items()}
            self.layers.append(LayerGpu(rt.buffer(4 * a.hidden_size, f"{i}.ln1", L.input_layernorm.astype(np.float32)),
                                        rt.buffer(4 * a.hidden_size, f"{i}.ln2",
                                                  L.post_attention_layernorm.astype(np.float32)), W, bias, fused))
        self.norm = rt.buffer(4 * a.hidden_size, "norm", model.norm.astype(np.float32))
        self.emb = K.upload_weight(rt, model.embed_tokens, "embed")
        self.out = self.emb if model.lm_head is None else K.upload_weight(rt, model.lm_head, "lm_head")
        self.max_pos = int(a.max_position_embeddings)
        cos, sin = R.rope_tables(np.arange(self.max_pos), a.head_dim, a.rope_theta)  # (P, hd)
        h2 = a.head_dim // 2
        tab = np.stack([cos[:, :h2], sin[:, :h2]], axis=-1).astype(np.float32)  # (P, hd/2, 2)
        self.rope_tab = rt.buffer(tab.nbytes, "rope", tab)
        self.dyn0 = rt.buffer(16, "dyn0", np.zeros(4, np.uint32))
        self.vocab_chunk = vocab_chunk
        self.ce_row_chunk = ce_row_chunk

    # -- building blocks shared with the train session ---------------------------------------------------

    def chunk_size(self, N: int) -> int:
        """Vocabulary chunk for the fused cross-entropy: (N, C) logits at most ~16M floats at a time."""
        V = self.args.vocab_size
        if self.vocab_chunk:
            return min(V, self.vocab_chunk)
        lim = min(1 << 24, self.rt.limits.get("max-storage-buffer-binding-size", 1 << 27) // 4)
        return int(min(V, max(256, lim // max(N, 1))))

    def ce_rows(self, N: int) -> int:
        """Rows per chunk of the training cross-entropy: (rows, V) logits of at most 16M floats at a time —
        48M on hardware GPUs, where dh = grad·W (K = vocab) needs enough rows to fill the device."""
        if self.ce_row_chunk:
            return min(N, self.ce_row_chunk)
        budget = 3 << 24 if self.rt.tiled else 1 << 24
        lim = min(budget, self.rt.limits.get("max-storage-buffer-binding-size", 1 << 27) // 4)
        return int(max(1, min(N, lim // self.args.vocab_size, 65535)))

    def linear(self, ops, i, name, x, y, M, loras, S, *, res=None, gemv=False, skip_base=False, drop=None,
               pro=None):
        """y (M, out) = x (M, in)·Wᵀ + b + Σ_j s_j·(x·A_jᵀ)·B_jᵀ (+ res); xa_j kept in S for backward.
        drop = (dyn buffer, p): LoRA dropout on the first adapter's input (training). pro: the prologue of the
        x·Wᵀ and x·Aᵀ reads (decode on hardware GPUs, see kernels.matmul)."""
        rt = self.rt
        W, row0, out_f = self.layers[i].W[name]
        in_f = W.cols
        mode = "gemv" if gemv else "forward"
        fused, extra = None, []
        for j, prov in enumerate(loras):
            e = prov(i, name)
            if e is None or e[3] == 0.0:
                continue
            A, Bv, r, s = e
            xa = S.xa(j, name, r)
            dr = None if drop is None or j else (1, drop[0], drop[1], drop_salt(i, name), in_f)
            ops.append(K.matmul(rt, x, K.dense_weight(A, r, in_f), xa, M, r, in_f, mode=mode, drop=dr, prologue=pro))
            if fused is None:
                fused = (xa, Bv, r, r, 1, s)
            else:
                extra.append((xa, Bv, r, s))
        if skip_base:
            return
        ops.extend(K.matmul_ops(rt, x, W, y, M, out_f, in_f, mode=mode, bias=self.layers[i].bias.get(name),
                                lora=fused, res=res, w_row0=row0, prologue=pro,
                                scratch=None if gemv else S.split_scratch()))
        for xa, Bv, r, s in extra:
            ops.append(K.matmul(rt, xa, K.dense_weight(Bv, out_f, r), y, M, out_f, r, mode=mode, beta=1.0, alpha=s))

    def layer_forward(self, ops, i, S: Acts, loras, x_in, x_out, *, cache=None, segments=False, full=True, drop=None):
        """One block: x_out = x_in + attn(norm(x_in)); x_out += mlp(norm(.)). full=False stops before the
        down projection's base matmul (the backward recompute needs only its LoRA input)."""
        rt, a, L = self.rt, self.args, self.layers[i]
        B, T, N = S.B, S.T, S.N
        D, F, H, KV, hd = a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        gemv = cache is not None and N <= 4
        lin = lambda name, x, y, **kw: self.linear(ops, i, name, x, y, N, loras, S, gemv=gemv, drop=drop, **kw)  # noqa
        if cache is not None and drop is None and len(loras) <= 1 and set(L.fused) == set(GROUPS) \
                and all(p.has_fused for p in loras):
            return self._layer_decode_fused(ops, i, S, loras, x_in, x_out, cache, gemv)
        ops.append(K.rmsnorm(rt, x_in, L.ln1, S.h, S.r1, N, D, a.rms_norm_eps))
        lin("q_proj", S.h, S.q)
        lin("k_proj", S.h, S.k)
        lin("v_proj", S.h, S.v)
        if cache is not None:  # (q/k/v of different formats, or several adapters: the unfused decode path)
            ops.append(K.rope(rt, S.q, S.pos, self.rope_tab, N, H, hd, self.max_pos))
            ops.append(K.rope(rt, S.k, S.pos, self.rope_tab, N, KV, hd, self.max_pos))
            ops.append(K.kv_store(rt, S.k, S.v, cache.k[i], cache.v[i], cache.dyn, B, T, cache.max_len, KV, hd))
            self._cache_attention(ops, S, cache, i)
        else:
            ops.append(K.rope(rt, S.q, S.pos, self.rope_tab, N, H, hd, self.max_pos))
            ops.append(K.rope(rt, S.k, S.pos, self.rope_tab, N, KV, hd, self.max_pos))
            if segments and i == 0:  # once a forward: every layer's attention (and backward) reads them
                ops.extend(K.segment_ranges(rt, S.seg, B, T, hd))
            ops.append(K.attention(rt, S.q, S.k, S.v, S.att, S.lse, self.dyn0, B, T, T, H, KV, hd,
                                   S.seg if segments else None, ranges=segments))
        lin("o_proj", S.att, S.x1, res=x_in)
        ops.append(K.rmsnorm(rt, S.x1, L.ln2, S.h2, S.r2, N, D, a.rms_norm_eps))
        lin("gate_proj", S.h2, S.g)
        lin("up_proj", S.h2, S.u)
        ops.append(K.swiglu(rt, S.g, S.u, S.act, N * F))
        lin("down_proj", S.act, x_out, res=S.x1, skip_base=not full)

    def _cache_attention(self, ops, S: Acts, cache, i: int):
        """Attention of S's queries over layer i's KV cache; decoding on hardware GPUs splits the keys over
        K.DECODE_SPLITS workgroups a query (scratch for their partial states in S)."""
        a, rt = self.args, self.rt
        H, KV, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        split = None
        if rt.tiled and S.T <= 4:
            rows, n = S.B * H * S.T, K.DECODE_SPLITS
            split = (S.lazy("attn.pml", rows * n * 2), S.lazy("attn.pacc", rows * n * hd), n)
        att = K.attention(rt, S.q, cache.k[i], cache.v[i], S.att, S.lse, cache.dyn, S.B, S.T, cache.max_len, H, KV,
                          hd, split=split)
        ops.extend(att if isinstance(att, list) else [att])

    def _fused_linear(self, ops, i, group, x, y, M, loras, S, gemv, pro=None):
        """y (M, rows of the group) = x·W_groupᵀ + bias + s·(x·A_groupᵀ)·B_groupᵀ in one matmul (+1 for x·Aᵀ)."""
        rt, L = self.rt, self.layers[i]
        w, fb, bounds = L.fused[group]
        mode = "gemv" if gemv else "forward"
        lora = None
        e = loras[0].fused(i, group) if loras else None
        if e is not None and e[3] != 0.0:
            A, Bv, r, s = e
            parts = len(GROUPS[group])
            xa = S.xa(0, group, parts * r)
            ops.append(K.matmul(rt, x, K.dense_weight(A, parts * r, w.cols), xa, M, parts * r, w.cols, mode=mode,
                                prologue=pro))
            seg = list(bounds) + [0xFFFFFFFF] * (2 - len(bounds))
            lora = (xa, Bv, r, r, 1, s, parts * r, seg[0], seg[1])
        ops.extend(K.matmul_ops(rt, x, w, y, M, w.rows, w.cols, mode=mode, bias=fb, lora=lora, prologue=pro,
                                scratch=None if gemv else S.split_scratch()))

    def _layer_decode_fused(self, ops, i, S, loras, x_in, x_out, cache, gemv):
        """The decode/prefill block with q/k/v and gate/up fused: 10 dispatches a layer without an adapter; 7
        when decoding on hardware GPUs, the norms and SwiGLU read in the next projection's prologue."""
        rt, a, L = self.rt, self.args, self.layers[i]
        B, T, N = S.B, S.T, S.N
        D, F, H, KV, hd = a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        pro = gemv and rt.tiled and os.environ.get("LORALAB_WGPU_DECODE_PROLOGUE", "1") == "1"
        eps = a.rms_norm_eps
        qkv = S.lazy("qkv", N * (H + 2 * KV) * hd)
        if pro:
            self._fused_linear(ops, i, "qkv", x_in, qkv, N, loras, S, gemv, pro=("norm", L.ln1, eps))
        else:
            ops.append(K.rmsnorm(rt, x_in, L.ln1, S.h, S.r1, N, D, eps))
            self._fused_linear(ops, i, "qkv", S.h, qkv, N, loras, S, gemv)
        ops.append(K.rope_decode_qkv(rt, qkv, S.q, cache.k[i], cache.v[i], S.pos, self.rope_tab, cache.dyn, B, T,
                                     cache.max_len, H, KV, hd, self.max_pos))
        self._cache_attention(ops, S, cache, i)
        self.linear(ops, i, "o_proj", S.att, S.x1, N, loras, S, res=x_in, gemv=gemv)
        gu = S.lazy("gu", N * 2 * F)
        if pro:
            self._fused_linear(ops, i, "gu", S.x1, gu, N, loras, S, gemv, pro=("norm", L.ln2, eps))
            self.linear(ops, i, "down_proj", gu, x_out, N, loras, S, res=S.x1, gemv=gemv, pro=("swiglu",))
            return
        ops.append(K.rmsnorm(rt, S.x1, L.ln2, S.h2, S.r2, N, D, eps))
        self._fused_linear(ops, i, "gu", S.h2, gu, N, loras, S, gemv)
        ops.append(K.swiglu_fused(rt, gu, S.act, N, F))
        self.linear(ops, i, "down_proj", S.act, x_out, N, loras, S, res=S.x1, gemv=gemv)

    def cross_entropy_forward(self, ops, S: Acts, h, st, loss):
        """loss[0] = Σ over labelled rows of (lse - target logit), in vocabulary chunks (no gradient)."""
        rt, N, V, D = self.rt, S.N, self.args.vocab_size, self.args.hidden_size
        C = self.chunk_size(N)
        z = S.alloc(N * C, "logits_chunk")
        for c0 in range(0, V, C):
            cn = min(C, V - c0)
            ops.append(K.matmul(rt, h, self.out, z, N, cn, D, w_row0=c0))
            ops.append(K.ce_chunk_forward(rt, z, S.lab, st, N, cn, c0, c0 == 0))
        ops.extend(K.ce_finish(rt, S.lab, st, loss, N))

    def check_inputs(self, tokens: np.ndarray, positions: np.ndarray) -> None:
        if positions.max() >= self.max_pos or positions.min() < 0:
            raise WebGPUError(f"position {int(positions.max())} is outside the model's context of {self.max_pos} "
                              "tokens; shorten the input")
        V = self.args.vocab_size
        if tokens.min() < 0 or tokens.max() >= V:
            raise WebGPUError(f"token ids must be in [0, {V}); got {int(tokens.min())}..{int(tokens.max())}")

    def write_inputs(self, S: Acts, tokens, positions=None, labels=None, segments=None, start=0):
        B, T = tokens.shape
        if positions is None:
            positions = np.broadcast_to(np.arange(start, start + T), (B, T))
        positions = np.asarray(positions)
        self.check_inputs(tokens, positions)
        self.rt.write(S.tok, tokens.astype(np.int32))
        self.rt.write(S.pos, positions.astype(np.int32))
        if labels is not None:
            self.rt.write(S.lab, np.asarray(labels).astype(np.int32))
        if segments is not None:
            self.rt.write(S.seg, np.asarray(segments).astype(np.int32))

    def forward_ops(self, S, loras, cache=None, segments=False):
        """embed -> layers (ping-pong, nothing kept) -> final norm into S.hf."""
        rt, a = self.rt, self.args
        xbuf = (S.lazy("xa_stream", S.N * a.hidden_size), S.lazy("xb_stream", S.N * a.hidden_size))
        ops = [K.embed(rt, S.tok, self.emb, xbuf[0], S.N)]
        for i in range(a.num_hidden_layers):
            self.layer_forward(ops, i, S, loras, xbuf[i % 2], xbuf[(i + 1) % 2], cache=cache, segments=segments)
        ops.append(K.rmsnorm(rt, xbuf[a.num_hidden_layers % 2], self.norm, S.hf, S.rf, S.N, a.hidden_size,
                             a.rms_norm_eps))
        return ops

    def close(self):
        """Free the weights now (unload), not whenever Python collects them."""
        rt = self.rt
        seen = set()
        for L in self.layers:
            bufs = [L.ln1, L.ln2, *L.bias.values()]
            for w, _, _ in L.W.values():
                bufs += [w.wq, w.ws]
            bufs += [fb for _, fb, _ in L.fused.values()]
            for b in bufs:
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    rt.free(b)
        for b in (self.norm, self.emb.wq, self.emb.ws, self.out.wq, self.out.ws, self.rope_tab, self.dyn0):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                rt.free(b)
        self.layers = []
