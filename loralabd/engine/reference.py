"""Every op of the model in plain numpy, f32: forward and backward. The oracle for the WGSL kernels.

Shapes: B batch, T sequence, D model width, H query heads, KV key/value heads, hd head dim,
V vocabulary, N = B*T rows.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100  # label of a position that does not count in the loss


# --- RMSNorm -------------------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    """y = x / sqrt(mean(x^2) + eps) * w. Returns y and rstd (..., 1) for backward."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * rstd) * w, rstd


def rmsnorm_backward(dy, x, w, rstd):
    """dx of rmsnorm (w is frozen, so no dw)."""
    xhat = x * rstd
    g = dy * w
    return rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))


# --- RoPE (HF rotate_half convention on un-permuted rows) -----------------------------------------

def rope_tables(positions, head_dim, theta):
    """cos, sin: (..., hd) for integer positions (...)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    f = np.asarray(positions, dtype=np.float64)[..., None] * inv  # (..., hd/2)
    emb = np.concatenate([f, f], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x, cos, sin):
    """x: (B, T, nh, hd); cos/sin: (B, T, hd) or (T, hd)."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


def rope_backward(dy, cos, sin):
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    t = dy * sin[:, :, None]
    h = t.shape[-1] // 2
    return dy * cos[:, :, None] + np.concatenate([t[..., h:], -t[..., :h]], axis=-1)


# --- causal GQA attention ------------------------------------------------------------------------

def attention_mask(T, segments=None, t_offset=0, t_keys=None):
    """(B or 1, Tq, Tk) bool: key j visible to query i (causal, same segment when packing)."""
    t_keys = t_keys or T + t_offset
    qi = np.arange(T)[:, None] + t_offset
    kj = np.arange(t_keys)[None, :]
    m = (kj <= qi)[None]
    if segments is not None:
        m = m & (segments[:, :, None] == segments[:, None, :])
    return m


