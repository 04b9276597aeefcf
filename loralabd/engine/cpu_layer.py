"""One decoder layer of the numpy engine, forward and backward, its token rows split over the CPU threads.

Everything in a layer but attention is row-local (norms, projections with their LoRA terms, RoPE, SwiGLU,
residuals), so each thread takes its rows through the whole stretch between two attention calls: two hand-offs
a layer each way, all the elementwise work parallel, and matmuls big enough for BLAS on each thread. The LoRA
gradients (sums over rows) are summed over the row blocks in a fixed order, so a run repeats bit for bit.
The math is reference.py's; the numpy engine's tests hold it to transformers + PEFT.
"""

from __future__ import annotations

import numpy as np

from . import cpu_ops as C

# projections that read the same input, multiplied as one matrix (their weights stacked by rows)
QKV, O, GU, DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


def _stacked_A(ad, i, names):
    As = [ad.get(i, n)[0] for n in names]
    return As[0] if len(As) == 1 else np.concatenate(As)  # (r * len(names), in)


def proj(eng, i, names, x, adapters, lo, hi, out, masks=None, xa_keep=None):
    """Rows lo:hi of x (N, in) through the projections `names`: x·Wᵀ + bias + each adapter's LoRA term, written to
    out (hi-lo, sum of outs). masks: name -> (N, in) dropout mask of the first adapter; xa_keep: name -> (N, r)
    array that keeps the first adapter's x·Aᵀ rows for backward."""
    W, bias, rows = eng.group(i, names)
    xr = x[lo:hi]
    C.mm(xr, W.T, out=out)
    if bias is not None:
        out += bias
    for j, (ad, s) in enumerate(adapters):
        here = [n for n in names if ad.get(i, n) is not None]
        if s == 0.0 or not here:
            continue
        c, r = np.float32(s * ad.config.scale), ad.config.r
        if j == 0 and masks:
            xas = [(xr * masks[n][lo:hi]) @ ad.get(i, n)[0].T for n in here]
        else:  # the group's x·Aᵀ in one pass over x
            xa_all = xr @ _stacked_A(ad, i, here).T  # (rows, r * len(here))
            xas = [xa_all[:, k * r:(k + 1) * r] for k in range(len(here))]
        for n, xa in zip(here, xas):
            r0, r1 = rows[n]
            C.gemm_acc(xa, ad.get(i, n)[1].T, out[:, r0:r1], c)
            if j == 0 and xa_keep is not None:
                xa_keep[n][lo:hi] = xa
    return out


def proj_back(eng, i, names, dy, x, xa, masks, adapter, need_dx=True):
    """Row block: dy (rows, sum of outs), x (rows, in) the forward input, xa: name -> (rows, r), masks: name -> (rows,
    in) or None. Returns dx (rows, in) (None when not needed) and {grad name: this block's share of dA or dB}."""
    W, _, rows = eng.group(i, names)
    dx = C.mm(dy, W) if need_dx else None
    s = adapter.config.scale
    here = [n for n in names if adapter.get(i, n) is not None]
    part: dict[str, np.ndarray] = {}
    dxas = []
    for n in here:
        r0, r1 = rows[n]
        dyj = dy[:, r0:r1]  # (rows, out): a strided view, BLAS takes it as is
        part[f"{i}.{n}.B"] = s * (dyj.T @ xa[n])
        dxas.append(s * (dyj @ adapter.get(i, n)[1]))  # (rows, r)
    if here and not masks:  # the group's dA and dx in one matmul each
        dxa = dxas[0] if len(here) == 1 else np.concatenate(dxas, axis=1)
        dA = dxa.T @ x
        r = adapter.config.r
        for k, n in enumerate(here):
            part[f"{i}.{n}.A"] = dA[k * r:(k + 1) * r]
        if dx is not None:
            C.gemm_acc(dxa, _stacked_A(adapter, i, here), dx)
    elif here:
        for n, dxa in zip(here, dxas):
            part[f"{i}.{n}.A"] = dxa.T @ (x * masks[n])
            if dx is not None:
                dxd = dxa @ adapter.get(i, n)[0]
                dxd *= masks[n]
                dx += dxd
    return dx, part


