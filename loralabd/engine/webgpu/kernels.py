"""Thin Python wrappers over the WGSL kernels in shaders/: each returns one recorded dispatch (an Op).

Buffers are f32 unless said otherwise; shapes in the trailing comments. Weights are uploaded once as
`GpuWeight` in their stored format (q4_1 / q8_0 blocks, f16 pairs, f32) and dequantized in registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...models.quant import QuantTensor
from .runtime import Buf, Op, Runtime, WebGPUError, grid1d

FORMAT_DEFINE = {"q4_1": "Q4_1", "q8_0": "Q8_0", "f16": "F16", "f32": "F32"}


@dataclass
class GpuWeight:
    """A (rows, cols) matrix on the GPU. w_ld: row stride in elements (dense) or blocks per row (quantized)."""

    kind: str
    rows: int
    cols: int
    wq: Buf
    ws: Buf | None
    w_ld: int

    @property
    def define(self) -> dict:
        return {FORMAT_DEFINE[self.kind]: 1}

    @property
    def nbytes(self) -> int:
        return self.wq.nbytes + (self.ws.nbytes if self.ws is not None else 0)


def upload_weight(rt: Runtime, qt: QuantTensor, name: str) -> GpuWeight:
    rows, cols = qt.shape
    if qt.kind == "q4_1":
        assert qt.scales is not None, "q4_1 blocks carry scales"
        nb = cols // 32
        return GpuWeight("q4_1", rows, cols, rt.buffer(qt.qs.nbytes, name, qt.qs),
                         rt.buffer(qt.scales.nbytes, name + ".scales", qt.scales), nb)
    if qt.kind == "q8_0":
        assert qt.scales is not None, "q8_0 blocks carry scales"
        nb = cols // 32
        sc = qt.scales.reshape(-1)
        if sc.size % 2:
            sc = np.concatenate([sc, np.zeros(1, np.float16)])
        return GpuWeight("q8_0", rows, cols, rt.buffer(qt.qs.nbytes, name, qt.qs),
                         rt.buffer(sc.nbytes, name + ".scales", sc), nb)
    if qt.kind == "f16":
        ld = -(-cols // 4) * 4  # rows padded with zeros so that a vec4 never straddles two rows
        w = np.zeros((rows, ld), np.float16)
        w[:, :cols] = qt.qs
        return GpuWeight("f16", rows, cols, rt.buffer(w.nbytes, name, w), None, ld)
    if qt.kind == "f32":
        w = np.ascontiguousarray(qt.qs, np.float32)
        return GpuWeight("f32", rows, cols, rt.buffer(w.nbytes, name, w), None, cols)
    raise WebGPUError(f"weight {name}: format {qt.kind!r} has no WebGPU kernel (use q4_1, q8_0, f16 or f32)")


def dense_weight(buf: Buf, rows: int, cols: int) -> GpuWeight:
    """An f32 buffer (LoRA A/B, activations) seen as a (rows, cols) matrix operand."""
    return GpuWeight("f32", rows, cols, buf, None, cols)


# --- matmul.wgsl -------------------------------------------------------------------------------------

def _mm_args(x, w, c, M, N, K, mode, a_off, lda, c_off, ldc, w_row0, bias, lora, res, beta, alpha, drop):
    lp, lq, R, q_sn, q_sr, ls = lora[:6] if lora is not None else (None, None, 0, 0, 0, 0.0)
    lp_ld, seg1, seg2 = lora[6:9] if lora is not None and len(lora) > 6 else (R, 0xFFFFFFFF, 0xFFFFFFFF)
    params = dict(M=M, N=N, K=K, R=R, a_off=a_off, lda=(M if mode == "backward_dw" else K) if lda is None else lda,
                  c_off=c_off, ldc=N if ldc is None else ldc, w_row0=w_row0, w_ld=w.w_ld, q_sn=q_sn, q_sr=q_sr,
                  has_bias=int(bias is not None), has_res=int(res is not None), beta=float(beta),
                  alpha=float(alpha), lscale=float(ls), drop_mode=0, drop_thr=0, drop_salt=0, drop_ld=0,
                  drop_scale=1.0, lp_ld=lp_ld, seg1=seg1, seg2=seg2, eps=0.0)
    bufs = dict(x=x, wq=w.wq, ws=w.ws, bias=bias, lp=lp, lq=lq, res=res, c=c)
    if drop is not None:
        dmode, dyn, pdrop, salt, ld = drop
        params.update(drop_mode=dmode, drop_thr=drop_threshold(pdrop), drop_salt=salt, drop_ld=ld,
                      drop_scale=float(np.float32(1.0) / np.float32(1.0 - pdrop)))
        bufs["dyn"] = dyn
    return bufs, params


def matmul(rt: Runtime, x: Buf, w: GpuWeight, c: Buf, M: int, N: int, K: int, *, mode: str = "forward",
           a_off=0, lda=None, c_off=0, ldc=None, w_row0=0, bias: Buf | None = None, lora=None,
           res: Buf | None = None, beta=0.0, alpha=1.0, drop=None, prologue=None) -> Op:
    """mode forward:     C(M,N) = alpha*X(M,K)·W[w_row0:w_row0+N]ᵀ + bias + lscale·LP(M,R)·LQᵀ + res + beta*C
       mode gemv:        the same for small M (decode), one invocation per 4 outputs (gemv_wg: a workgroup)
       mode backward_dx: C(M,N) = alpha*X(M,K)·W[w_row0:w_row0+K] + lscale·LP·LQᵀ + beta*C
       mode backward_dw: C(M,N) = alpha*X(K,M)ᵀ·W(K,N) + beta*C   (W dense)
    forward/backward_dx on hardware adapters (rt.tiled) when M >= 64: *_skinny for N <= 16 (LORALAB_WGPU_SKINNY=0:
    off), else *_mmt or *_tiled (mm_tile).
    lora = (LP buf, LQ buf, R, q_sn, q_sr, lscale[, lp_ld, seg1, seg2]): LQ[n, r] at n*q_sn + r*q_sr; for a
    fused weight, columns >= seg1 (seg2) read LP's 2nd (3rd) group of R columns (LP row stride lp_ld).
    drop = (mode 1|2|3, dyn buf [seed, step, micro], p, salt, ld = in_features): LoRA dropout, see matmul.wgsl.
    prologue (gemv on hardware GPUs): the op that made X, applied as X is read, instead of its own dispatch:
    ("swiglu",): X is the fused [gate | up] (M, 2K), read as silu(gate)*up; ("norm", w buf, eps): X read as
    RMSNorm(X)*w."""
    if prologue is not None:
        if not (rt.tiled and mode == "gemv"):
            raise WebGPUError("matmul: a prologue needs gemv on a hardware GPU")
        if prologue[0] == "swiglu":
            lda = 2 * K if lda is None else lda
        elif prologue[0] != "norm":
            raise WebGPUError(f"matmul: unknown prologue {prologue[0]!r}")
    if mode in ("forward", "gemv") and w.kind != "f32" and K % 4:
        raise WebGPUError(f"matmul[{w.kind}]: K={K} must be a multiple of 4")
    if mode == "backward_dw" and w.kind != "f32":
        raise WebGPUError("matmul backward_dw needs a dense f32 right operand")
    bufs, params = _mm_args(x, w, c, M, N, K, mode, a_off, lda, c_off, ldc, w_row0, bias, lora, res, beta, alpha,
                            drop)
    defines = _with_prologue(w.define, prologue, bufs, params)
    if rt.tiled and M >= 64 and N <= 16 and mode in ("forward", "backward_dx") \
            and os.environ.get("LORALAB_WGPU_SKINNY", "1") == "1":  # LoRA products: lanes split K instead
        rows = skinny_rows(M)
        return rt.op("matmul.wgsl", mode + "_skinny", grid1d(-(-M // rows), 1), bufs, params, defines,
                     {"SKR": rows})
    if rt.tiled and M >= 64 and mode in ("forward", "backward_dx"):
        tm, tn = mm_tile(rt, N)  # workgroup-memory tiles: a win on hardware GPUs, a loss on lavapipe
        if tm:
            defines = dict(defines, MMT=1, BM=16 * tm, BN=16 * tn, TM8=int(tm == 8), TN8=int(tn == 8))
            return rt.op("matmul.wgsl", mode + "_mmt", (-(-N // (16 * tn)), -(-M // (16 * tm))), bufs, params,
                         defines)
        mode += "_tiled"
    if rt.tiled and mode == "gemv":
        mode = "gemv_lanes" if N <= 64 and os.environ.get("LORALAB_WGPU_GEMV_LANES", "1") == "1" else "gemv_wg"
    if mode == "gemv":
        grid = grid1d(-(-N // 4), 64)
    elif mode == "gemv_lanes":
        grid = grid1d(N, 1)
    elif mode == "gemv_wg":
        grid = grid1d(-(-N // 8), 1)
    elif mode.endswith("_tiled"):
        grid = (-(-N // 64), -(-M // 64))
    else:
        grid = (-(-N // 32), -(-M // 32))
    return rt.op("matmul.wgsl", mode, grid, bufs, params, defines)


def skinny_rows(M: int) -> int:
    """Rows a 64-lane workgroup of the skinny products takes (the rest of its lanes split K): fewer for fewer
    rows, so the workgroups still fill the GPU and each lane's chain of loads stays short. Measured on an H200
    (a whole training step): 512 rows: 1 row 102 ms, 2 rows 105, 8 rows 130; 4096 rows: 4 rows 381 ms,
    8 rows 392. LORALAB_WGPU_SKINNY_ROWS forces 1, 2, 4 or 8."""
    env = os.environ.get("LORALAB_WGPU_SKINNY_ROWS")
    if env:
        if env not in ("1", "2", "4", "8"):
            raise WebGPUError(f"LORALAB_WGPU_SKINNY_ROWS={env!r}: expected 1, 2, 4 or 8")
        return int(env)
    return 1 if M < 1024 else 2 if M < 4096 else 4 if M < 16384 else 8


def _with_prologue(defines: dict, prologue, bufs: dict, params: dict) -> dict:
    if prologue is None:
        return defines
    if prologue[0] == "swiglu":
        return dict(defines, XSWIGLU=1)
    bufs["lnw"] = prologue[1]
    params["eps"] = float(prologue[2])
    return dict(defines, XNORM=1)


SPLIT_TILES = 256  # below this many 64x64 output tiles the tiled matmuls split K (an H200 has 132 SMs)
MAX_SPLITS = 4


def k_splits(rt, M: int, N: int, K: int, mode: str) -> int:
    """K slices for a forward / backward_dx matmul on the 64x64 tiled kernel: few tiles (a small batch)
    leave most of the GPU idle, each walking all of K (LORALAB_WGPU_SPLIT_K=0: never)."""
    if not (rt.tiled and M >= 64 and N > 16 and mode in ("forward", "backward_dx")) or mm_tile(rt, N)[0] \
            or os.environ.get("LORALAB_WGPU_SPLIT_K", "1") != "1":
        return 1
    tiles = -(-N // 64) * -(-M // 64)
    env = os.environ.get("LORALAB_WGPU_SPLIT_SLICE", "128")  # the shortest K slice worth a workgroup
    if not env.isdigit() or int(env) < 16:
        raise WebGPUError(f"LORALAB_WGPU_SPLIT_SLICE={env!r}: expected a whole number of at least 16")
    return max(1, min(MAX_SPLITS, -(-SPLIT_TILES // tiles), K // int(env))) if tiles < SPLIT_TILES else 1


def split_scratch_floats(rows: int, widest: int) -> int:
    """Floats of scratch that any split of a (rows x <= widest) product fits: splits x tiles stays under
    2 x SPLIT_TILES, so at most 2 x SPLIT_TILES x 64 x 64 floats (8 MiB), however large the shape."""
    return min(MAX_SPLITS * rows * widest, 2 * SPLIT_TILES * 64 * 64)


def matmul_ops(rt: Runtime, x: Buf, w: GpuWeight, c: Buf, M: int, N: int, K: int, *, scratch: Buf | None = None,
               **kw) -> list:
    """matmul as a list of ops: [matmul], or with `scratch` (>= splits*M*N floats) and few output tiles, the
    K-split tiled product into scratch and split_epilogue (the sum of the slices through the epilogue)."""
    mode = kw.get("mode", "forward")
    n = k_splits(rt, M, N, K, mode) if scratch is not None else 1
    while n > 1 and scratch is not None and scratch.n < n * M * N:
        n -= 1
    if n == 1 or kw.get("prologue") is not None:
        return [matmul(rt, x, w, c, M, N, K, **kw)]
    if w.kind != "f32" and K % 4:
        raise WebGPUError(f"matmul[{w.kind}]: K={K} must be a multiple of 4")
    bufs, params = _mm_args(x, w, scratch, M, N, K, mode, kw.get("a_off", 0), kw.get("lda"), kw.get("c_off", 0),
                            kw.get("ldc"), kw.get("w_row0", 0), kw.get("bias"), kw.get("lora"), kw.get("res"),
                            kw.get("beta", 0.0), kw.get("alpha", 1.0), kw.get("drop"))
    part = rt.op("matmul.wgsl", mode + "_tiled", (-(-N // 64), -(-M // 64), n), bufs, params, w.define)
    ep_bufs = dict(bufs, x=scratch, c=c)
    ep = rt.op("matmul.wgsl", "split_epilogue", grid1d(M * N, 64), ep_bufs, params, w.define, {"KSPLITS": n})
    return [part, ep]


MMT_DEFAULT = "tiled"  # measured best on an H100 over the training shapes (perf_log.md)


def mm_tile(rt, N) -> tuple:
    """(TM, TN) of the register-blocked tiled matmul (forward_mmt / backward_dx_mmt): TM x TN outputs an
    invocation, a (16*TM) x (16*TN) tile a workgroup. LORALAB_WGPU_MMT=TMxTN picks another (4 or 8 each),
    `tiled` the older 64x64 kernel (forward_tiled), which also takes the skinny LoRA products (N < 64)."""
    env = os.environ.get("LORALAB_WGPU_MMT", MMT_DEFAULT)
    if env == "tiled" or N < 64:
        return 0, 0
    try:
        tm, tn = (int(x) for x in env.split("x"))
    except ValueError:
        raise WebGPUError(f"LORALAB_WGPU_MMT={env!r}: expected TMxTN such as 8x4, or 'tiled'") from None
    if tm not in (4, 8) or tn not in (4, 8):
        raise WebGPUError(f"LORALAB_WGPU_MMT={env!r}: TM and TN must be 4 or 8")
    if 16 * 16 * (tm + tn) * 4 + 8192 > rt.limits.get("max-compute-workgroup-storage-size", 16384):
        return 0, 0
    return tm, tn


def matmul_dw(rt: Runtime, x: Buf, w: GpuWeight, c: Buf, M: int, N: int, K: int, *, alpha=1.0, beta=0.0,
              drop=None, scratch: Buf | None = None, splits: int | None = None) -> list:
    """C(M,N) = alpha*X(K,M)ᵀ·W(K,N) + beta*C — with the K reduction split over `splits` slices on hardware
    GPUs (K = batch*seq is long, M*N = r*features small: one slice would leave most of the GPU idle)."""
    if splits is None:  # slices of >= 64 rows: M*N = r*features outputs alone are a few hundred workgroups
        splits = min(64, K // 64) if rt.tiled and scratch is not None else 1
    if splits <= 1 or scratch is None or scratch.n < splits * M * N:
        return [matmul(rt, x, w, c, M, N, K, mode="backward_dw", alpha=alpha, beta=beta, drop=drop)]
    bufs, params = _mm_args(x, w, scratch, M, N, K, "backward_dw", 0, None, 0, None, 0, None, None, None, 0.0,
                            1.0, drop)
    wx = 8 if min(M, N) > 16 else (2 if N <= 8 else 4 if N <= 16 else 32 if M <= 8 else 16)
    wy = 64 // wx
    split = rt.op("matmul.wgsl", "backward_dw_split", (-(-N // (4 * wx)), -(-M // (4 * wy)), splits), bufs, params,
                  w.define, {"WX": wx, "WY": wy})
    red_p = dict(params, K=splits, alpha=float(alpha), beta=float(beta))
    red = rt.op("matmul.wgsl", "split_reduce", grid1d(M * N, 64), dict(x=scratch, c=c), red_p, w.define)
    return [split, red]


def drop_threshold(p: float) -> int:
    return min(int(round(p * 2.0 ** 32)), 2 ** 32 - 1)


def _pcg(v):
    v = np.asarray(v, np.uint64) & 0xFFFFFFFF
    s = (v * 747796405 + 2891336453) & 0xFFFFFFFF
    w = (((s >> ((s >> 28) + 4)) ^ s) * 277803737) & 0xFFFFFFFF
    return ((w >> 22) ^ w) & 0xFFFFFFFF


def dropout_keep(shape, seed, step, micro, salt, p) -> np.ndarray:
    """The keep mask (bool, shape (rows, cols)) that matmul.wgsl draws for one LoRA input — for tests."""
    rows, cols = shape
    key = _pcg(np.uint64(seed) ^ _pcg(np.uint64(step) ^ _pcg(np.uint64(micro) ^ _pcg(np.uint64(salt)))))
    idx = (np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(cols) + np.arange(cols, dtype=np.uint64)[None]) & 0xFFFFFFFF
    return _pcg(key ^ idx) >= drop_threshold(p)


# --- the other ops -------------------------------------------------------------------------------------

def embed(rt, tok: Buf, w: GpuWeight, out: Buf, n_tok: int) -> Op:
    D = w.cols
    return rt.op("embed.wgsl", "forward", grid1d(n_tok * -(-D // 4), 64), dict(tok=tok, wq=w.wq, ws=w.ws, out=out),
                 dict(n_tok=n_tok, D=D, w_ld=w.w_ld, vocab=w.rows), w.define)


def rmsnorm(rt, x, w, y, rstd, N, D, eps) -> Op:
    """One invocation per row (lavapipe), one workgroup per row on hardware GPUs (forward_wg)."""
    entry, grid = ("forward_wg", grid1d(N, 1)) if rt.tiled else ("forward", grid1d(N, 64))
    return rt.op("rmsnorm.wgsl", entry, grid, dict(x=x, w=w, y=y, rstd=rstd), dict(N=N, D=D, eps=float(eps), beta=0.0))


def rmsnorm_backward(rt, dy, x, w, rstd, dx, N, D, beta=0.0) -> Op:
    """dx = beta*dx + d(rmsnorm)/dx · dy."""
    entry, grid = ("backward_wg", grid1d(N, 1)) if rt.tiled else ("backward", grid1d(N, 64))
    return rt.op("rmsnorm.wgsl", entry, grid, dict(x=x, w=w, rstd=rstd, dy=dy, dx=dx),
                 dict(N=N, D=D, eps=0.0, beta=float(beta)))


def rope(rt, x, pos, table, N, nh, hd, max_pos, backward=False) -> Op:
    """In place on x (N, nh, hd); table (max_pos, hd/2, 2) [cos, sin]; pos (N,) i32."""
    return rt.op("rope.wgsl", "backward" if backward else "forward", grid1d(N * nh * hd // 2, 64),
                 dict(pos=pos, tab=table, x=x), dict(N=N, nh=nh, hd=hd, max_pos=max_pos, nkv=0, T=0, TK=0, pad=0))


def rope_decode_qkv(rt, qkv, q, kc, vc, pos, table, dyn, B, T, TK, H, KV, hd, max_pos) -> Op:
    """From the fused projection qkv (N, (H+2KV)*hd): roped q into q (N, H*hd); roped k and v appended to the
    caches (B, TK, KV*hd) at position dyn[0]."""
    N = B * T
    n = N * (H + KV) * hd // 2 + N * KV * hd
    return rt.op("rope.wgsl", "decode_qkv", grid1d(n, 64), dict(pos=pos, tab=table, x=q, kin=qkv, kc=kc, vc=vc,
                                                                   dyn=dyn),
                 dict(N=N, nh=H, hd=hd, max_pos=max_pos, nkv=KV, T=T, TK=TK, pad=0))


def _attn_params(B, T, TK, H, KV, hd, has_seg):
    return dict(B=B, T=T, TK=TK, H=H, KV=KV, has_seg=int(has_seg), scale=float(1.0 / np.sqrt(hd)), pad=0)


DECODE_SPLITS = 16  # key splits of decode attention (decode_part); 16 measured ~3% faster than 32 on an H200


def segment_ranges(rt, seg, B, T, hd) -> list:
    """[op] writing each block's [lo, hi] segment id range after seg's (B, T) ids (segments.wgsl), for blocked
    attention to skip the block pairs of packed rows that see nothing of each other (attention(..., ranges=True));
    [] where attention is not blocked. seg holds N + 2 * B * ceil(T / 16) ints (graph.Acts)."""
    bq = attention_block(rt, hd)
    if not bq:
        return []
    nb = -(-T // bq)
    if seg.n < B * T + 2 * B * nb:
        raise WebGPUError(f"segment_ranges: seg holds {seg.n} ints, needs {B * T + 2 * B * nb}")
    return [rt.op("segments.wgsl", "ranges", grid1d(B * nb, 64), dict(seg=seg), dict(B=B, T=T, BQ=bq, NB=nb))]


def attention_block(rt, hd) -> int:
    """Queries (and keys) of a block of the blocked attention; 0 where attention is not blocked (lavapipe)."""
    return _flash_defines(rt, hd)["BQ"] if use_flash(rt, hd) else 0


def _has_seg(rt, seg, ranges, hd) -> int:
    """The kernels' has_seg: 0 no segments, 1 ids, 2 ids and block ranges (blocked attention skips block pairs)."""
    return 0 if seg is None else 2 if ranges and use_flash(rt, hd) else 1


