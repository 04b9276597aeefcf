"""The WebGPU train session: a whole optimizer step — every micro-batch's forward and backward, the
gradient norm, clipping and the optimizer — in one command encoder and one submit.

All LoRA matrices live in one flat f32 buffer (each matrix at a 256-float-aligned offset, so views bind
on any adapter and 8-bit blocks never straddle two matrices); gradients, m and v in buffers of the same
layout. Activations: kept per layer (~31 KB a token a layer on SmolLM2-135M), or with per-layer checkpointing
(OptimSettings.recompute) only each layer's input (L+1 x N x D), the backward recomputing one layer at a time into
shared work buffers — the same kernels on the same inputs, so both give the same bits. Micro-batches come in through one
input buffer written per step and copied into place between their passes; the learning rate and step
count through the small `hyp` buffer, so the optimizer is recorded once. Nothing is read back in a step:
each step's loss sums and gradient norm are copied into a ring on the GPU that metrics() reads.
Same interface and state_dict keys as numpy_train.NumpyTrainSession, so checkpoints move between them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import reference as R
from ..interface import MicroBatch, OptimSettings, StepMetrics
from ..lora import LoraAdapter
from ..numpy_train import CODE_SIGNED, CODE_UNSIGNED, QBLOCK, check_state, quantize_blockwise
from . import kernels as K
from .graph import Acts, ModelGraph, Program, drop_salt
from .runtime import Copy, PendingRead, WebGPUError

ALIGN = 256  # floats
ZERO_S = int(quantize_blockwise(np.zeros(1, np.float32), CODE_SIGNED)[0][0])  # the code numpy_train gives 0.0
ZERO_U = int(quantize_blockwise(np.zeros(1, np.float32), CODE_UNSIGNED)[0][0])
RING = 64  # steps of metrics kept on the GPU between two reads
_SESSIONS = itertools.count()  # tags the staging slots of each session's metric reads


@dataclass
class _Rows:
    tokens: np.ndarray
    labels: np.ndarray
    segments: np.ndarray
    positions: np.ndarray


def _padded(b: MicroBatch, B: int, T: int) -> MicroBatch:
    """b grown to (B, T) with padding as packing pads (segment -1, no label): a step's micro-batches can differ
    (the last of gradient accumulation, say) and padding adds nothing to the loss or the gradients."""
    tokens = np.asarray(b.tokens)
    b0, t0 = tokens.shape
    if (b0, t0) == (B, T):
        return b
    pos = np.broadcast_to(np.arange(t0), (b0, t0)) if b.positions is None else np.asarray(b.positions)
    seg = np.zeros((b0, t0), np.int32) if b.segments is None else np.asarray(b.segments)

    def grow(a, fill):
        out = np.full((B, T), fill, np.int32)
        out[:b0, :t0] = a
        return out

    return _Rows(grow(tokens, 0), grow(np.asarray(b.labels), R.IGNORE), grow(seg, -1), grow(pos, 0))


class SessionLora:
    """The session's flat parameter buffer as the graph reads LoRA: (i, name) -> (A, B, r, scale) | None."""

    has_fused = False

    def __init__(self, views: dict, r: int, scale: float):
        self.views, self.r, self.scale = views, r, scale

    def __call__(self, i, name):
        v = self.views.get(f"{i}.{name}.A")
        if v is None:
            return None
        return v[0], self.views[f"{i}.{name}.B"][0], self.r, self.scale

    def fused(self, i, group):
        return None