def _masks(adapter, i, names, shape, drop_rng):
    """The first adapter's dropout masks for these projections, drawn in order (one per targeted projection)."""
    p = adapter.config.dropout
    if drop_rng is None or p <= 0.0:
        return None
    return {n: (drop_rng.random(shape) >= p).astype(np.float32) / (1.0 - p)
            for n in names if adapter.get(i, n) is not None}


def layer_forward(eng, i, x, adapters, cos, sin, blocks, cache=None, start=0, keep=False, drop_rng=None):
    """x (B, T, D) -> the layer's output (B, T, D) and, when keep, what layer_backward needs."""
    a, L = eng.args, eng.model.layers[i]
    Bsz, T, D = x.shape
    N, F = Bsz * T, a.intermediate_size
    H, KV, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    Hd, KVd = H * hd, KV * hd
    eps = a.rms_norm_eps
    xN, cosN, sinN = x.reshape(N, D), cos.reshape(N, hd), sin.reshape(N, hd)
    first = adapters[0][0] if keep and adapters else None
    xa = None
    if first is not None:
        xa = {n: np.empty((N, first.config.r), np.float32) for n in QKV + O + GU + DOWN if first.get(i, n) is not None}
    parts = C.parts(N)

    # norm, q/k/v with LoRA, RoPE
    hN, r1 = np.empty((N, D), np.float32), np.empty((N, 1), np.float32)
    q, k, v = (np.empty((N, n, hd), np.float32) for n in (H, KV, KV))
    m_qkv = _masks(first, i, QKV, (N, D), drop_rng) if first is not None else None

    def pre(rr):
        lo, hi = rr
        hN[lo:hi], r1[lo:hi] = C.rmsnorm(xN[lo:hi], L.input_layernorm, eps)
        y = proj(eng, i, QKV, hN, adapters, lo, hi, np.empty((hi - lo, Hd + 2 * KVd), np.float32), m_qkv, xa)
        C.rope(y[:, :Hd].reshape(-1, H, hd), cosN[lo:hi], sinN[lo:hi], out=q[lo:hi])
        C.rope(y[:, Hd:Hd + KVd].reshape(-1, KV, hd), cosN[lo:hi], sinN[lo:hi], out=k[lo:hi])
        v[lo:hi] = y[:, Hd + KVd:].reshape(-1, KV, hd)

    C.parallel(pre, parts, blas=True)
    q, k, v = q.reshape(Bsz, T, H, hd), k.reshape(Bsz, T, KV, hd), v.reshape(Bsz, T, KV, hd)
    if cache is not None:
        Tk = start + T
        cache.k[i][:, start:Tk] = k
        cache.v[i][:, start:Tk] = v
        att, lse = C.attention(q, cache.k[i][:, :Tk], cache.v[i][:, :Tk], blocks, keep)
    else:
        att, lse = C.attention(q, k, v, blocks, keep)
    attN = att.reshape(N, Hd)

    # o with LoRA, residual, norm, gate/up with LoRA, SwiGLU, down with LoRA, residual
    x1, h2N, r2 = np.empty((N, D), np.float32), np.empty((N, D), np.float32), np.empty((N, 1), np.float32)
    gu, act, out = np.empty((N, 2 * F), np.float32), np.empty((N, F), np.float32), np.empty((N, D), np.float32)
    m_rest = None
    if first is not None and drop_rng is not None:  # drawn in projection order: o, gate, up, down
        m_rest = {**(_masks(first, i, O, (N, Hd), drop_rng) or {}), **(_masks(first, i, GU, (N, D), drop_rng) or {}),
                  **(_masks(first, i, DOWN, (N, F), drop_rng) or {})}

    def post(rr):
        lo, hi = rr
        proj(eng, i, O, attN, adapters, lo, hi, x1[lo:hi], m_rest, xa)
        x1[lo:hi] += xN[lo:hi]
        h2N[lo:hi], r2[lo:hi] = C.rmsnorm(x1[lo:hi], L.post_attention_layernorm, eps)
        proj(eng, i, GU, h2N, adapters, lo, hi, gu[lo:hi], m_rest, xa)
        C.swiglu(gu[lo:hi, :F], gu[lo:hi, F:], out=act[lo:hi])
        proj(eng, i, DOWN, act, adapters, lo, hi, out[lo:hi], m_rest, xa)
        out[lo:hi] += x1[lo:hi]

    C.parallel(post, parts, blas=True)
    saved = None
    if keep:
        masks = {**(m_qkv or {}), **(m_rest or {})}
        saved = dict(x=xN, hN=hN, r1=r1, q=q, k=k, v=v, lse=lse, attN=attN, x1=x1, h2N=h2N, r2=r2, gu=gu, act=act,
                     xa=xa or {}, masks=masks)
    return out.reshape(Bsz, T, D), saved