def attention(rt, q, k, v, out, lse, dyn, B, T, TK, H, KV, hd, seg=None, split=None, ranges=False):
    """out (B,T,H,hd), lse (B,H,T) from q (B,T,H,hd) and k/v (B,TK,KV,hd); queries start at position dyn[0].
    Decoding on hardware GPUs (few queries per row) with split = (pml, pacc, S) scratch: the keys split over S
    workgroups per query, then merged (decode_part + decode_merge: a list of two ops); without it, or with
    LORALAB_DECODE_ATTENTION=lanes, forward_split (the keys over the lanes of one workgroup)."""
    if rt.tiled and T <= 4 and split is not None and os.environ.get("LORALAB_DECODE_ATTENTION") != "lanes" and \
            hd <= rt.limits.get("max-compute-invocations-per-workgroup", 256):
        pml, pacc, S = split
        rows = B * H * T
        bufs = dict(q=q, k=k, v=v, seg=seg, dyn=dyn, out=out, lse=lse, pml=pml, pacc=pacc)
        prm = _attn_params(B, T, TK, H, KV, hd, seg is not None)
        return [rt.op("attention.wgsl", "decode_part", (S,) + grid1d(rows, 1), bufs, prm, {"HD": hd}),
                rt.op("attention.wgsl", "decode_merge", grid1d(rows, 1), bufs, prm, {"HD": hd},
                      {"SPLITS": S})]
    if rt.tiled and T <= 4:
        wg_bytes = rt.limits.get("max-compute-workgroup-storage-size", 16384)
        lanes = 32
        while lanes > 4 and lanes * (hd + 2) * 4 > wg_bytes:
            lanes //= 2
        return rt.op("attention.wgsl", "forward_split", grid1d(B * H * T, 1),
                     dict(q=q, k=k, v=v, seg=seg, dyn=dyn, out=out, lse=lse),
                     _attn_params(B, T, TK, H, KV, hd, seg is not None), {"HD": hd}, {"LANES": lanes})
    if use_flash(rt, hd):
        fd = _flash_defines(rt, hd)
        return rt.op("attention_flash.wgsl", "forward", (-(-T // fd["BQ"]), H, B),
                     dict(q=q, k=k, v=v, seg=seg, dyn=dyn, out=out, lse=lse),
                     _attn_params(B, T, TK, H, KV, hd, _has_seg(rt, seg, ranges, hd)), fd)
    return rt.op("attention.wgsl", "forward", grid1d(B * H * T, 64),
                 dict(q=q, k=k, v=v, seg=seg, dyn=dyn, out=out, lse=lse),
                 _attn_params(B, T, TK, H, KV, hd, seg is not None), {"HD": hd})


def _flash_bytes(bq, hd):
    """attention_flash.wgsl's workgroup memory: 4 row tiles, 4 row vectors, and 2 score tiles (backward) or
    one score tile and 2 x 256 partials (forward), whichever is larger."""
    sp = bq * (bq + 1) * 4
    return 4 * bq * (hd // 4 + 1) * 16 + 4 * bq * 4 + max(2 * sp, sp + 2048)


def _flash_defines(rt, hd):
    """Blocks of 32 queries x 32 keys where workgroup memory holds them (hd <= 64 on a 48 KiB limit), else 16."""
    lim = rt.limits.get("max-compute-workgroup-storage-size", 16384)
    bq = 32 if _flash_bytes(32, hd) <= lim else 16
    ndv = -(-(hd // 4) // (256 // bq))  # vec4 accumulators per invocation: 1 or 2 (hd <= 128)
    return {"HD": hd, "BQ": bq, "NDV": ndv, "NDV2": int(ndv == 2), "TILE": bq * (hd // 4 + 1), "STILE": bq * (bq + 1)}


def use_flash(rt, hd) -> bool:
    """Blocked attention (attention_flash.wgsl) on hardware GPUs; one invocation per query on lavapipe, whose
    barriers are slow. LORALAB_WGPU_ATTN=flash|simple forces either (where the head size fits)."""
    env = os.environ.get("LORALAB_WGPU_ATTN")
    want = rt.tiled if env is None else env == "flash"
    return (want and hd % 4 == 0 and hd <= 128
            and rt.limits.get("max-compute-workgroup-storage-size", 16384) >= _flash_bytes(16, hd))


def attention_backward(rt, dout, q, k, v, out, lse, delta, dq, dk, dv, dyn, B, T, H, KV, hd, seg=None,
                       ranges=False) -> list:
    p = _attn_params(B, T, T, H, KV, hd, _has_seg(rt, seg, ranges, hd))
    common = dict(q=q, k=k, v=v, seg=seg, dyn=dyn, out=out, lse=lse, dout=dout, delta=delta)
    if use_flash(rt, hd):
        fd = _flash_defines(rt, hd)
        nb = -(-T // fd["BQ"])
        return [rt.op("attention_flash.wgsl", "backward_dq", (nb, H, B), dict(common, dq=dq), p, fd),
                rt.op("attention_flash.wgsl", "backward_dkv", (nb, KV, B), dict(common, dk=dk, dv=dv), p, fd)]
    return [rt.op("attention.wgsl", "backward_dq", grid1d(B * H * T, 64), dict(common, dq=dq), p, {"HD": hd}),
            rt.op("attention.wgsl", "backward_dkv", grid1d(B * KV * T, 64), dict(common, dk=dk, dv=dv), p,
                  {"HD": hd})]


def kv_store(rt, knew, vnew, kc, vc, dyn, B, T, TK, KV, hd) -> Op:
    return rt.op("attention.wgsl", "kv_store", grid1d(B * T * KV * hd, 64),
                 dict(knew=knew, vnew=vnew, kc=kc, vc=vc, dyn=dyn), _attn_params(B, T, TK, KV, KV, hd, False),
                 {"HD": hd})


def swiglu(rt, g, u, act, n) -> Op:
    return rt.op("swiglu.wgsl", "forward", grid1d(n, 64), dict(g=g, u=u, act=act), dict(n=n, F=0))


def swiglu_fused(rt, gu, act, N, F) -> Op:
    """act (N, F) from the fused gate/up projection gu (N, 2F) = [gate | up]."""
    return rt.op("swiglu.wgsl", "forward_fused", grid1d(N * F, 64), dict(g=gu, act=act), dict(n=N * F, F=F))


def swiglu_backward(rt, dact, g, u, dg, du, n) -> Op:
    return rt.op("swiglu.wgsl", "backward", grid1d(n, 64), dict(g=g, u=u, dact=dact, dg=dg, du=du),
                 dict(n=n, F=0))


def ce_chunk_forward(rt, z, labels, st, N, C, c0, first) -> Op:
    return rt.op("cross_entropy.wgsl", "chunk_forward", grid1d(N, 64), dict(z=z, labels=labels, st=st),
                 dict(N=N, C=C, c0=c0, first=int(first), gscale=0.0, row0=0))


def ce_finish(rt, labels, st, loss, N) -> list:
    p = dict(N=N, C=0, c0=0, first=0, gscale=0.0, row0=0)
    return [rt.op("cross_entropy.wgsl", "finish", grid1d(N, 64), dict(labels=labels, st=st), p),
            rt.op("cross_entropy.wgsl", "loss_sum", (1,), dict(labels=labels, st=st, loss=loss), p)]


def ce_chunk_backward(rt, z, labels, st, N, C, c0, gscale) -> Op:
    return rt.op("cross_entropy.wgsl", "chunk_backward", grid1d(N * C, 64), dict(z=z, labels=labels, st=st),
                 dict(N=N, C=C, c0=c0, first=0, gscale=float(gscale), row0=0))


def ce_rows_fused(rt, z, labels, st, rows, V, row0, gscale) -> Op:
    """z (rows, V) logits of rows row0.. -> their gradient (softmax - onehot)*gscale; st rows get [max, sum, target, lse]."""
    return rt.op("cross_entropy.wgsl", "rows_fused", (rows,), dict(z=z, labels=labels, st=st),
                 dict(N=rows, C=V, c0=0, first=0, gscale=float(gscale), row0=row0))


def adam_params(n, betas, eps, max_norm=0.0, nparts=0, nblk=0) -> dict:
    """The optimizer's fixed parameters (uniform); what changes per step goes in hyp (adam_hyp)."""
    b1, b2 = float(betas[0]), float(betas[1])
    p = dict(n=n, max_norm=float(max_norm or 0.0), b1=b1, c1=1.0 - b1, b2=b2, c2=1.0 - b2, eps=float(eps))
    if nblk:
        p["nblk"] = nblk
    else:
        p["nparts"] = nparts
    return p


def adam_hyp(lr, weight_decay, betas, step, inv_n) -> np.ndarray:
    """hyp of step `step` (1-based): [inv_n, 1 - lr·wd, lr / (1 - b1^t), sqrt(1 - b2^t)] (torch's AdamW)."""
    b1, b2 = float(betas[0]), float(betas[1])
    return np.array([inv_n, 1.0 - lr * weight_decay, lr / (1.0 - b1 ** step), np.sqrt(1.0 - b2 ** step)], np.float32)


def grad_norm(rt, grad, parts, gstat, hyp, n, nparts, max_norm) -> list:
    """gstat = [||grad * inv_n||, inv_n * clip coefficient] (torch clip_grad_norm_ semantics)."""
    p = adam_params(n, (0.9, 0.999), 1e-8, max_norm, nparts)
    return [rt.op("adamw.wgsl", "sumsq", (nparts,), dict(grad=grad, parts=parts), p),
            rt.op("adamw.wgsl", "clip", (1,), dict(parts=parts, gstat=gstat, hyp=hyp), p)]


def adamw(rt, prm, grad, m, v, gstat, hyp, n, betas, eps) -> Op:
    return rt.op("adamw.wgsl", "adamw", grid1d(n, 64), dict(prm=prm, grad=grad, m=m, v=v, gstat=gstat, hyp=hyp),
                 adam_params(n, betas, eps, nparts=0))


def adam8bit(rt, prm, grad, mq, vq, absmax, gstat, codes, hyp, n, betas, eps) -> Op:
    """Adam on 8-bit block-wise state (numpy_train's bitsandbytes scheme, blocks of 256)."""
    if n % 256:
        raise WebGPUError(f"adam8bit: parameter count {n} must be a multiple of 256 (pad the flat buffer)")
    nblk = n // 256
    return rt.op("adam8bit.wgsl", "step", grid1d(nblk, 64),
                 dict(prm=prm, grad=grad, mq=mq, vq=vq, absmax=absmax, gstat=gstat, codes=codes, hyp=hyp),
                 adam_params(n, betas, eps, nblk=nblk))


# --- sample.wgsl -------------------------------------------------------------------------------------

SAMPLING_WORDS = 8  # u32 words of a `samp` buffer


def sampling_words(seed: int, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The 8 u32 words of a `samp` buffer, counter 0: [seed, counter, temperature (f32 bits), top_k,
    top_p (f32 bits), 0, 0, 0]. Written by the host once per request; `advance` bumps the counter on the GPU.
    temperature 0: greedy; top_k 0: no top-k; top_p >= 1: no top-p (0: the maximum and its ties only)."""
    t, pp = float(temperature), float(1.0 if top_p is None else top_p)
    k = int(top_k or 0)
    if not (t >= 0.0 and np.isfinite(t)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 <= k <= 0xFFFFFFFF:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not pp >= 0.0:
        raise ValueError(f"top_p must be >= 0, got {top_p}")
    w = np.zeros(SAMPLING_WORDS, np.uint32)
    w[0] = int(seed) & 0xFFFFFFFF
    w[2] = np.float32(t).view(np.uint32)
    w[3] = k
    w[4] = np.float32(min(pp, 1.0)).view(np.uint32)
    return w


def sample(rt, logits, samp, ids, tok, dyn, pos, B, V, ld, ring, advance=1) -> list[Op]:
    """Token choice on the GPU, two dispatches to record after the logits:
    [sample: row b of logits (B, ld) (first V entries) -> ids[(counter % ring) * B + b] and tok[b],
     advance: samp[1] (counter) += 1, dyn[0] += advance, pos[b] = dyn[0] for b < B].
    samp: 8 u32 (sampling_words; the host rewrites it per request, the recorded ops stay valid); ids: i32
    (ring, B); tok, pos: i32 (B,); dyn: u32 [kv position, ...]. pos None: no positions written; dyn None: the
    increment lands in the runtime's dummy buffer. See shaders/sample.wgsl for the semantics."""
    if ring < 1 or B < 1 or V < 1 or ld < V:
        raise WebGPUError(f"sample: need ring >= 1, B >= 1, 1 <= V <= ld (got ring={ring}, B={B}, V={V}, ld={ld})")
    return [rt.op("sample.wgsl", "sample", (B,), dict(logits=logits, samp=samp, ids=ids, tok=tok),
                  dict(V=V, ld=ld, ring=ring, advance=advance)),
            rt.op("sample.wgsl", "advance", (1,), dict(samp=samp, dyn=dyn, pos=pos),
                  dict(V=B if pos is not None else 0, ld=ld, ring=ring, advance=advance))]
