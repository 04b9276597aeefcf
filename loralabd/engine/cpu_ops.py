"""CPU kernels of the numpy engine: the math of engine/reference.py (the oracle they are tested against),
arranged for BLAS and the machine's cores: causal attention in query blocks per key/value head (2-D matmuls,
no repeated k/v, the masked upper triangle skipped), cross-entropy and its gradient in one pass over the
vocabulary, SwiGLU in place, elementwise work split over a thread pool (numpy releases the GIL)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .reference import IGNORE

Q_BLOCK = 128  # query rows per attention block: the causal triangle above the diagonal blocks is skipped


def n_threads() -> int:
    """Worker threads for the non-BLAS work: the BLAS thread count the process was given, else the cores."""
    for var in ("LORALAB_CPU_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return os.cpu_count() or 1


_pool: ThreadPoolExecutor | None = None


def parallel(fn, items) -> None:
    """fn(item) for every item, on the pool when there are threads to spare (each item writes its own rows,
    so the result does not depend on which thread ran it)."""
    global _pool
    items = list(items)
    n = n_threads()
    if n <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="loralab-cpu")
    for f in [_pool.submit(fn, it) for it in items]:
        f.result()


def row_parts(n: int, min_rows: int = 64) -> list[tuple[int, int]]:
    """[lo, hi) row ranges, one per thread (fewer for small arrays): a fixed split, so results are repeatable."""
    k = max(1, min(n_threads(), n // min_rows))
    edges = [n * j // k for j in range(k + 1)]
    return [(edges[j], edges[j + 1]) for j in range(k)]


# --- SwiGLU ---------------------------------------------------------------------------------------

def swiglu(g, u):
    """silu(g) * u (N, F), as reference.swiglu."""
    out = np.empty_like(g)

    def part(r):
        lo, hi = r
        o = out[lo:hi]
        np.negative(g[lo:hi], out=o)
        np.exp(o, out=o)
        o += 1.0
        np.divide(g[lo:hi], o, out=o)
        o *= u[lo:hi]

    parallel(part, row_parts(g.shape[0]))
    return out


def swiglu_backward(da, g, u, dgu):
    """reference.swiglu_backward written into dgu (N, 2F): dg in the first F columns, du in the rest."""
    F = g.shape[1]

    def part(r):
        lo, hi = r
        s = np.negative(g[lo:hi])
        np.exp(s, out=s)
        s += 1.0
        np.reciprocal(s, out=s)  # sigmoid(g)
        du = dgu[lo:hi, F:]
        np.multiply(g[lo:hi], s, out=du)
        du *= da[lo:hi]  # da * silu(g)
        dg = dgu[lo:hi, :F]
        np.subtract(1.0, s, out=dg)
        dg *= g[lo:hi]
        dg += 1.0
        dg *= s
        dg *= u[lo:hi]
        dg *= da[lo:hi]  # da * u * s * (1 + g (1 - s))

    parallel(part, row_parts(g.shape[0]))


# --- causal GQA attention -------------------------------------------------------------------------

def attention_blocks(T, Tk, t_offset, segments, g):
    """The query blocks of one forward: (t0, t1, keys, bias) with bias (B|1, (t1-t0)*g, keys) f32, 0 where the
    key is visible and -inf where not (rows ordered query-major: row = t * g + head within the group), or
    None where every key is visible. The keys past a block's last query are never visible, so skipped."""
    out = []
    for t0 in range(0, T, Q_BLOCK):
        t1 = min(T, t0 + Q_BLOCK)
        kk = t1 + t_offset
        vis = np.arange(kk)[None, :] <= (np.arange(t0, t1) + t_offset)[:, None]  # (bq, kk)
        vis = vis[None]
        if segments is not None:
            vis = vis & (segments[:, t0:t1, None] == segments[:, None, :kk])
        bias = None
        if not vis.all():
            bias = np.where(np.repeat(vis, g, axis=1), np.float32(0.0), np.float32(-np.inf))
        out.append((t0, t1, min(kk, Tk), bias))
    return out


def _bias(bias, b):
    return None if bias is None else bias[b if bias.shape[0] > 1 else 0]