def _sum_parts(grads, shares):
    """The row blocks' shares of each gradient, added in block order."""
    for key in shares[0]:
        g = shares[0][key].astype(np.float32, copy=True)
        for sh in shares[1:]:
            g += sh[key]
        grads[key] = g


def layer_backward(eng, i, sv, dx, adapter, cos, sin, blocks, grads, need_dx=True):
    """dx (N, D) of the layer's output -> dx of its input (N, D) (None when not needed); the adapter's gradients
    of this layer into grads."""
    a, L = eng.args, eng.model.layers[i]
    N, D = dx.shape
    F, H, KV, hd = a.intermediate_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
    Hd, KVd = H * hd, KV * hd
    Bsz, T = sv["q"].shape[:2]
    xa, masks = sv["xa"], sv["masks"]
    parts = C.parts(N)

    def back(names, dy, x, lo, hi, need=True):
        """proj_back over rows lo:hi with their x·Aᵀ and dropout masks."""
        return proj_back(eng, i, names, dy, x, {n: xa[n][lo:hi] for n in names if n in xa},
                         {n: masks[n][lo:hi] for n in names if n in masks} or None, adapter, need)

    # down, SwiGLU, gate/up, norm, residual, o
    dx1, datt = np.empty((N, D), np.float32), np.empty((N, Hd), np.float32)
    shares_b: list[dict] = [{} for _ in parts]

    def post(job):
        j, (lo, hi) = job
        gu = sv["gu"][lo:hi]
        dact, sh = back(DOWN, dx[lo:hi], sv["act"][lo:hi], lo, hi)
        shares_b[j].update(sh)
        dgu = np.empty((hi - lo, 2 * F), np.float32)
        C.swiglu_backward(dact, gu[:, :F], gu[:, F:], dgu)
        del dact
        dh2, sh = back(GU, dgu, sv["h2N"][lo:hi], lo, hi)
        shares_b[j].update(sh)
        C.rmsnorm_backward(dh2, sv["x1"][lo:hi], L.post_attention_layernorm, sv["r2"][lo:hi], dx[lo:hi], dx1[lo:hi])
        datt[lo:hi], sh = back(O, dx1[lo:hi], sv["attN"][lo:hi], lo, hi)
        shares_b[j].update(sh)

    C.parallel(post, list(enumerate(parts)), blas=True)
    _sum_parts(grads, shares_b)
    dq, dk, dv = C.attention_backward(datt.reshape(Bsz, T, H, hd), sv["attN"].reshape(Bsz, T, H, hd), sv["q"],
                                      sv["k"], sv["v"], sv["lse"], blocks)
    del datt
    dqN, dkN, dvN = dq.reshape(N, H, hd), dk.reshape(N, KV, hd), dv.reshape(N, KVd)
    cosN, sinN = cos.reshape(N, hd), sin.reshape(N, hd)

    # RoPE, q/k/v, norm, residual
    dxo = np.empty((N, D), np.float32) if need_dx else None
    shares_a: list[dict] = [{} for _ in parts]

    def pre(job):
        j, (lo, hi) = job
        dqkv = np.empty((hi - lo, Hd + 2 * KVd), np.float32)
        C.rope_backward(dqN[lo:hi], cosN[lo:hi], sinN[lo:hi], out=dqkv[:, :Hd].reshape(-1, H, hd))
        C.rope_backward(dkN[lo:hi], cosN[lo:hi], sinN[lo:hi], out=dqkv[:, Hd:Hd + KVd].reshape(-1, KV, hd))
        dqkv[:, Hd + KVd:] = dvN[lo:hi]
        dh, sh = back(QKV, dqkv, sv["hN"][lo:hi], lo, hi, need_dx)
        shares_a[j].update(sh)
        if dxo is not None:
            C.rmsnorm_backward(dh, sv["x"][lo:hi], L.input_layernorm, sv["r1"][lo:hi], dx1[lo:hi], dxo[lo:hi])

    C.parallel(pre, list(enumerate(parts)), blas=True)
    _sum_parts(grads, shares_a)
    return dxo
