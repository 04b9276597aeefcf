"""The WebGPU train session: forward + backward of a whole micro-batch in one command encoder.

All LoRA matrices live in one flat f32 buffer (each matrix at a 256-float-aligned offset, so views bind
on any adapter and 8-bit blocks never straddle two matrices); gradients, m and v in buffers of the same
layout. Per-layer activation checkpointing: the forward keeps only each layer's input (L+1 x N x D);
the backward recomputes one layer at a time into shared work buffers. Only the loss sum is read back.
Same interface and state_dict keys as numpy_train.NumpyTrainSession, so checkpoints move between them.
"""

from __future__ import annotations

import numpy as np

from .. import reference as R
from ..lora import LoraAdapter
from ..numpy_train import CODE_SIGNED, CODE_UNSIGNED, QBLOCK, check_state, quantize_blockwise
from . import kernels as K
from .engine import Acts, Program, drop_salt

ALIGN = 256  # floats
ZERO_S = int(quantize_blockwise(np.zeros(1, np.float32), CODE_SIGNED)[0][0])  # the code numpy_train gives 0.0
ZERO_U = int(quantize_blockwise(np.zeros(1, np.float32), CODE_UNSIGNED)[0][0])


class WebGPUTrainSession:
    def __init__(self, engine, adapter: LoraAdapter, optim: dict | None = None):
        optim = dict(optim or {})
        self.engine, self.rt = engine, engine.rt
        self.config = adapter.config
        self.p_drop = float(adapter.config.dropout)
        self.seed = int(optim.get("seed", 0))  # dropout masks: counter-based on (seed, step, micro-batch)
        self.n_micro = 0
        self.kind = optim.get("kind", "adamw")
        if self.kind not in ("adamw", "adam8bit"):
            raise ValueError(f"optimizer kind must be 'adamw' or 'adam8bit', not {self.kind!r}")
        self.betas = tuple(float(b) for b in optim.get("betas", (0.9, 0.999)))
        self.eps = float(optim.get("eps", 1e-8))
        self.weight_decay = float(optim.get("weight_decay", 0.0))
        self.t = 0
        self.acc_tokens = 0
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
        self._programs: dict = {}

    # -- parameters in and out ----------------------------------------------------------------------------

    def _write_params(self, adapter: LoraAdapter):
        flat = np.zeros(self.n, np.float32)
        for key, (o, shape) in self.layout.items():
            k, part = key.rsplit(".", 1)
            flat[o:o + int(np.prod(shape))] = (adapter.A if part == "A" else adapter.B)[k].reshape(-1)
        self.rt.write(self.prm, flat)

    def _unflatten(self, flat) -> dict:
        return {key: flat[o:o + int(np.prod(shape))].reshape(shape).copy() for key, (o, shape) in self.layout.items()}

    def provider(self, i, name):
        v = self._views.get(f"{i}.{name}.A")
        if v is None:
            return None
        return v[0], self._views[f"{i}.{name}.B"][0], self.config.r, self.config.scale

    # -- the program of one (batch, seq) shape --------------------------------------------------------------

    def _program(self, B, T) -> Program:
        key = (B, T)
        if key in self._programs:
            return self._programs[key]
        eng, rt, a = self.engine, self.rt, self.engine.args
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
        # split-K partials of dA / dB on hardware GPUs: 64 slices x the largest r x features
        scratch = S.alloc(64 * r * max(D, F, H * hd), "dw_split") if rt.tiled and N >= 1024 else None
        provs = [self.provider]
        drop = (self.drop_dyn, self.p_drop) if self.p_drop > 0.0 else None
        ops = [K.embed(rt, S.tok, eng.emb, xs[0], N)]
        for i in range(L):
            eng.layer_forward(ops, i, S, provs, xs[i], xs[i + 1], segments=True, drop=drop)
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
            ops.append(K.matmul(rt, z, eng.out, dhf, rows, D, V, mode="backward_dx", c_off=row0 * D))
        ops.extend(K.ce_finish(rt, S.lab, st, loss, N))
        ops.append(K.rmsnorm_backward(rt, dhf, xs[L], eng.norm, S.rf, dx, N, D))

        def lin_back(i, name, dy, x, dX, beta):
            W, row0, out_f = eng.layers[i].W[name]
            in_f = W.cols
            lora = None
            e = self.provider(i, name)
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
            ops.append(K.matmul(rt, dy, W, dX, N, in_f, out_f, mode="backward_dx", lora=lora, beta=beta,
                                drop=None if lora is None else dx_drop, w_row0=row0))

        seg = S.seg
        for i in reversed(range(L)):
            Lw = eng.layers[i]
            eng.layer_forward(ops, i, S, provs, xs[i], None, segments=True, full=False, drop=drop)  # recompute
            lin_back(i, "down_proj", dx, S.act, dact, 0.0)
            ops.append(K.swiglu_backward(rt, dact, S.g, S.u, dg, du, N * F))
            lin_back(i, "gate_proj", dg, S.h2, dh, 0.0)
            lin_back(i, "up_proj", du, S.h2, dh, 1.0)
            ops.append(K.rmsnorm_backward(rt, dh, S.x1, Lw.ln2, S.r2, dx, N, D, beta=1.0))  # dx = d x1
            lin_back(i, "o_proj", dx, S.att, datt, 0.0)
            ops.extend(K.attention_backward(rt, datt, S.q, S.k, S.v, S.att, S.lse, delta, dq, dk, dv, eng.dyn0,
                                            B, T, H, KV, hd, seg))
            ops.append(K.rope(rt, dq, S.pos, eng.rope_tab, N, H, hd, eng.max_pos, backward=True))
            ops.append(K.rope(rt, dk, S.pos, eng.rope_tab, N, KV, hd, eng.max_pos, backward=True))
            lin_back(i, "q_proj", dq, S.h, dh, 0.0)
            lin_back(i, "k_proj", dk, S.h, dh, 1.0)
            lin_back(i, "v_proj", dv, S.h, dh, 1.0)
            ops.append(K.rmsnorm_backward(rt, dh, xs[i], Lw.ln1, S.r1, dx, N, D, beta=1.0))  # dx = d x_i
        prog = Program(ops, S, loss)
        while len(self._programs) >= 4:
            _, old = self._programs.popitem()
            old.acts.free()
        self._programs[key] = prog
        return prog

    # -- the interface -----------------------------------------------------------------------------------

    def _eval_program(self, B, T) -> Program:
        key = ("eval", B, T)
        if key not in self._programs:
            eng = self.engine
            S = Acts(self.rt, eng.args, B, T)
            ops = eng._forward_ops(S, [self.provider], segments=True)
            st, loss = S.alloc(S.N * 4, "ce_state"), S.alloc(4, "loss")
            eng.cross_entropy_forward(ops, S, S.hf, st, loss)
            self._programs[key] = Program(ops, S, loss)
        return self._programs[key]

    def _run(self, tokens, labels, segments, positions, evaluate=False):
        tokens, labels = np.asarray(tokens), np.asarray(labels)
        B, T = tokens.shape
        prog = self._eval_program(B, T) if evaluate else self._program(B, T)
        seg = np.zeros((B, T), np.int32) if segments is None else np.asarray(segments)
        self.engine._write_inputs(prog.acts, tokens, positions, labels, seg)
        raw = self.rt.run(prog.ops, read=prog.out, read_bytes=4, label="evaluate" if evaluate else "train step")
        return float(raw.view(np.float32)[0]), int((labels != R.IGNORE).sum())

    def accumulate(self, tokens, labels, segments=None, positions=None):
        """Adds d(sum of losses)/d(params) of one micro-batch. Returns (loss_sum, n_tokens)."""
        if self.p_drop > 0.0:
            self.rt.write(self.drop_dyn, np.array([self.seed, self.t, self.n_micro, 0], np.uint32))
        loss, n = self._run(tokens, labels, segments, positions)
        self.n_micro += 1
        self.acc_tokens += n
        return (loss, n) if n else (0.0, 0)

    def evaluate(self, tokens, labels, segments=None, positions=None):
        """(loss_sum, n_tokens) of the current adapter, no gradients (validation)."""
        loss, n = self._run(tokens, labels, segments, positions, evaluate=True)
        return (loss, n) if n else (0.0, 0)

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        """Normalize by the tokens since the last step, clip (global L2 norm), update, zero. Returns the norm."""
        rt = self.rt
        inv_n = 1.0 / max(self.acc_tokens, 1)
        self.t += 1
        ops = K.grad_norm(rt, self.grad, self.parts, self.gstat, self.n, self.nparts, inv_n, max_grad_norm or 0.0)
        if self.kind == "adamw":
            ops.append(K.adamw(rt, self.prm, self.grad, self.m, self.v, self.gstat, self.n, lr, self.betas, self.eps,
                               self.weight_decay, self.t))
        else:
            ops.append(K.adam8bit(rt, self.prm, self.grad, self.mq, self.vq, self.absmax, self.gstat, self.codes,
                                  self.n, lr, self.betas, self.eps, self.weight_decay, self.t))
        raw = rt.run(ops, read=self.gstat, read_bytes=4, label="optimizer step")
        self.acc_tokens = 0
        self.n_micro = 0
        return float(raw.view(np.float32)[0])

    def read_grads(self, scale: float = 1.0) -> dict:
        """The accumulated gradients, "{layer}.{name}.A/B" -> array (times scale)."""
        flat = self.rt.read(self.grad) * np.float32(scale)
        return self._unflatten(flat)

    def snapshot(self) -> LoraAdapter:
        p = self._unflatten(self.rt.read(self.prm))
        ad = LoraAdapter(self.config)
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
        self.acc_tokens = 0

    def free(self):
        for p in self._programs.values():
            p.acts.free()
        self._programs.clear()
        for name in ("prm", "grad", "gstat", "drop_dyn", "parts", "m", "v", "mq", "vq", "absmax", "codes"):
            b = getattr(self, name, None)
            if b is not None:
                self.rt.free(b)