class WebGPUTrainSession:
    def __init__(self, graph: ModelGraph, adapter: LoraAdapter, optim: OptimSettings = OptimSettings()):
        self.graph, self.rt = graph, graph.rt
        self.config = adapter.config
        self.p_drop = float(adapter.config.dropout)
        self.seed = optim.seed  # dropout masks: counter-based on (seed, step, micro-batch)
        self.kind, self.betas, self.eps, self.weight_decay = optim.kind, optim.betas, optim.eps, optim.weight_decay
        self.recompute = optim.recompute
        self.t = 0
        self.uid = adapter.uid  # snapshots keep the adapter's identity; their version is the step
        # flat layout: name -> (offset, shape)
        self.layout, off = {}, 0
        for k in adapter.A:
            for part, arr in (("A", adapter.A[k]), ("B", adapter.B[k])):
                self.layout[f"{k}.{part}"] = (off, arr.shape)
                off += -(-arr.size // ALIGN) * ALIGN
        self.n = max(off, ALIGN)
        rt = self.rt
        self.prm = rt.buffer(4 * self.n, "lora.params")
        self.grad = rt.buffer(4 * self.n, "lora.grads", np.zeros(self.n, np.float32))
        self.gstat = rt.buffer(16, "gstat", np.zeros(4, np.float32))
        self.hyp = rt.buffer(16, "hyp", np.zeros(4, np.float32))
        self.drop_dyn = rt.buffer(16, "dropout.dyn", np.zeros(4, np.uint32))
        self.nparts = 64
        self.parts = rt.buffer(4 * self.nparts, "gnorm.parts")
        if self.kind == "adamw":
            self.m = rt.buffer(4 * self.n, "adam.m", np.zeros(self.n, np.float32))
            self.v = rt.buffer(4 * self.n, "adam.v", np.zeros(self.n, np.float32))
        else:
            self.mq = rt.buffer(self.n, "adam8.m", np.full(self.n, ZERO_S, np.uint8))
            self.vq = rt.buffer(self.n, "adam8.v", np.full(self.n, ZERO_U, np.uint8))
            self.absmax = rt.buffer(8 * (self.n // QBLOCK), "adam8.absmax", np.zeros(2 * (self.n // QBLOCK), np.float32))
            mids = lambda c: np.concatenate([(c[1:] + c[:-1]) / 2.0, [np.float32(np.inf)]]).astype(np.float32)  # noqa
            codes = np.concatenate([CODE_SIGNED, CODE_UNSIGNED, mids(CODE_SIGNED), mids(CODE_UNSIGNED)])
            self.codes = rt.buffer(codes.nbytes, "adam8.codes", codes.astype(np.float32))
        self._write_params(adapter)
        self._views = {}
        for key, (o, shape) in self.layout.items():
            nb = 4 * int(np.prod(shape))
            self._views[key] = (rt.view(self.prm, 4 * o, nb, key), rt.view(self.grad, 4 * o, nb, key + ".grad"))
        self.lora = SessionLora(self._views, self.config.r, self.config.scale)
        self._programs: dict = {}
        self._grown: dict[str, tuple[int, int]] = {}  # "train" | "eval" -> the (B, T) of the one program kept
        self._inputs: dict = {}  # (B, T) -> input buffer of k micro-batches
        self._optim_ops: dict = {}  # max_grad_norm -> recorded optimizer ops
        self._ring_stride = 0  # floats per step in the metrics ring: [grad norm, loss sum of each micro-batch]
        self._ring = None
        # (micro-batches, labelled tokens, the read of the step's ring row) of steps not read yet: each step's row
        # comes back through its own staging slot, so reading one waits for that step's submit, not later ones
        self._pending: list[tuple[int, int, PendingRead]] = []
        self._read: list[StepMetrics] = []  # read back, not yet handed out
        self._slots = [("metrics", next(_SESSIONS), row) for row in range(RING)]

    # -- parameters in and out ----------------------------------------------------------------------------

    def _write_params(self, adapter: LoraAdapter):
        flat = np.zeros(self.n, np.float32)
        for key, (o, shape) in self.layout.items():
            k, part = key.rsplit(".", 1)
            flat[o:o + int(np.prod(shape))] = (adapter.A if part == "A" else adapter.B)[k].reshape(-1)
        self.rt.write(self.prm, flat)

    def _unflatten(self, flat) -> dict:
        return {key: flat[o:o + int(np.prod(shape))].reshape(shape).copy() for key, (o, shape) in self.layout.items()}

    # -- the program of one (batch, seq) shape --------------------------------------------------------------

    def prepare(self, B: int, T: int) -> Program:
        """The recorded forward + backward of one (B, T) micro-batch (its buffers allocated once)."""
        key = (B, T)
        if key in self._programs:
            return self._programs[key]
        eng, rt, a = self.graph, self.rt, self.graph.args
        N, D, F = B * T, a.hidden_size, a.intermediate_size
        H, KV, hd, L, r = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.num_hidden_layers, self.config.r
        S = Acts(rt, a, B, T)
        xs = [S.alloc(N * D, f"x{i}") for i in range(L + 1)]  # the checkpoints
        st, loss = S.alloc(N * 4, "ce_state"), S.alloc(4, "loss")
        dhf, dx, dh = S.alloc(N * D, "dhf"), S.alloc(N * D, "dx"), S.alloc(N * D, "dh")
        dact, dg, du = S.alloc(N * F, "dact"), S.alloc(N * F, "dg"), S.alloc(N * F, "du")
        datt, dq = S.alloc(N * H * hd, "datt"), S.alloc(N * H * hd, "dq")
        dk, dv = S.alloc(N * KV * hd, "dk"), S.alloc(N * KV * hd, "dv")
        delta, dxa = S.alloc(B * H * T, "delta"), S.alloc(N * r, "dxa")
        # split-K partials of dA / dB on hardware GPUs (from 2 slices of 64 rows: unsplit, a (r, features) output
        # leaves the GPU idle — 150 µs a dispatch at 512 rows on an H200): 64 slices x the largest r x features
        scratch = S.alloc(64 * r * max(D, F, H * hd), "dw_split") if rt.tiled and N >= 128 else None
        provs = [self.lora]
        drop = (self.drop_dyn, self.p_drop) if self.p_drop > 0.0 else None
        per = [S] * L if self.recompute else [S] + [S.layer_copy(i) for i in range(1, L)]  # each layer's forward
        ops = [K.embed(rt, S.tok, eng.emb, xs[0], N)]
        for i in range(L):
            eng.layer_forward(ops, i, per[i], provs, xs[i], xs[i + 1], segments=True, drop=drop)
        ops.append(K.rmsnorm(rt, xs[L], eng.norm, S.hf, S.rf, N, D, a.rms_norm_eps))
        # fused cross-entropy in row chunks: logits of a few rows over the whole vocabulary, turned into
        # their gradient in place, then dhf rows = grad · W — each logit computed once per step
        V = a.vocab_size
        rc = eng.ce_rows(N)
        z = S.alloc(rc * V, "logits_rows")
        for row0 in range(0, N, rc):
            rows = min(rc, N - row0)
            ops.append(K.matmul(rt, S.hf, eng.out, z, rows, V, D, a_off=row0 * D))
            ops.append(K.ce_rows_fused(rt, z, S.lab, st, rows, V, row0, 1.0))
            ops.extend(K.matmul_ops(rt, z, eng.out, dhf, rows, D, V, mode="backward_dx", c_off=row0 * D,
                                    scratch=S.split_scratch()))
        ops.extend(K.ce_finish(rt, S.lab, st, loss, N))
        ops.append(K.rmsnorm_backward(rt, dhf, xs[L], eng.norm, S.rf, dx, N, D))

        def lin_back(S, i, name, dy, x, dX, beta):
            W, row0, out_f = eng.layers[i].W[name]
            in_f = W.cols
            lora = None
            e = self.lora(i, name)
            if e is not None:
                A, Bv, _, s = e
                gA, gB = self._views[f"{i}.{name}.A"][1], self._views[f"{i}.{name}.B"][1]
                xa = S.xa(0, name, r)
                salt = drop_salt(i, name)
                dw_drop = None if drop is None else (2, self.drop_dyn, self.p_drop, salt, in_f)
                dx_drop = None if drop is None else (3, self.drop_dyn, self.p_drop, salt, in_f)
                # dB (out, r) += s·dyᵀ·xa ; dxa = dy·B ; dA (r, in) += s·dxaᵀ·drop(x) ; dX += drop(s·dxa·A)
                ops.extend(K.matmul_dw(rt, dy, K.dense_weight(xa, N, r), gB, out_f, r, N, alpha=s, beta=1.0,
                                       scratch=scratch))
                ops.append(K.matmul(rt, dy, K.dense_weight(Bv, out_f, r), dxa, N, r, out_f, mode="backward_dx"))
                ops.extend(K.matmul_dw(rt, dxa, K.dense_weight(x, N, in_f), gA, r, in_f, N, alpha=s, beta=1.0,
                                       drop=dw_drop, scratch=scratch))
                lora = (dxa, A, r, 1, in_f, s)
            ops.extend(K.matmul_ops(rt, dy, W, dX, N, in_f, out_f, mode="backward_dx", lora=lora, beta=beta,
                                    drop=None if lora is None else dx_drop, w_row0=row0, scratch=S.split_scratch()))

        seg = S.seg
        for i in reversed(range(L)):
            Lw, Si = eng.layers[i], per[i]
            if self.recompute:
                eng.layer_forward(ops, i, S, provs, xs[i], None, segments=True, full=False, drop=drop)
            lin_back(Si, i, "down_proj", dx, Si.act, dact, 0.0)
            ops.append(K.swiglu_backward(rt, dact, Si.g, Si.u, dg, du, N * F))
            lin_back(Si, i, "gate_proj", dg, Si.h2, dh, 0.0)
            lin_back(Si, i, "up_proj", du, Si.h2, dh, 1.0)
            ops.append(K.rmsnorm_backward(rt, dh, Si.x1, Lw.ln2, Si.r2, dx, N, D, beta=1.0))  # dx = d x1
            lin_back(Si, i, "o_proj", dx, Si.att, datt, 0.0)
            ops.extend(K.attention_backward(rt, datt, Si.q, Si.k, Si.v, Si.att, Si.lse, delta, dq, dk, dv, eng.dyn0,
                                            B, T, H, KV, hd, seg, ranges=True))
            ops.append(K.rope(rt, dq, S.pos, eng.rope_tab, N, H, hd, eng.max_pos, backward=True))
            ops.append(K.rope(rt, dk, S.pos, eng.rope_tab, N, KV, hd, eng.max_pos, backward=True))
            lin_back(Si, i, "q_proj", dq, Si.h, dh, 0.0)
            lin_back(Si, i, "k_proj", dk, Si.h, dh, 1.0)
            lin_back(Si, i, "v_proj", dv, Si.h, dh, 1.0)
            ops.append(K.rmsnorm_backward(rt, dh, xs[i], Lw.ln1, Si.r1, dx, N, D, beta=1.0))  # dx = d x_i
        prog = Program(ops, S, loss)
        while len(self._programs) >= 4:
            _, old = self._programs.popitem()
            old.acts.free()
        self._programs[key] = prog
        return prog

    def _shape(self, kind: str, B: int, T: int) -> tuple[int, int]:
        """The shape of the one `kind` program this session keeps: grown to the largest (batch, seq) seen, smaller
        batches padded into it. Batches are cut to their longest row, so shapes vary step to step: a program per
        shape held up to four programs' activations (4-9 GB where the plan counts one, measured on an H200) and
        rebuilt programs mid-run."""
        cur = self._grown.get(kind)
        if cur is not None and B <= cur[0] and T <= cur[1]:
            return cur
        if cur is not None:
            old = self._programs.pop(cur if kind == "train" else ("eval",) + cur, None)
            if old is not None:
                old.acts.free()
            if kind == "train" and cur in self._inputs:
                self.rt.free(self._inputs.pop(cur))
        new = (B, T) if cur is None else (max(B, cur[0]), max(T, cur[1]))
        self._grown[kind] = new
        return new

    def reserve(self, batch: int, seq: int) -> None:
        """Size the step program for the run's largest micro-batch now (Trainer calls it with batch_size, seq_len):
        every step then runs this one shape, whatever the history, so a resumed run computes what the
        uninterrupted one did (dropout masks and reductions depend on the padded shape)."""
        self.prepare(*self._shape("train", int(batch), int(seq)))

    def prepare_eval(self, B: int, T: int) -> Program:
        """The evaluation program of (B, T) (forward and loss only), kept beside the step program."""
        return self._eval_program(*self._shape("eval", B, T))

    def _eval_program(self, B, T) -> Program:
        key = ("eval", B, T)
        if key not in self._programs:
            g = self.graph
            S = Acts(self.rt, g.args, B, T)
            ops = g.forward_ops(S, [self.lora], segments=True)
            st, loss = S.alloc(S.N * 4, "ce_state"), S.alloc(4, "loss")
            g.cross_entropy_forward(ops, S, S.hf, st, loss)
            self._programs[key] = Program(ops, S, loss)
        return self._programs[key]

    # -- one optimizer step, one submit -------------------------------------------------------------------

    def _input_buffer(self, B: int, T: int, k: int):
        """Room for k micro-batches of (B, T): per micro-batch tokens, positions, segments, labels (N each)
        and the dropout words (4); grown when a step brings more micro-batches than before."""
        buf = self._inputs.get((B, T))
        words = k * (4 * B * T + 4)
        if buf is None or buf.n < words:
            if buf is not None:
                self.rt.free(buf)
            buf = self._inputs[(B, T)] = self.rt.buffer(4 * words, "inputs")
        return buf

    def _micro_words(self, b: MicroBatch, micro: int) -> np.ndarray:
        g = self.graph
        tokens = np.asarray(b.tokens)
        B, T = tokens.shape
        positions = np.broadcast_to(np.arange(T), (B, T)) if b.positions is None else np.asarray(b.positions)
        seg = np.zeros((B, T), np.int32) if b.segments is None else np.asarray(b.segments)
        g.check_inputs(tokens, positions)
        drop = np.array([self.seed, self.t, micro, 0], np.uint32).view(np.int32)
        return np.concatenate([tokens.reshape(-1), positions.reshape(-1), seg.reshape(-1),
                               np.asarray(b.labels).reshape(-1), drop]).astype(np.int32)

    def _micro_ops(self, prog: Program, inputs, j: int, N: int) -> list:
        S, o = prog.acts, 4 * j * (4 * N + 4)
        ops = [Copy(inputs, o, S.tok, 0, 4 * N), Copy(inputs, o + 4 * N, S.pos, 0, 4 * N),
               Copy(inputs, o + 8 * N, S.seg, 0, 4 * N), Copy(inputs, o + 12 * N, S.lab, 0, 4 * N)]
        if self.p_drop > 0.0:
            ops.append(Copy(inputs, o + 16 * N, self.drop_dyn, 0, 16))
        return ops + prog.ops

    def _optimizer(self, max_grad_norm: float) -> list:
        ops = self._optim_ops.get(max_grad_norm)
        if ops is None:
            rt = self.rt
            ops = K.grad_norm(rt, self.grad, self.parts, self.gstat, self.hyp, self.n, self.nparts, max_grad_norm)
            if self.kind == "adamw":
                ops.append(K.adamw(rt, self.prm, self.grad, self.m, self.v, self.gstat, self.hyp, self.n, self.betas,
                                   self.eps))
            else:
                ops.append(K.adam8bit(rt, self.prm, self.grad, self.mq, self.vq, self.absmax, self.gstat, self.codes,
                                      self.hyp, self.n, self.betas, self.eps))
            self._optim_ops[max_grad_norm] = ops
        return ops

    def _metrics_ring(self, k: int):
        if self._ring is None or self._ring_stride < 1 + k:
            self._drain()
            if self._ring is not None:
                self.rt.free(self._ring)
                self.rt.free_staging(self._slots)
            self._ring_stride = max(self._ring_stride, 1 + k)
            self._ring = self.rt.buffer(4 * RING * self._ring_stride, "metrics", np.zeros(RING * self._ring_stride, np.float32))
            self.rt.reserve_staging(4 * self._ring_stride, self._slots)
        return self._ring

    def step(self, batches: Sequence[MicroBatch], lr: float, max_grad_norm: float | None = None) -> None:
        """Accumulate every micro-batch's gradient, normalise by their labelled tokens, clip, update: one
        submit, nothing read back (metrics() reads the losses and norms later)."""
        if not batches:
            raise ValueError("a step needs at least one micro-batch")
        shapes = [np.asarray(b.tokens).shape for b in batches]
        B, T = self._shape("train", max(s[0] for s in shapes), max(s[1] for s in shapes))
        batches = [_padded(b, B, T) for b in batches]  # one program runs them all: padding has no labels
        k, N = len(batches), B * T
        if len(self._pending) >= RING:
            self._drain()
        ring = self._metrics_ring(k)
        prog = self.prepare(B, T)
        inputs = self._input_buffer(B, T, k)
        self.rt.write(inputs, np.concatenate([self._micro_words(b, j) for j, b in enumerate(batches)]))
        targets = sum(int((np.asarray(b.labels) != R.IGNORE).sum()) for b in batches)
        self.rt.write(self.hyp, K.adam_hyp(lr, self.weight_decay, self.betas, self.t + 1, 1.0 / max(targets, 1)))
        row = self.t % RING
        assert prog.out is not None  # prepare() gives the loss buffer
        ops: list = []
        for j in range(k):
            ops += self._micro_ops(prog, inputs, j, N)
            ops.append(Copy(prog.out, 0, ring, 4 * (row * self._ring_stride + 1 + j), 4))
        ops += self._optimizer(float(max_grad_norm or 0.0))
        ops.append(Copy(self.gstat, 0, ring, 4 * row * self._ring_stride, 4))
        stride = 4 * self._ring_stride
        pend = self.rt.submit(ops, read=ring, read_bytes=stride, read_offset=row * stride, label="train step",
                              slot=self._slots[row])
        self._pending.append((k, targets, pend))
        self.t += 1

    def _drain(self, lag: int = 0):
        """Read back every pending step's metrics but the newest `lag` (waiting for those steps only)."""
        n = max(0, len(self._pending) - max(0, lag))
        for k, targets, pend in self._pending[:n]:
            raw = pend.result().view(np.float32)
            self._read.append(StepMetrics(float(raw[1:1 + k].astype(np.float64).sum()), targets, float(raw[0])))
        self._pending = self._pending[n:]

    def metrics(self, lag: int = 0) -> list[StepMetrics]:
        self._drain(lag)
        out, self._read = self._read, []
        return out

    def gradients(self, batch: MicroBatch) -> tuple[float, int, dict]:
        """(loss_sum, targets, d(loss_sum)/d(A, B)) of one micro-batch; the gradient buffer is zeroed after."""
        B, T = self._shape("train", *np.asarray(batch.tokens).shape)
        batch = _padded(batch, B, T)
        prog = self.prepare(B, T)
        inputs = self._input_buffer(B, T, 1)
        self.rt.write(inputs, self._micro_words(batch, 0))
        raw = self.rt.run(self._micro_ops(prog, inputs, 0, B * T), read=prog.out, read_bytes=4, label="gradients")
        grads = self._unflatten(self.rt.read(self.grad))
        self.rt.write(self.grad, np.zeros(self.n, np.float32))
        return float(raw.view(np.float32)[0]), int((np.asarray(batch.labels) != R.IGNORE).sum()), grads

    def evaluate(self, batch: MicroBatch) -> tuple[float, int]:
        """(loss_sum, targets) of the current adapter, no gradients (validation)."""
        B, T = self._shape("eval", *np.asarray(batch.tokens).shape)
        batch = _padded(batch, B, T)
        prog = self._eval_program(B, T)
        seg = np.zeros((B, T), np.int32) if batch.segments is None else batch.segments
        self.graph.write_inputs(prog.acts, np.asarray(batch.tokens), batch.positions, batch.labels, seg)
        raw = self.rt.run(prog.ops, read=prog.out, read_bytes=4, label="evaluate")
        n = int((np.asarray(batch.labels) != R.IGNORE).sum())
        return (float(raw.view(np.float32)[0]), n) if n else (0.0, 0)

    def snapshot(self) -> LoraAdapter:
        p = self._unflatten(self.rt.read(self.prm))
        ad = LoraAdapter(self.config, uid=self.uid, version=self.t)
        for key, arr in p.items():
            k, part = key.rsplit(".", 1)
            (ad.A if part == "A" else ad.B)[k] = arr
        return ad

    def memory_bytes(self) -> int:
        n = self.prm.nbytes + self.grad.nbytes
        n += (self.m.nbytes + self.v.nbytes) if self.kind == "adamw" else (self.mq.nbytes + self.vq.nbytes +
                                                                            self.absmax.nbytes)
        return n + sum(b.nbytes for p in self._programs.values() for b in p.acts.bufs)

    # -- checkpoints (numpy_train's keys) -------------------------------------------------------------------

    def state_dict(self) -> dict:
        out = {"step": np.asarray([self.t], np.int64), "kind": np.frombuffer(self.kind.encode(), np.uint8).copy()}
        prm = self.rt.read(self.prm)
        if self.kind == "adamw":
            m, v = self.rt.read(self.m), self.rt.read(self.v)
        else:
            mq = self._read_u8(self.mq)
            vq = self._read_u8(self.vq)
            am = self.rt.read(self.absmax).reshape(-1, 2)
        for key, (o, shape) in self.layout.items():
            n = int(np.prod(shape))
            out[f"param.{key}"] = prm[o:o + n].reshape(shape).copy()
            if self.kind == "adamw":
                out[f"m.{key}"], out[f"v.{key}"] = m[o:o + n].reshape(shape).copy(), v[o:o + n].reshape(shape).copy()
            else:
                b0, nb = o // QBLOCK, -(-n // QBLOCK)
                out[f"m.{key}.q"], out[f"v.{key}.q"] = mq[o:o + n].copy(), vq[o:o + n].copy()
                out[f"m.{key}.absmax"] = am[b0:b0 + nb, 0].copy()
                out[f"v.{key}.absmax"] = am[b0:b0 + nb, 1].copy()
        return out

    def _read_u8(self, buf) -> np.ndarray:
        return self.rt.read(buf, np.float32).view(np.uint8)[: self.n]

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.kind, self.layout)
        prm = np.zeros(self.n, np.float32)
        if self.kind == "adamw":
            m, v = np.zeros(self.n, np.float32), np.zeros(self.n, np.float32)
        else:
            mq = np.full(self.n, ZERO_S, np.uint8)
            vq = np.full(self.n, ZERO_U, np.uint8)
            am = np.zeros((self.n // QBLOCK, 2), np.float32)
        for key, (o, shape) in self.layout.items():
            n = int(np.prod(shape))
            prm[o:o + n] = np.asarray(state[f"param.{key}"], np.float32).reshape(-1)
            if self.kind == "adamw":
                m[o:o + n] = np.asarray(state[f"m.{key}"]).reshape(-1)
                v[o:o + n] = np.asarray(state[f"v.{key}"]).reshape(-1)
            else:
                b0, nb = o // QBLOCK, -(-n // QBLOCK)
                mq[o:o + n], vq[o:o + n] = state[f"m.{key}.q"], state[f"v.{key}.q"]
                am[b0:b0 + nb, 0], am[b0:b0 + nb, 1] = state[f"m.{key}.absmax"], state[f"v.{key}.absmax"]
        self.rt.write(self.prm, prm)
        if self.kind == "adamw":
            self.rt.write(self.m, m)
            self.rt.write(self.v, v)
        else:
            self.rt.write(self.mq, mq)
            self.rt.write(self.vq, vq)
            self.rt.write(self.absmax, am)
        self.rt.write(self.grad, np.zeros(self.n, np.float32))
        self.t = int(np.asarray(state["step"]).reshape(-1)[0])
        self._drain()  # the reads in flight land (their staging slots are then free); their metrics are dropped
        self._read = []

    def close(self):
        pending, self._pending = self._pending, []
        for _, _, pend in pending:  # the steps' reads land before their staging goes (their metrics are not read)
            try:
                pend.result()
            except Exception:  # noqa: BLE001 — a device lost mid-read: the buffers still go
                pass
        self.rt.free_staging(self._slots)
        for p in self._programs.values():
            p.acts.free()
        self._programs.clear()
        for b in self._inputs.values():
            self.rt.free(b)
        self._inputs.clear()
        for name in ("prm", "grad", "gstat", "hyp", "drop_dyn", "parts", "m", "v", "mq", "vq", "absmax", "codes",
                     "_ring"):
            b = getattr(self, name, None)
            if b is not None:
                self.rt.free(b)
