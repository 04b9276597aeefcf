"""CPU kernels of the numpy engine: the math of engine/reference.py (the oracle they are tested against),
arranged for BLAS and the machine's cores: causal attention in query blocks per key/value head (2-D matmuls,
no repeated k/v, the masked upper triangle skipped), cross-entropy and its gradient in one pass over the
vocabulary, SwiGLU in place, elementwise work split over a thread pool (numpy releases the GIL)."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .reference import IGNORE

Q_BLOCK = 64  # query rows per attention block: the causal triangle above the diagonal blocks is skipped


@functools.cache
def n_threads() -> int:
    """Worker threads: the BLAS thread count the process was given (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS), else
    the cores; LORALAB_CPU_THREADS overrides. Read once (the BLAS reads its own once too)."""
    for var in ("LORALAB_CPU_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return os.cpu_count() or 1


@functools.cache
def _split_env() -> tuple[bool, int]:
    """LORALAB_CPU_SPLIT=0 leaves all threading to BLAS; LORALAB_CPU_SPLIT_ROWS: fewest rows worth splitting."""
    return os.environ.get("LORALAB_CPU_SPLIT", "1") != "0", int(os.environ.get("LORALAB_CPU_SPLIT_ROWS", "64"))


def _find_openblas():
    """(set threads, get threads, cblas_sgemm or None) of the OpenBLAS numpy is linked with, or None (another BLAS,
    or not Linux): numpy sets no thread count at run time and has no C += A·B."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, blasint in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                        ("", "", ctypes.c_int)):
            setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            if setter is None or getter is None:
                continue
            setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
            gemm = getattr(lib, f"{prefix}cblas_sgemm{suffix}", None)
            if gemm is not None:
                n, fl, ptr = blasint, ctypes.c_float, ctypes.c_void_p
                gemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, n, n, n, fl, ptr, n, ptr, n, fl, ptr, n]
                gemm.restype = None
            return setter, getter, gemm
    return None


_blas = _find_openblas()
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_depth = 0  # nesting of own_threads()
_saved_blas = 1
_worker = threading.local()  # set in pool threads: work they submit runs inline (no nested waits)


def _split() -> bool:
    """Split BLAS work over our own threads: inside own_threads(), where BLAS runs one thread per caller."""
    return _depth > 0 and not getattr(_worker, "on", False)


class own_threads:
    """Within it, OpenBLAS runs single-threaded and the engine splits matmuls and elementwise work over its own
    threads: on two cores this keeps both busy outside the matmuls too, and no BLAS threads spin against ours.
    Without OpenBLAS (or with one thread) it changes nothing."""

    def __init__(self, rows: int = 1 << 30):
        self.rows = rows  # rows of the work: a few (decoding) are left to BLAS's own threads, which wake faster

    def __enter__(self):
        global _depth, _saved_blas
        on, min_rows = _split_env()
        if _blas is None or n_threads() <= 1 or not on or self.rows < min_rows:
            return self
        with _lock:
            if _depth == 0:
                _saved_blas = _blas[1]()
                _blas[0](1)
            _depth += 1
        self.on = True
        return self

    def __exit__(self, *exc):
        global _depth
        if getattr(self, "on", False):
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _blas[0](_saved_blas)


def _init_worker():
    _worker.on = True


def parallel(fn, items, blas: bool = False, inline: bool = False) -> None:
    """fn(item) for every item, on the pool when there are threads to spare (each item writes its own rows, so
    the result does not depend on which thread ran it). blas: fn calls BLAS, so only inside own_threads();
    inline: too little work to be worth a hand-off."""
    global _pool
    items = list(items)
    n = n_threads()
    if inline or n <= 1 or len(items) <= 1 or getattr(_worker, "on", False) or (blas and not _split()):
        for it in items:
            fn(it)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="loralab-cpu", initializer=_init_worker)
    for f in [_pool.submit(fn, it) for it in items]:
        f.result()


