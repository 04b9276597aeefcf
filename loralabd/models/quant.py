"""Quantized weight blocks (ggml layouts) and their exact dequantization.

Base weights stay in blocks of 32 along the input dimension:
  q4_1: w = d*q + m   (q in 0..15; Q4_0 is stored as q4_1 with m = -8d, which is exact in f16)
  q8_0: w = d*q       (q in -128..127)
Nibble order: byte j of a block holds element j (low nibble) and element j+16 (high nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # elements per block


@dataclass
class QuantTensor:
    kind: str  # "q4_1" | "q8_0" | "f16" | "f32"
    shape: tuple[int, int]  # (rows, cols) = (out_features, in_features)
    qs: np.ndarray  # q4_1: (rows, nb, 16) uint8; q8_0: (rows, nb, 32) int8; dense: (rows, cols)
    scales: np.ndarray | None = None  # q4_1: (rows, nb, 2) f16 [d, m]; q8_0: (rows, nb) f16

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def dequantize(self) -> np.ndarray:
        """(rows, cols) float32, bit-exact with ggml's dequantize_row_* in f32."""
        rows, cols = self.shape
        if self.kind in ("f16", "f32"):
            return np.asarray(self.qs, dtype=np.float32)
        assert self.scales is not None, f"{self.kind} blocks carry scales"
        if self.kind == "q4_1":
            lo = (self.qs & 0x0F).astype(np.float32)
            hi = (self.qs >> 4).astype(np.float32)
            q = np.concatenate([lo, hi], axis=-1)  # (rows, nb, 32)
            s = self.scales.astype(np.float32)
            return (q * s[..., :1] + s[..., 1:]).reshape(rows, cols)
        if self.kind == "q8_0":
            return (self.qs.astype(np.float32) * self.scales.astype(np.float32)[..., None]).reshape(rows, cols)
        raise ValueError(self.kind)

    def take_rows(self, index: np.ndarray) -> "QuantTensor":
        """Rows in a new order (used to undo GGUF's q/k permutation without touching blocks)."""
        sc = None if self.scales is None else np.ascontiguousarray(self.scales[index])
        return QuantTensor(self.kind, self.shape, np.ascontiguousarray(self.qs[index]), sc)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Dequantized rows [start, stop) as float32 (embedding lookups, vocab chunks)."""
        sub = QuantTensor(self.kind, (stop - start, self.shape[1]), self.qs[start:stop],
                          None if self.scales is None else self.scales[start:stop])
        return sub.dequantize()


def from_ggml_bytes(kind: str, raw: np.ndarray, rows: int, cols: int) -> QuantTensor:
    """Parse ggml block bytes (rows, bytes_per_row) uint8 into a QuantTensor."""
    if cols % QK:
        raise ValueError(f"row length {cols} is not a multiple of {QK}")
    nb = cols // QK
    raw = np.ascontiguousarray(raw).reshape(rows, nb, -1)
    if kind in ("q4_0", "q4_1"):
        if kind == "q4_0":  # 2 bytes d + 16 bytes
            d = raw[..., :2].copy().view(np.float16)[..., 0]
            qs = raw[..., 2:18]
            scales = np.stack([d, (d.astype(np.float32) * -8).astype(np.float16)], axis=-1)
        else:  # 2 bytes d + 2 bytes m + 16 bytes
            scales = raw[..., :4].copy().view(np.float16)
            qs = raw[..., 4:20]
        return QuantTensor("q4_1", (rows, cols), np.ascontiguousarray(qs), np.ascontiguousarray(scales))
    if kind == "q8_0":  # 2 bytes d + 32 int8
        d = raw[..., :2].copy().view(np.float16)[..., 0]
        qs = raw[..., 2:34].copy().view(np.int8)
        return QuantTensor("q8_0", (rows, cols), np.ascontiguousarray(qs), np.ascontiguousarray(d))
    raise ValueError(kind)


def quantize_q4_1(w: np.ndarray) -> QuantTensor:
    """Quantize (rows, cols) floats to q4_1 as ggml's quantize_row_q4_1_ref does."""
    rows, cols = w.shape
    if cols % QK:
        raise ValueError(f"cannot quantize: row length {cols} is not a multiple of {QK}")
    x = np.asarray(w, dtype=np.float32).reshape(rows, cols // QK, QK)
    mn = x.min(axis=-1)
    mx = x.max(axis=-1)
    d = (mx - mn) / 15.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
    q = np.minimum(15, ((x - mn[..., None]) * inv[..., None] + 0.5).astype(np.int32)).astype(np.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    scales = np.stack([d.astype(np.float16), mn.astype(np.float16)], axis=-1)
    return QuantTensor("q4_1", (rows, cols), qs, scales)


def quantize_q8_0(w: np.ndarray) -> QuantTensor:
    """Quantize (rows, cols) floats to q8_0 as ggml's quantize_row_q8_0_ref does."""
    rows, cols = w.shape
    if cols % QK:
        raise ValueError(f"cannot quantize: row length {cols} is not a multiple of {QK}")
    x = np.asarray(w, dtype=np.float32).reshape(rows, cols // QK, QK)
    amax = np.abs(x).max(axis=-1)
    d = amax / 127.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
    qs = np.round(x * inv[..., None]).astype(np.int8)
    return QuantTensor("q8_0", (rows, cols), qs, d.astype(np.float16))


def dense(w: np.ndarray, dtype=np.float32) -> QuantTensor:
    w = np.ascontiguousarray(w, dtype=dtype)
    return QuantTensor("f16" if dtype == np.float16 else "f32", w.shape, w)
