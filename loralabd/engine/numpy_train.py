"""The numpy train session: gradient accumulation, global-norm clipping, AdamW or 8-bit Adam.

Implements engine.interface.TrainSession: step() accumulates the un-normalised gradients of its
micro-batches, normalises by their labelled tokens, clips, updates; state_dict() holds everything a
checkpoint needs, as numpy arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import reference as R
from .interface import MicroBatch, OptimSettings, StepMetrics
from .lora import LoraAdapter

# -- 8-bit block-wise optimizer state (bitsandbytes' Adam8bit: dynamic-tree code, blocks of 256) ---

QBLOCK = 256


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' create_dynamic_map: 256 sorted code values in [-1, 1] (or [0, 1] unsigned), dense
    near zero, so small moments keep relative precision."""
    data = []
    non_sign = total_bits - 1
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign - max_exponent_bits + 1) + 1)
        b = np.linspace(0.1, 1, n, dtype=np.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if extra > 0:
        b = np.linspace(0.1, 1, extra + 1, dtype=np.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.asarray(data, np.float32))


CODE_SIGNED = dynamic_map(True)  # first moment
CODE_UNSIGNED = dynamic_map(False)  # second moment (never negative)


def quantize_blockwise(x: np.ndarray, code: np.ndarray):
    """x (n,) f32 -> codes (n,) uint8 (nearest code value) and absmax (nblocks,) f32."""
    n = x.size
    nb = -(-n // QBLOCK)
    xp = np.zeros(nb * QBLOCK, np.float32)
    xp[:n] = x.reshape(-1)
    xb = xp.reshape(nb, QBLOCK)
    absmax = np.abs(xb).max(axis=1)  # (nb,)
    y = xb / np.where(absmax > 0, absmax, 1.0)[:, None]
    mid = (code[1:] + code[:-1]) / 2.0  # nearest code: boundaries halfway between neighbours
    q = np.searchsorted(mid, y.reshape(-1)).astype(np.uint8)
    return q[:n], absmax.astype(np.float32)


def dequantize_blockwise(q: np.ndarray, absmax: np.ndarray, code: np.ndarray, shape) -> np.ndarray:
    n = q.size
    scale = np.repeat(absmax, QBLOCK)[:n]
    return (code[q] * scale).reshape(shape).astype(np.float32)


def check_state(state: dict, kind: str, keys) -> None:
    """A checkpoint fits this session: same optimizer, a weight for every LoRA matrix (both engines)."""
    got = bytes(np.asarray(state["kind"], np.uint8)).decode()
    if got != kind:
        raise ValueError(f"checkpoint holds {got} optimizer state but this run uses {kind}; "
                         "resume with the optimizer the run was started with")
    missing = [k for k in keys if f"param.{k}" not in state]
    if missing:
        raise ValueError(f"checkpoint lacks LoRA weights for {missing[:3]}...; it was written for other "
                         "LoRA targets or layers — resume with the run's own LoRA settings")


class NumpyTrainSession:
    """One training run's adapter, gradient accumulator and optimizer state on the CPU."""

    def __init__(self, engine, adapter: LoraAdapter, optim: OptimSettings = OptimSettings()):
        self.engine = engine
        self.adapter = adapter.copy()
        self.kind, self.betas, self.eps, self.weight_decay = optim.kind, optim.betas, optim.eps, optim.weight_decay
        self.seed = optim.seed  # dropout masks: counter-based, so resume needs no RNG blob
        self.t = 0  # optimizer steps taken
        self.params = self.adapter.params()  # name -> array, aliases the adapter's A/B
        self.m: dict[str, Any] = {}  # adamw: the moment array; adam8bit: (codes uint8, absmax f32)
        self.v: dict[str, Any] = {}
        for k, p in self.params.items():
            if self.kind == "adamw":
                self.m[k] = np.zeros_like(p)
                self.v[k] = np.zeros_like(p)
            else:  # (codes uint8, absmax f32) per moment
                self.m[k] = quantize_blockwise(np.zeros(p.size, np.float32), CODE_SIGNED)
                self.v[k] = quantize_blockwise(np.zeros(p.size, np.float32), CODE_UNSIGNED)
        self._metrics: list[StepMetrics] = []
        self._zero_acc()

    def _zero_acc(self):
        self.acc = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.acc_tokens = 0

    def _loss_and_grads(self, b: MicroBatch, micro: int):
        drop = None
        if self.adapter.config.dropout > 0.0:
            drop = np.random.default_rng([self.seed, self.t, micro])
        return self.engine.loss_and_grads(b.tokens, b.labels, self.adapter, segments=b.segments,
                                          positions=b.positions, drop_rng=drop)

    # -- the interface ---------------------------------------------------------------------------

    def reserve(self, batch: int, seq: int) -> None:
        """Nothing to size: numpy allocates each micro-batch's arrays as it comes."""

    def step(self, batches: Sequence[MicroBatch], lr: float, max_grad_norm: float | None = None) -> None:
        """Accumulate, normalise, clip (torch.nn.utils.clip_grad_norm_), update, zero."""
        loss_sum = 0.0
        for j, b in enumerate(batches):
            loss, grads, n = self._loss_and_grads(b, j)
            if n == 0:
                continue
            for k, g in grads.items():
                self.acc[k] += np.float32(n) * g
            self.acc_tokens += n
            loss_sum += float(loss) * n
        n = max(self.acc_tokens, 1)
        grads = {k: g / np.float32(n) for k, g in self.acc.items()}
        # torch: norm of the per-tensor norms, in f32
        norms = np.asarray([np.linalg.norm(g.reshape(-1)) for g in grads.values()], np.float32)
        total = float(np.linalg.norm(norms))
        if max_grad_norm is not None and max_grad_norm > 0:
            coef = min(float(np.float32(max_grad_norm) / (np.float32(total) + np.float32(1e-6))), 1.0)  # f32 exact
            if coef < 1.0:
                for g in grads.values():
                    g *= np.float32(coef)
        self.t += 1
        b1, b2 = self.betas
        for k, p in self.params.items():
            if self.kind == "adamw":
                R.adamw(p, grads[k], self.m[k], self.v[k], self.t, lr, b1, b2, self.eps, self.weight_decay)
            else:
                (mq, ma), (vq, va) = self.m[k], self.v[k]
                m = dequantize_blockwise(mq, ma, CODE_SIGNED, p.shape)
                v = dequantize_blockwise(vq, va, CODE_UNSIGNED, p.shape)
                R.adamw(p, grads[k], m, v, self.t, lr, b1, b2, self.eps, self.weight_decay)
                self.m[k] = quantize_blockwise(m, CODE_SIGNED)
                self.v[k] = quantize_blockwise(v, CODE_UNSIGNED)
        self._metrics.append(StepMetrics(loss_sum, self.acc_tokens, total))
        self._zero_acc()

    def metrics(self, lag: int = 0) -> list[StepMetrics]:
        n = max(0, len(self._metrics) - max(0, lag))
        out, self._metrics = self._metrics[:n], self._metrics[n:]
        return out

    def gradients(self, batch: MicroBatch) -> tuple[float, int, dict]:
        loss, grads, n = self._loss_and_grads(batch, 0)
        return float(loss) * n, n, {k: np.float32(n) * g for k, g in grads.items()}

    def snapshot(self) -> LoraAdapter:
        ad = self.adapter.copy()
        ad.uid, ad.version = self.adapter.uid, self.t
        return ad

    def evaluate(self, batch: MicroBatch) -> tuple[float, int]:
        """(loss_sum, n_tokens) of the current adapter, no gradients (validation)."""
        lab = np.asarray(batch.labels)
        n = int((lab != R.IGNORE).sum())
        if n == 0:
            return 0.0, 0
        loss = self.engine.loss(batch.tokens, lab, adapters=[(self.adapter, 1.0)], segments=batch.segments,
                                positions=batch.positions)
        return float(loss) * n, n

    def memory_bytes(self) -> int:
        """Bytes of adapter + gradient + optimizer state held by this session."""
        n = sum(p.nbytes for p in self.params.values()) + sum(g.nbytes for g in self.acc.values())
        for st in (self.m, self.v):
            for s in st.values():
                n += s.nbytes if isinstance(s, np.ndarray) else s[0].nbytes + s[1].nbytes
        return n

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat name -> array (copies): params, moments, step. Saved only between steps."""
        out: dict[str, np.ndarray] = {"step": np.asarray([self.t], np.int64), "kind": np.frombuffer(self.kind.encode(), np.uint8).copy()}
        for k, p in self.params.items():
            out[f"param.{k}"] = p.copy()
            if self.kind == "adamw":
                out[f"m.{k}"], out[f"v.{k}"] = self.m[k].copy(), self.v[k].copy()
            else:
                out[f"m.{k}.q"], out[f"m.{k}.absmax"] = self.m[k][0].copy(), self.m[k][1].copy()
                out[f"v.{k}.q"], out[f"v.{k}.absmax"] = self.v[k][0].copy(), self.v[k][1].copy()
        return out

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.kind, self.params)
        for k, p in self.params.items():
            p[...] = state[f"param.{k}"]  # in place: the adapter's arrays stay the same objects
            if self.kind == "adamw":
                self.m[k][...] = state[f"m.{k}"]
                self.v[k][...] = state[f"v.{k}"]
            else:
                self.m[k] = (np.array(state[f"m.{k}.q"], np.uint8), np.array(state[f"m.{k}.absmax"], np.float32))
                self.v[k] = (np.array(state[f"v.{k}.q"], np.uint8), np.array(state[f"v.{k}.absmax"], np.float32))
        self.t = int(np.asarray(state["step"]).reshape(-1)[0])
        self._metrics = []
        self._zero_acc()

    def close(self) -> None:
        self.acc, self.m, self.v = {}, {}, {}