def row_parts(n: int, min_rows: int = 64) -> list[tuple[int, int]]:
    """[lo, hi) row ranges, one per thread (fewer for small arrays): a fixed split, so results are repeatable."""
    k = max(1, min(n_threads(), n // min_rows))
    edges = [n * j // k for j in range(k + 1)]
    return [(edges[j], edges[j + 1]) for j in range(k)]


def _operand(x):
    """(transposed, leading dimension) of a 2-D f32 array for row-major cblas, or None if its layout will not do."""
    if x.dtype != np.float32 or x.ndim != 2:
        return None
    s0, s1 = x.strides
    if s1 == 4 and s0 % 4 == 0 and (s0 >= 4 * x.shape[1] or x.shape[0] == 1):
        return 111, max(s0 // 4, x.shape[1], 1)  # CblasNoTrans
    if s0 == 4 and s1 % 4 == 0 and (s1 >= 4 * x.shape[0] or x.shape[1] == 1):
        return 112, max(s1 // 4, x.shape[0], 1)  # CblasTrans: x is the transpose of a row-major array
    return None


def gemm_acc(a, b, c, alpha=1.0) -> None:
    """c += alpha · a @ b in place (one BLAS call, no temporary where the layouts allow). a (M, K), b (K, N),
    c (M, N) with unit column stride; views of bigger arrays are fine."""
    M, K = a.shape
    N = b.shape[1]
    gemm = _blas[2] if _blas is not None else None
    oa, ob, oc = _operand(a), _operand(b), _operand(c)
    if gemm is None or oa is None or ob is None or oc is None or oc[0] != 111 or not c.flags.writeable:
        c += (a @ b) * np.float32(alpha) if alpha != 1.0 else a @ b
        return
    if M and N and K:
        gemm(101, oa[0], ob[0], M, N, K, float(alpha), a.ctypes.data, oa[1], b.ctypes.data, ob[1], 1.0,
             c.ctypes.data, oc[1])  # CblasRowMajor


def parts(n: int) -> list[tuple[int, int]]:
    """Row blocks for work that is split over the threads: one per thread inside own_threads(), else one."""
    return row_parts(n) if _split() else [(0, n)]


def mm(a, b, out=None):
    """a @ b (2-D, f32) into out (a new array if None); inside own_threads() the rows of a (the columns of b when
    a has few rows) split over the threads."""
    M, N = a.shape[0], b.shape[1]
    if not _split() or M * N * a.shape[1] < (1 << 18):
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty((M, N), np.float32)
    if M >= 64:
        def rows(r):
            np.matmul(a[r[0]:r[1]], b, out=out[r[0]:r[1]])
        parallel(rows, row_parts(M, 32), blas=True)
    else:
        def cols(r):
            out[:, r[0]:r[1]] = a @ b[:, r[0]:r[1]]
        parallel(cols, row_parts(N, 256), blas=True)
    return out


# --- SwiGLU ---------------------------------------------------------------------------------------

CHUNK_ROWS = 16  # elementwise work in row chunks: a chunk's temporaries stay in the core's cache


def _chunks(lo, hi, rows=CHUNK_ROWS):
    return ((r, min(hi, r + rows)) for r in range(lo, hi, rows))


def swiglu(g, u, out=None):
    """silu(g) * u (N, F), as reference.swiglu, into out."""
    out = np.empty(g.shape, np.float32) if out is None else out

    def part(rows):
        for lo, hi in _chunks(*rows):
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
    s = np.empty((CHUNK_ROWS * n_threads(), F), np.float32)  # sigmoid(g), one slab per thread

    def part(job):
        k, (rlo, rhi) = job
        for lo, hi in _chunks(rlo, rhi):
            sg = s[k * CHUNK_ROWS:k * CHUNK_ROWS + hi - lo]
            gg, dd = g[lo:hi], da[lo:hi]
            np.negative(gg, out=sg)
            np.exp(sg, out=sg)
            sg += 1.0
            np.reciprocal(sg, out=sg)
            du, dg = dgu[lo:hi, F:], dgu[lo:hi, :F]
            np.multiply(gg, sg, out=du)
            du *= dd  # da * silu(g)
            np.subtract(1.0, sg, out=dg)
            dg *= gg
            dg += 1.0
            dg *= sg
            dg *= u[lo:hi]
            dg *= dd  # da * u * s * (1 + g (1 - s))

    parallel(part, list(enumerate(row_parts(g.shape[0]))))


# --- RMSNorm (reference.rmsnorm's arithmetic, without np.mean's Python-level overhead) ---------------

def rmsnorm(x, w, eps):
    """x (rows, D) -> (x * rstd) * w and rstd (rows, 1)."""
    ms = np.add.reduce(x * x, axis=-1, keepdims=True)
    ms /= x.shape[-1]
    ms += eps
    np.sqrt(ms, out=ms)
    rstd = np.divide(1.0, ms, out=ms)
    y = x * rstd
    y *= w
    return y, rstd


def rmsnorm_backward(dy, x, w, rstd, add=None, out=None):
    """add + reference.rmsnorm_backward(dy, x, w, rstd) for rows (rows, D), into out, in row chunks."""
    out = np.empty(dy.shape, np.float32) if out is None else out
    D = dy.shape[-1]
    for lo, hi in _chunks(0, dy.shape[0], 64):
        xhat = x[lo:hi] * rstd[lo:hi]
        g = dy[lo:hi] * w
        m = np.einsum("ij,ij->i", g, xhat)[:, None]
        m /= D  # mean(g * xhat)
        xhat *= m
        g -= xhat
        g *= rstd[lo:hi]
        if add is None:
            out[lo:hi] = g
        else:
            np.add(add[lo:hi], g, out=out[lo:hi])
    return out


# --- RoPE (reference.rope's rotate-half, written into halves instead of concatenated) -------------

def rope(x, cos, sin, out):
    """x (..., nh, hd) (any strides); cos/sin (..., hd) whose halves are equal; the result into out."""
    h = x.shape[-1] // 2
    c, sn = cos[..., None, :h], sin[..., None, :h]
    x1, x2 = x[..., :h], x[..., h:]
    np.multiply(x1, c, out=out[..., :h])
    out[..., :h] -= x2 * sn
    np.multiply(x2, c, out=out[..., h:])
    out[..., h:] += x1 * sn
    return out


def rope_backward(dy, cos, sin, out):
    """reference.rope_backward of dy (..., nh, hd) written into out: the rotation by -angle (negating sin is exact,
    so the bits are those of adding the products rope subtracts)."""
    return rope(dy, cos, -sin, out)


# --- causal GQA attention -------------------------------------------------------------------------

def attention_blocks(T, Tk, t_offset, segments, g):
    """The query blocks of one forward: (t0, t1, keys, c0, bias): keys past a block's last query are never visible,
    so skipped; bias (B|1, (t1-t0)*g, keys-c0) f32 is 0 where a key is visible and -inf where not, for the keys
    from c0 on (before c0 every key is visible to every row), or None when all are (rows query-major:
    row = t * g + head within the key/value group)."""
    out = []
    for t0 in range(0, T, Q_BLOCK):
        t1 = min(T, t0 + Q_BLOCK)
        kk = min(t1 + t_offset, Tk)
        vis = np.arange(kk)[None, :] <= (np.arange(t0, t1) + t_offset)[:, None]  # (bq, kk)
        vis = vis[None]
        if segments is not None:
            vis = vis & (segments[:, t0:t1, None] == segments[:, None, :kk])
        full = vis.all(axis=(0, 1))  # (kk,) keys every row sees
        c0, bias = kk, None
        if not full.all():
            c0 = int(np.argmin(full))
            bias = np.where(np.repeat(vis[:, :, c0:], g, axis=1), np.float32(0.0), np.float32(-np.inf))
        out.append((t0, t1, kk, c0, bias))
    return out


def _bias(bias, b):
    return None if bias is None else bias[b if bias.shape[0] > 1 else 0]


def attention(q, k, v, blocks, need_lse=True):
    """q (B, T, H, hd); k, v (B, Tk, KV, hd) (views of a cache are fine); blocks from attention_blocks.
    Returns out (B, T, H, hd) and lse (B, H, T) (None when not needed), as reference.attention."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    g = H // KV
    scale = np.float32(1.0 / np.sqrt(hd))
    small = T * k.shape[1] * H < 1 << 16
    if small and len(blocks) == 1:  # decoding: every key/value head in one batched matmul, fewer calls
        return _attention_batched(q, k, v, blocks[0][3], blocks[0][4], scale, need_lse)
    out = np.empty((B, T, H, hd), np.float32)
    lse = np.empty((B, H, T), np.float32)

    def one(item):
        b, j = item
        hs = slice(j * g, (j + 1) * g)
        K, V = k[b, :, j], v[b, :, j]  # (Tk, hd)
        for t0, t1, kk, c0, bias in blocks:
            Q = q[b, t0:t1, hs].reshape(-1, hd) * scale  # ((t1-t0)*g, hd), a new array
            s = Q @ K[:kk].T
            bb = _bias(bias, b)
            if bb is not None:
                s[:, c0:] += bb
            mx = s.max(axis=1, keepdims=True)
            s -= mx
            np.exp(s, out=s)
            den = s.sum(axis=1, keepdims=True)
            o = s @ V[:kk]
            o /= den
            out[b, t0:t1, hs] = o.reshape(t1 - t0, g, hd)
            lse[b, hs, t0:t1] = (mx + np.log(den)).reshape(t1 - t0, g).T

    parallel(one, [(b, j) for b in range(B) for j in range(KV)], blas=True, inline=small)
    return out, lse


def _attention_batched(q, k, v, c0, bias, scale, need_lse):
    """attention() for one query block of few rows: a (B, KV) stack of matmuls."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    g = H // KV
    if T == 1:  # one query (decoding): its heads are already grouped by key/value head
        Q = q.reshape(B, KV, g, hd) * scale
    else:
        Q = q.reshape(B, T, KV, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, KV, T * g, hd) * scale
    s = Q @ k.transpose(0, 2, 3, 1)  # (B, KV, T*g, Tk)
    if bias is not None:
        s[..., c0:] += bias[:, None]
    mx = s.max(axis=-1, keepdims=True)
    s -= mx
    np.exp(s, out=s)
    den = s.sum(axis=-1, keepdims=True)
    o = s @ v.transpose(0, 2, 1, 3)  # (B, KV, T*g, hd)
    o /= den
    if T == 1:
        return o.reshape(B, 1, H, hd), ((mx + np.log(den)).reshape(B, H, 1) if need_lse else None)
    out = o.reshape(B, KV, T, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H, hd)
    if not need_lse:
        return out, None
    lse = (mx + np.log(den)).reshape(B, KV, T, g).transpose(0, 1, 3, 2).reshape(B, H, T)
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
        for t0, t1, kk, c0, bias in blocks:
            Q = q[b, t0:t1, hs].reshape(-1, hd) * scale  # as in the forward, so P is the forward's
            dO = dout[b, t0:t1, hs].reshape(-1, hd)
            delta = np.einsum("ij,ij->i", dO, out[b, t0:t1, hs].reshape(-1, hd))[:, None]
            p = Q @ K[:kk].T
            bb = _bias(bias, b)
            if bb is not None:
                p[:, c0:] += bb
            p -= lse[b, hs, t0:t1].T.reshape(-1, 1)
            np.exp(p, out=p)  # P
            gemm_acc(p.T, dO, dV[:kk])
            ds = dO @ V[:kk].T  # dP
            ds -= delta
            ds *= p  # dS / scale
            dQ = ds @ K[:kk]
            dQ *= scale
            dq[b, t0:t1, hs] = dQ.reshape(t1 - t0, g, hd)
            gemm_acc(ds.T, Q, dK[:kk])

    parallel(one, [(b, j) for b in range(B) for j in range(KV)], blas=True, inline=T * k.shape[1] * H < 1 << 16)
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
    acc = np.zeros((n, D), np.float32)  # sum over the chunks seen of exp(z - m) W

    def part(r):
        lo, hi = r
        h_, lab_, m_, s_, acc_ = hv[lo:hi], lab[lo:hi], m[lo:hi], s[lo:hi], acc[lo:hi]
        for c0 in range(0, V, chunk):
            c1 = min(V, c0 + chunk)
            Wc = W[c0:c1]
            z = h_ @ Wc.T  # (rows, c)
            hit = np.nonzero((lab_ >= c0) & (lab_ < c1))[0]
            target[lo + hit] = z[hit, lab_[hit] - c0]
            m_new = np.maximum(m_, z.max(axis=1))
            alpha = np.exp(m_ - m_new)
            z -= m_new[:, None]
            np.exp(z, out=z)
            s_ *= alpha
            s_ += z.sum(axis=1)
            acc_ *= alpha[:, None]
            gemm_acc(z, Wc, acc_)
            m_[:] = m_new

    parallel(part, row_parts(n) if _split() else [(0, n)], blas=True)
    lse = m + np.log(s)
    loss = float(np.sum(lse - target) / n)
    acc /= s[:, None]  # softmax(z) W
    acc -= W[lab]  # minus the label's row
    acc *= np.float32(1.0 / n)
    if n < N:
        dh[rows] = acc
        return loss, dh, n
    return loss, acc, n