def attention(q, k, v, blocks):
    """q (B, T, H, hd); k, v (B, Tk, KV, hd) (views of a cache are fine); blocks from attention_blocks.
    Returns out (B, T, H, hd) and lse (B, H, T), as reference.attention."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    g = H // KV
    scale = np.float32(1.0 / np.sqrt(hd))
    out = np.empty((B, T, H, hd), np.float32)
    lse = np.empty((B, H, T), np.float32)

    def one(item):
        b, j = item
        hs = slice(j * g, (j + 1) * g)
        K, V = k[b, :, j], v[b, :, j]  # (Tk, hd)
        for t0, t1, kk, bias in blocks:
            Q = q[b, t0:t1, hs].reshape(-1, hd)  # ((t1-t0)*g, hd)
            s = Q @ K[:kk].T
            s *= scale
            bb = _bias(bias, b)
            if bb is not None:
                s += bb
            mx = s.max(axis=1, keepdims=True)
            s -= mx
            np.exp(s, out=s)
            den = s.sum(axis=1, keepdims=True)
            o = s @ V[:kk]
            o /= den
            out[b, t0:t1, hs] = o.reshape(t1 - t0, g, hd)
            lse[b, hs, t0:t1] = (mx + np.log(den)).reshape(t1 - t0, g).T

    parallel(one, [(b, j) for b in range(B) for j in range(KV)])
    return out, lse


def attention_backward(dout, out, q, k, v, lse, blocks):
    """dq (B, T, H, hd), dk, dv (B, Tk, KV, hd) as reference.attention_backward, P recomputed from lse and
    delta = rowsum(dout * out) (out: the forward's output)."""
    B, T, H, hd = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    g = H // KV
    scale = np.float32(1.0 / np.sqrt(hd))
    dq = np.empty_like(q)
    dk = np.zeros((B, Tk, KV, hd), np.float32)
    dv = np.zeros((B, Tk, KV, hd), np.float32)

    def one(item):
        b, j = item
        hs = slice(j * g, (j + 1) * g)
        K, V = k[b, :, j], v[b, :, j]
        dK, dV = dk[b, :, j], dv[b, :, j]
        for t0, t1, kk, bias in blocks:
            Q = q[b, t0:t1, hs].reshape(-1, hd)
            dO = dout[b, t0:t1, hs].reshape(-1, hd)
            delta = np.einsum("ij,ij->i", dO, out[b, t0:t1, hs].reshape(-1, hd))[:, None]
            p = Q @ K[:kk].T
            p *= scale
            bb = _bias(bias, b)
            if bb is not None:
                p += bb
            p -= lse[b, hs, t0:t1].T.reshape(-1, 1)
            np.exp(p, out=p)  # P
            dV[:kk] += p.T @ dO
            ds = dO @ V[:kk].T  # dP
            ds -= delta
            ds *= p
            ds *= scale
            dq[b, t0:t1, hs] = (ds @ K[:kk]).reshape(t1 - t0, g, hd)
            dK[:kk] += ds.T @ Q

    parallel(one, [(b, j) for b in range(B) for j in range(KV)])
    return dq, dk, dv


# --- cross-entropy and its gradient in one pass ---------------------------------------------------

def cross_entropy_grad(h, W, labels, chunk=8192):
    """Mean cross-entropy of h·Wᵀ over the labelled rows and its gradient d(loss)/dh, in one pass over vocabulary
    chunks (online softmax: the running sum of exp(z - max)·W is rescaled when a row's max grows), so the
    logits are computed once. h (N, D); W (V, D) f32; labels (N,). Returns loss, dh (N, D), n_valid."""
    N, D = h.shape
    V = W.shape[0]
    valid = labels != IGNORE
    rows = np.nonzero(valid)[0]
    n = int(rows.size)
    dh = np.zeros((N, D), np.float32)
    if n == 0:
        return 0.0, dh, 0
    hv = h[rows] if n < N else h  # only labelled rows count
    lab = labels[rows]
    m = np.full(n, -np.inf, np.float32)
    s = np.zeros(n, np.float32)
    target = np.zeros(n, np.float32)
    acc = np.zeros((n, D), np.float32)  # sum over seen chunks of exp(z - m) W
    parts = row_parts(n)
    for c0 in range(0, V, chunk):
        c1 = min(V, c0 + chunk)
        Wc = W[c0:c1]
        z = hv @ Wc.T  # (n, c)
        hit = np.nonzero((lab >= c0) & (lab < c1))[0]
        target[hit] = z[hit, lab[hit] - c0]

        def part(r):
            lo, hi = r
            zz = z[lo:hi]
            m_new = np.maximum(m[lo:hi], zz.max(axis=1))
            alpha = np.exp(m[lo:hi] - m_new)
            zz -= m_new[:, None]
            np.exp(zz, out=zz)
            s[lo:hi] = s[lo:hi] * alpha + zz.sum(axis=1)
            acc[lo:hi] *= alpha[:, None]
            m[lo:hi] = m_new

        parallel(part, parts)
        acc += z @ Wc
    lse = m + np.log(s)
    loss = float(np.sum(lse - target) / n)
    acc /= s[:, None]  # softmax(z) W
    acc -= W[lab]  # minus the label's row
    acc *= np.float32(1.0 / n)
    if n < N:
        dh[rows] = acc
        return loss, dh, n
    return loss, acc, n