def attention(q, k, v, mask):
    """q: (B, T, H, hd); k, v: (B, Tk, KV, hd); mask (B|1, T, Tk). Returns out (B, T, H, hd), lse (B, H, T)."""
    B, T, H, hd = q.shape
    g = H // k.shape[2]
    qt = q.transpose(0, 2, 1, 3)  # (B, H, T, hd)
    kk = np.repeat(k, g, axis=2).transpose(0, 2, 1, 3)  # (B, H, Tk, hd)
    vv = np.repeat(v, g, axis=2).transpose(0, 2, 1, 3)
    s = (qt @ kk.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hd))  # (B, H, T, Tk); matmul, not einsum: BLAS
    s = np.where(mask[:, None], s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    p = np.exp(s - mx)
    den = p.sum(axis=-1, keepdims=True)
    p /= den
    out = (p @ vv).transpose(0, 2, 1, 3)  # (B, T, H, hd)
    return np.ascontiguousarray(out, dtype=np.float32), (mx + np.log(den))[..., 0].astype(np.float32)


def attention_backward(dout, q, k, v, mask, lse):
    """Recomputes P from the stored logsumexp (as the flash-attention backward does)."""
    B, T, H, hd = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    g = H // KV
    scale = np.float32(1.0 / np.sqrt(hd))  # a numpy f64 scalar would promote the scores to f64
    qt = q.transpose(0, 2, 1, 3)  # (B, H, T, hd)
    kk = np.repeat(k, g, axis=2).transpose(0, 2, 1, 3)  # (B, H, Tk, hd)
    vv = np.repeat(v, g, axis=2).transpose(0, 2, 1, 3)
    dot = dout.transpose(0, 2, 1, 3)  # (B, H, T, hd)
    s = (qt @ kk.transpose(0, 1, 3, 2)) * scale
    p = np.where(mask[:, None], np.exp(s - lse[..., None]), np.float32(0.0))  # (B, H, T, Tk)
    dvv = p.transpose(0, 1, 3, 2) @ dot  # (B, H, Tk, hd)
    dp = dot @ vv.transpose(0, 1, 3, 2)  # (B, H, T, Tk)
    delta = np.sum(dot * (p @ vv), axis=-1)  # (B, H, T)
    ds = p * (dp - delta[..., None]) * scale
    dq = (ds @ kk).transpose(0, 2, 1, 3)  # (B, T, H, hd)
    dkk = (ds.transpose(0, 1, 3, 2) @ qt).transpose(0, 2, 1, 3)  # (B, Tk, H, hd)
    dk = dkk.reshape(B, Tk, KV, g, hd).sum(axis=3)
    dv = dvv.transpose(0, 2, 1, 3).reshape(B, Tk, KV, g, hd).sum(axis=3)
    return (np.ascontiguousarray(dq, dtype=np.float32), dk.astype(np.float32), dv.astype(np.float32))


# --- SwiGLU --------------------------------------------------------------------------------------

def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(gate, up):
    return silu(gate) * up


def swiglu_backward(da, gate, up):
    s = 1.0 / (1.0 + np.exp(-gate))
    sg = gate * s
    return da * up * s * (1.0 + gate * (1.0 - s)), da * sg


# --- linear with LoRA ----------------------------------------------------------------------------

def lora_linear(x, W, bias=None, A=None, Bm=None, scale=0.0, drop_mask=None):
    """y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ. x: (N, in); W: (out, in); A: (r, in); B: (out, r).
    drop_mask: (N, in) already divided by keep probability, or None. Returns y and xa (N, r)."""
    y = x @ W.T
    if bias is not None:
        y = y + bias
    xa = None
    if A is not None:
        xd = x if drop_mask is None else x * drop_mask
        xa = xd @ A.T
        y = y + scale * (xa @ Bm.T)
    return y, xa


def lora_linear_backward(dy, x, W, A=None, Bm=None, scale=0.0, xa=None, drop_mask=None):
    """Returns dx (N, in), dA (r, in), dB (out, r); the base W gets no gradient."""
    dx = dy @ W
    if A is None:
        return dx, None, None
    dB = scale * (dy.T @ xa)
    dxa = scale * (dy @ Bm)  # (N, r)
    xd = x if drop_mask is None else x * drop_mask
    dA = dxa.T @ xd
    dxd = dxa @ A
    dx = dx + (dxd if drop_mask is None else dxd * drop_mask)
    return dx, dA, dB


# --- cross-entropy over a (possibly quantized) output matrix, in vocabulary chunks ---------------

def cross_entropy(h, W_rows, V, labels, chunk=8192):
    """Mean CE of logits h·Wᵀ over positions with labels != IGNORE, never holding (N, V).
    h: (N, D); W_rows(start, stop) -> (stop-start, D) f32; labels (N,).
    Returns loss, lse (N,), n_valid."""
    N = h.shape[0]
    m = np.full(N, -np.inf, np.float32)
    s = np.zeros(N, np.float32)
    target = np.zeros(N, np.float32)
    valid = labels != IGNORE
    for c0 in range(0, V, chunk):
        c1 = min(V, c0 + chunk)
        z = h @ W_rows(c0, c1).T  # (N, c)
        zm = z.max(axis=1)
        m_new = np.maximum(m, zm)
        s = s * np.exp(m - m_new) + np.exp(z - m_new[:, None]).sum(axis=1)
        m = m_new
        hit = valid & (labels >= c0) & (labels < c1)
        target[hit] = z[hit, labels[hit] - c0]
    lse = m + np.log(s)
    n = int(valid.sum())
    loss = float(np.sum((lse - target)[valid]) / max(n, 1))
    return loss, lse, n


def cross_entropy_backward(h, W_rows, V, labels, lse, n_valid, chunk=8192):
    """dh (N, D) of the mean loss."""
    valid = labels != IGNORE
    w = valid.astype(np.float32) / max(n_valid, 1)
    dh = np.zeros_like(h)
    for c0 in range(0, V, chunk):
        c1 = min(V, c0 + chunk)
        Wc = W_rows(c0, c1)
        p = np.exp(h @ Wc.T - lse[:, None])
        hit = valid & (labels >= c0) & (labels < c1)
        p[np.nonzero(hit)[0], labels[hit] - c0] -= 1.0
        dh += (p * w[:, None]) @ Wc
    return dh


# --- AdamW (torch.optim.AdamW's arithmetic) ------------------------------------------------------

def adamw(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """In place on p, m, v; step counts from 1."""
    p *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    denom = np.sqrt(v) / np.sqrt(bc2) + eps
    p -= (lr / bc1) * m / denom


# --- sampling ------------------------------------------------------------------------------------

def sample(logits, rng, temperature=0.0, top_k=0, top_p=1.0):
    """One token id from (V,) logits: greedy at temperature 0, else top-k, then top-p (nucleus)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k and top_k > 0:
        order = order[:top_k]
    zs = z[order]
    p = np.exp(zs - zs.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = np.searchsorted(np.cumsum(p), top_p) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


# --- GPU sampling (shaders/sample.wgsl), bit for bit in its integer parts ---------------------------

def _pcg(v):
    """PCG hash (RXS-M-XS) in uint32 arithmetic, elementwise."""
    with np.errstate(over="ignore"):
        v = np.asarray(v, np.uint32)
        s = v * np.uint32(747796405) + np.uint32(2891336453)
        w = ((s >> ((s >> np.uint32(28)) + np.uint32(4))) ^ s) * np.uint32(277803737)
        return (w >> np.uint32(22)) ^ w


def pcg_uniform(seed, counter, row, idx):
    """u in (0, 1) of sample.wgsl for (seed, counter, row b, token ids idx): (f32(h >> 8) + 0.5) / 2^24."""
    key = _pcg(_pcg(_pcg(np.uint32(int(seed) & 0xFFFFFFFF)) ^ np.uint32(int(counter) & 0xFFFFFFFF))
               ^ np.uint32(int(row) & 0xFFFFFFFF))
    h = _pcg(key ^ _pcg(np.asarray(idx, np.uint32)))
    return ((h >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)


def order_key(x):
    """Order-preserving uint32 encoding of f32 (-0 read as +0), as sample.wgsl's okey."""
    u = np.asarray(x, np.float32).view(np.uint32).copy()
    u[u == 0x80000000] = 0
    return np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def sample_keep(logits, temperature, top_k=0, top_p=1.0):
    """Boolean (V,) mask of the tokens sample.wgsl may choose at temperature > 0: top-k by logit (ties at
    the k-th value all kept), then top-p over the top-k set's renormalised softmax (the smallest set of
    highest-probability tokens with mass >= top_p, ties at the last value all kept; top_p <= 0: the
    maximum and its ties; top_p >= 1: no cut)."""
    l = np.asarray(logits, np.float32).reshape(-1)
    V = l.size
    T = np.float32(temperature)
    keep = np.ones(V, bool)
    k = int(top_k or 0)
    if 0 < k < V:
        kth = np.partition(l, V - k)[V - k]  # the k-th largest value
        keep = l >= kth
    tp = np.float32(min(float(top_p), 1.0))
    if not tp >= np.float32(1.0):
        lmax = l.max()
        e = np.exp((l - lmax) / T).astype(np.float64)  # f32 exponent as on the GPU, summed in f64
        e[~keep] = 0.0
        target = float(tp) * e.sum()
        order = np.argsort(-l[keep], kind="stable")  # kept logits, descending
        lk, cum = l[keep][order], np.cumsum(e[keep][order])
        last = np.r_[np.nonzero(lk[1:] != lk[:-1])[0], lk.size - 1]  # last position of each distinct value
        sums, vals = cum[last], lk[last]  # mass of {l >= v} for each distinct kept value v, descending
        j = int(np.argmax(sums >= target)) if (sums >= target).any() else len(vals) - 1
        keep &= l >= vals[j]
    return keep


def sample_token(logits, temperature, top_k=0, top_p=1.0, seed=0, counter=0, row=0) -> int:
    """The token sample.wgsl picks for one (V,) row: temperature <= 0 → argmax (lowest id on ties); else
    argmax over sample_keep of logits/T + Gumbel(-log(-log(u))), u = pcg_uniform(seed, counter, row, i):
    an exact draw from the kept set's renormalised softmax(logits / T)."""
    l = np.asarray(logits, np.float32).reshape(-1)
    T = np.float32(temperature)
    if not T > 0:
        return int(np.argmax(l))
    keep = sample_keep(l, T, top_k, top_p)
    u = pcg_uniform(seed, counter, row, np.arange(l.size))
    with np.errstate(divide="ignore"):
        s = l / T - np.log(-np.log(u))
    s = np.where(keep, s, -np.inf).astype(np.float32)
    return int(np.argmax(s))
