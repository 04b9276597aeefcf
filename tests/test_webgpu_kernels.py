"""Every WGSL kernel against loralabd.engine.reference (numpy f32), on lavapipe in CI.

Tolerance, unless a test says otherwise: max|gpu - ref| <= 1e-5 * max|ref| (f32 arithmetic in a different
summation order). Shapes include sizes that are not multiples of the matmul tile (32x32 per workgroup,
4x4 per invocation) nor of the workgroup size (64).
"""

from __future__ import annotations

import numpy as np
import pytest

from loralabd.engine import reference as R
from loralabd.models.quant import dense, quantize_q4_1, quantize_q8_0

wgpu_rt = pytest.importorskip("loralabd.engine.webgpu.runtime")
K = pytest.importorskip("loralabd.engine.webgpu.kernels")

pytestmark = pytest.mark.gpu
TOL = 1e-5


@pytest.fixture(scope="module")
def rt():
    if not wgpu_rt.available():
        pytest.skip("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
    return wgpu_rt.get_runtime()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def up(rt, a, name="t"):
    a = np.ascontiguousarray(a)
    return rt.buffer(a.nbytes, name, a)


def out(rt, n, name="out"):
    return rt.buffer(4 * n, name, np.zeros(n, np.float32))


def get(rt, buf, shape, dtype=np.float32):
    return rt.read(buf, dtype)[: int(np.prod(shape))].reshape(shape)


QUANT = {"q4_1": quantize_q4_1, "q8_0": quantize_q8_0, "f32": dense, "f16": lambda w: dense(w, np.float16)}


# --- runtime ------------------------------------------------------------------------------------------

def test_adapter_report_and_caches(rt):
    info = rt.info()
    assert info["name"] and info["backend"] and "max-storage-buffer-binding-size" in info["limits"]
    assert set(info["features_used"]) <= {"shader-f16", "subgroup", "timestamp-query"}
    assert wgpu_rt.get_runtime() is rt  # one device per process
    x = out(rt, 8)
    o1 = K.swiglu(rt, x, x, out(rt, 8), 8)
    o2 = K.swiglu(rt, x, x, out(rt, 8), 8)
    assert o1.pipeline is o2.pipeline  # pipeline cache
    if "timestamp-query" in rt.features:
        prof = rt.profile([o1, o2])
        assert set(prof) == {"swiglu.wgsl:forward"} and prof["swiglu.wgsl:forward"] >= 0.0


def test_errors_name_the_kernel(rt):
    x = out(rt, 8)
    with pytest.raises(wgpu_rt.WebGPUError, match="swiglu.wgsl:forward.*missing"):
        rt.op("swiglu.wgsl", "forward", (1,), dict(g=x, u=x, act=out(rt, 8)), {})
    with pytest.raises(wgpu_rt.WebGPUError, match="swiglu.wgsl:forward.*grid"):
        rt.op("swiglu.wgsl", "forward", (70000,), dict(g=x, u=x, act=out(rt, 8)), {"n": 8})
    with pytest.raises(wgpu_rt.WebGPUError, match="nope.wgsl"):
        rt.op("nope.wgsl", "forward", (1,), {}, {})


# --- matmul with LoRA (forward, gemv, backward) ------------------------------------------------------

@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "f16", "f32"])
@pytest.mark.parametrize("M,N,Kd,r", [(37, 70, 96, 3), (5, 32, 160, 8)])
def test_lora_linear_forward(rt, kind, M, N, Kd, r):
    rng = np.random.default_rng(M + N)
    W = QUANT[kind](rng.standard_normal((N, Kd)).astype(np.float32))
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    A = rng.standard_normal((r, Kd)).astype(np.float32) * 0.1
    Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    b = rng.standard_normal(N).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    ref, xa_ref = R.lora_linear(x, W.dequantize(), b, A, Bm, 2.0)
    gw = K.upload_weight(rt, W, "w")
    xb, Ab, Bb, bb, rb = up(rt, x), up(rt, A), up(rt, Bm), up(rt, b), up(rt, res)
    xa, y, yv = out(rt, M * r), out(rt, M * N), out(rt, M * N)
    ops = [K.matmul(rt, xb, K.dense_weight(Ab, r, Kd), xa, M, r, Kd),
           K.matmul(rt, xb, gw, y, M, N, Kd, bias=bb, lora=(xa, Bb, r, r, 1, 2.0), res=rb),
           K.matmul(rt, xb, gw, yv, M, N, Kd, mode="gemv", bias=bb, lora=(xa, Bb, r, r, 1, 2.0))]
    rt.run(ops)
    assert rel(get(rt, xa, (M, r)), xa_ref) <= TOL
    assert rel(get(rt, y, (M, N)), ref + res) <= TOL
    assert rel(get(rt, yv, (M, N)), ref) <= TOL


@pytest.mark.parametrize("kind", ["q4_1", "f32"])
@pytest.mark.parametrize("M,N,Kd,r", [(37, 70, 96, 3), (9, 36, 64, 8)])
def test_lora_linear_backward(rt, kind, M, N, Kd, r):
    """dX through the frozen (4-bit) W plus the LoRA path, dA and dB (accumulated, as in training)."""
    rng = np.random.default_rng(M * N)
    W = QUANT[kind](rng.standard_normal((N, Kd)).astype(np.float32))
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    A = rng.standard_normal((r, Kd)).astype(np.float32) * 0.1
    Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    dy = rng.standard_normal((M, N)).astype(np.float32)
    s = 1.5
    _, xa_ref = R.lora_linear(x, W.dequantize(), None, A, Bm, s)
    dx_ref, dA_ref, dB_ref = R.lora_linear_backward(dy, x, W.dequantize(), A, Bm, s, xa_ref)
    gw = K.upload_weight(rt, W, "w")
    xb, Ab, Bb, dyb, xab = up(rt, x), up(rt, A), up(rt, Bm), up(rt, dy), up(rt, xa_ref)
    dxa, dx = out(rt, M * r), out(rt, M * Kd)
    gA, gB = up(rt, np.ones((r, Kd), np.float32)), up(rt, np.ones((N, r), np.float32))  # accumulate onto 1
    rt.run([K.matmul(rt, dyb, K.dense_weight(xab, M, r), gB, N, r, M, mode="backward_dw", alpha=s, beta=1.0),
            K.matmul(rt, dyb, K.dense_weight(Bb, N, r), dxa, M, r, N, mode="backward_dx"),
            K.matmul(rt, dxa, K.dense_weight(xb, M, Kd), gA, r, Kd, M, mode="backward_dw", alpha=s, beta=1.0),
            K.matmul(rt, dyb, gw, dx, M, Kd, N, mode="backward_dx", lora=(dxa, Ab, r, 1, Kd, s))])
    assert rel(get(rt, dx, (M, Kd)), dx_ref) <= TOL
    assert rel(get(rt, gA, (r, Kd)) - 1.0, dA_ref) <= TOL
    assert rel(get(rt, gB, (N, r)) - 1.0, dB_ref) <= TOL


@pytest.mark.parametrize("tile", ["tiled", "4x4", "8x4", "8x8"])
@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "f32"])
@pytest.mark.parametrize("M,N,Kd", [(100, 70, 96), (65, 36, 160), (64, 20, 44), (290, 140, 224)])
def test_tiled_and_workgroup_variants(rt, monkeypatch, tile, kind, M, N, Kd):
    """The workgroup-memory variants used on hardware GPUs (forward/backward_dx as `*_tiled` or the
    register-blocked `*_mmt` with TMxTN outputs an invocation, gemv_wg; gemv_lanes for N <= 64)."""
    if kind != "f32" and Kd % 32:
        pytest.skip("quantized rows are whole blocks of 32")
    monkeypatch.setattr(rt, "tiled", True)
    monkeypatch.setenv("LORALAB_WGPU_MMT", tile)
    rng = np.random.default_rng(M + Kd)
    W = QUANT[kind](rng.standard_normal((N, Kd)).astype(np.float32))
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    r = 3
    A = rng.standard_normal((r, Kd)).astype(np.float32) * 0.1
    Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    xa_ref = x @ A.T
    gw = K.upload_weight(rt, W, "w")
    xb, dyb, xab, Ab, Bb = up(rt, x), up(rt, dy), up(rt, xa_ref), up(rt, A), up(rt, Bm)
    y, dx, yv = out(rt, M * N), out(rt, M * Kd), out(rt, 2 * N)
    ops = [K.matmul(rt, xb, gw, y, M, N, Kd, lora=(xab, Bb, r, r, 1, 0.5)),
           K.matmul(rt, dyb, gw, dx, M, Kd, N, mode="backward_dx"),
           K.matmul(rt, xb, gw, yv, 2, N, Kd, mode="gemv", a_off=5 * Kd)]
    def sfx(n):  # skinny products (n < 64 outputs) keep the 64x64 kernel
        return "_tiled" if tile == "tiled" or n < 64 else "_mmt"
    assert [o.kernel.split(":")[1].split("[")[0] for o in ops] == ["forward" + sfx(N), "backward_dx" + sfx(Kd),
                                                                   "gemv_lanes" if N <= 64 else "gemv_wg"]
    rt.run(ops)
    Wd = W.dequantize()
    assert rel(get(rt, y, (M, N)), x @ Wd.T + 0.5 * xa_ref @ Bm.T) <= TOL
    assert rel(get(rt, dx, (M, Kd)), dy @ Wd) <= TOL
    assert rel(get(rt, yv, (2, N)), x[5:7] @ Wd.T) <= TOL


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "f32"])
@pytest.mark.parametrize("M,N,Kd", [(100, 96, 608), (64, 32, 1056), (130, 224, 2048), (70, 40, 600)])
def test_split_k_tiled_products(rt, monkeypatch, kind, M, N, Kd):
    """Few output tiles on hardware GPUs: forward_tiled / backward_dx_tiled over K slices into a scratch
    buffer, then split_epilogue (sum, then bias, LoRA, residual, beta); K not a multiple of the slices."""
    if kind != "f32" and Kd % 32:
        pytest.skip("quantized rows are whole blocks of 32")
    monkeypatch.setattr(rt, "tiled", True)
    monkeypatch.setenv("LORALAB_WGPU_MMT", "tiled")
    rng = np.random.default_rng(M + N + Kd)
    W = QUANT[kind](rng.standard_normal((N, Kd)).astype(np.float32))
    Wt = QUANT[kind](rng.standard_normal((Kd, N)).astype(np.float32))  # backward_dx: (K rows, N columns)
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    r = 3
    xa = rng.standard_normal((M, r)).astype(np.float32)
    Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    b = rng.standard_normal(N).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    scratch = out(rt, K.split_scratch_floats(M, N))
    y, dx = out(rt, (M + 2) * N), up(rt, c0)  # y: the output starts 2 rows in (c_off), as the LM head's dX does
    xb, xab, Bb = up(rt, x), up(rt, xa), up(rt, Bm)
    fwd = K.matmul_ops(rt, xb, K.upload_weight(rt, W, "w"), y, M, N, Kd, bias=up(rt, b), lora=(xab, Bb, r, r, 1, 0.5),
                       res=up(rt, np.concatenate([np.zeros(2 * N, np.float32), res.ravel()])), alpha=0.5, c_off=2 * N,
                       scratch=scratch)  # the residual is read at the output's index
    bwd = K.matmul_ops(rt, xb, K.upload_weight(rt, Wt, "wt"), dx, M, N, Kd, mode="backward_dx", beta=1.0,
                       lora=(xab, Bb, r, r, 1, 0.5), scratch=scratch)
    assert [o.kernel.split(":")[1].split("[")[0] for o in fwd + bwd] == \
        ["forward_tiled", "split_epilogue", "backward_dx_tiled", "split_epilogue"]
    assert fwd[0].grid[2] == K.k_splits(rt, M, N, Kd, "forward") > 1
    rt.run(fwd + bwd)
    lora = 0.5 * xa @ Bm.T
    assert rel(rt.read(y)[2 * N:(M + 2) * N].reshape(M, N), 0.5 * x @ W.dequantize().T + b + lora + res) <= TOL
    assert rel(get(rt, dx, (M, N)), x @ Wt.dequantize() + lora + c0) <= TOL


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "f32"])
@pytest.mark.parametrize("pro", ["norm", "swiglu"])
@pytest.mark.parametrize("M,N,Kd", [(1, 70, 96), (2, 45, 288), (1, 20, 1056)])
def test_gemv_prologues(rt, monkeypatch, kind, pro, M, N, Kd):
    """Decode on hardware GPUs reads X through the op that made it (RMSNorm, or SwiGLU of the fused
    [gate | up]) in gemv_wg (N > 64) and gemv_lanes (the LoRA A: N <= 64) instead of dispatching that op;
    K not a multiple of the 64 lanes nor of 256."""
    if kind != "f32" and Kd % 32:
        pytest.skip("quantized rows are whole blocks of 32")
    monkeypatch.setattr(rt, "tiled", True)
    rng = np.random.default_rng(N * Kd)
    W = QUANT[kind](rng.standard_normal((N, Kd)).astype(np.float32))
    r = 8
    A = rng.standard_normal((r, Kd)).astype(np.float32) * 0.1
    Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    if pro == "norm":
        x = rng.standard_normal((M, Kd)).astype(np.float32) * 3
        lnw = (1 + 0.1 * rng.standard_normal(Kd)).astype(np.float32)
        xin, prologue = R.rmsnorm(x, lnw, 1e-5)[0], ("norm", up(rt, lnw), 1e-5)
    else:
        x = rng.standard_normal((M, 2 * Kd)).astype(np.float32)  # [gate | up]
        xin, prologue = R.swiglu(x[:, :Kd], x[:, Kd:]), ("swiglu",)
    gw, xb, Ab, Bb = K.upload_weight(rt, W, "w"), up(rt, x), up(rt, A), up(rt, Bm)
    y, xa, yl = out(rt, M * N), out(rt, M * r), out(rt, M * N)
    ops = [K.matmul(rt, xb, gw, y, M, N, Kd, mode="gemv", prologue=prologue),
           K.matmul(rt, xb, K.dense_weight(Ab, r, Kd), xa, M, r, Kd, mode="gemv", prologue=prologue)]
    xab = up(rt, (xin @ A.T).astype(np.float32))  # the LoRA epilogue with the prologue (fused q/k/v, gate/up)
    ops.append(K.matmul(rt, xb, gw, yl, M, N, Kd, mode="gemv", lora=(xab, Bb, r, r, 1, 0.5), prologue=prologue))
    assert [o.kernel.split(":")[1].split("[")[0] for o in ops] == \
        ["gemv_lanes" if N <= 64 else "gemv_wg", "gemv_lanes", "gemv_lanes" if N <= 64 else "gemv_wg"]
    rt.run(ops)
    Wd = W.dequantize()
    assert rel(get(rt, y, (M, N)), xin @ Wd.T) <= TOL
    assert rel(get(rt, xa, (M, r)), xin @ A.T) <= TOL
    assert rel(get(rt, yl, (M, N)), xin @ Wd.T + 0.5 * (xin @ A.T) @ Bm.T) <= TOL
    with pytest.raises(wgpu_rt.WebGPUError, match="prologue"):
        K.matmul(rt, xb, gw, y, M, N, Kd, mode="forward", prologue=prologue)


@pytest.mark.parametrize("kind", ["q4_1", "f32"])
@pytest.mark.parametrize("M,N,Kd", [(100, 8, 96), (64, 3, 160), (77, 13, 64), (130, 16, 44)])
@pytest.mark.parametrize("rows", ["1", "2", "8"])
def test_skinny_products(rt, monkeypatch, kind, M, N, Kd, rows):
    """N <= 16 outputs on hardware GPUs (the LoRA products x·Aᵀ, dY·B): forward_skinny / backward_dx_skinny,
    64 / rows lanes per row splitting K, with the LoRA / residual epilogue."""
    if kind != "f32" and Kd % 32:
        pytest.skip("quantized rows are whole blocks of 32")
    monkeypatch.setattr(rt, "tiled", True)
    monkeypatch.setenv("LORALAB_WGPU_SKINNY_ROWS", rows)
    rng = np.random.default_rng(M + N)
    W = QUANT[kind](rng.standard_normal((N, Kd)).astype(np.float32))
    Bd = rng.standard_normal((Kd, N)).astype(np.float32)  # dense (out, r) operand of backward_dx
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    r = 2
    xa = rng.standard_normal((M, r)).astype(np.float32)
    Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    y, dx = out(rt, M * N), out(rt, M * N)
    xb = up(rt, x)
    ops = [K.matmul(rt, xb, K.upload_weight(rt, W, "w"), y, M, N, Kd, lora=(up(rt, xa), up(rt, Bm), r, r, 1, 0.5),
                    res=up(rt, res)),
           K.matmul(rt, xb, K.upload_weight(rt, dense(Bd), "b"), dx, M, N, Kd, mode="backward_dx")]
    assert [o.kernel.split(":")[1].split("[")[0] for o in ops] == ["forward_skinny", "backward_dx_skinny"]
    rt.run(ops)
    assert rel(get(rt, y, (M, N)), x @ W.dequantize().T + 0.5 * xa @ Bm.T + res) <= TOL
    assert rel(get(rt, dx, (M, N)), x @ Bd) <= TOL


@pytest.mark.parametrize("M,N,Kd,splits", [(3, 70, 1000, 7), (8, 36, 2048, 64), (70, 8, 1000, 5), (40, 36, 600, 3)])
def test_split_k_weight_gradient(rt, M, N, Kd, splits):
    """dA / dB with the batch*seq reduction split in slices and summed (backward_dw_split + split_reduce)."""
    rng = np.random.default_rng(Kd)
    a = rng.standard_normal((Kd, M)).astype(np.float32)
    b = rng.standard_normal((Kd, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    c, scratch = up(rt, c0), out(rt, splits * M * N)
    ops = K.matmul_dw(rt, up(rt, a), K.dense_weight(up(rt, b), Kd, N), c, M, N, Kd, alpha=0.5, beta=1.0,
                      scratch=scratch, splits=splits)
    assert [o.kernel.split(":")[1].split("[")[0] for o in ops] == ["backward_dw_split", "split_reduce"]
    rt.run(ops)
    assert rel(get(rt, c, (M, N)) - c0, 0.5 * a.T @ b) <= 1e-4  # the difference loses a few bits to c0


# --- embedding and tied LM head (q8_0) ------------------------------------------------------------------

@pytest.mark.parametrize("kind,V,D", [("q8_0", 301, 64), ("f32", 50, 36), ("f16", 77, 20)])
def test_embedding_gather_and_tied_head(rt, kind, V, D):
    rng = np.random.default_rng(V)
    E = QUANT[kind](rng.standard_normal((V, D)).astype(np.float32))
    tok = rng.integers(0, V, 13).astype(np.int32)
    gw = K.upload_weight(rt, E, "emb")
    o = out(rt, 13 * D)
    logits = out(rt, 13 * V)
    rt.run([K.embed(rt, up(rt, tok), gw, o, 13)])
    x = get(rt, o, (13, D))
    np.testing.assert_array_equal(x, E.dequantize()[tok])  # dequantization is exact
    if D % 4 == 0:
        rt.run([K.matmul(rt, o, gw, logits, 13, V, D)])
        assert rel(get(rt, logits, (13, V)), x @ E.dequantize().T) <= TOL


# --- RMSNorm, RoPE, SwiGLU --------------------------------------------------------------------------------

@pytest.mark.parametrize("N,D", [(7, 64), (65, 100)])
@pytest.mark.parametrize("wg", [False, True])
def test_rmsnorm(rt, monkeypatch, N, D, wg):
    """wg: one workgroup per row (forward_wg / backward_wg, hardware GPUs)."""
    monkeypatch.setattr(rt, "tiled", wg)
    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, D)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    dy = rng.standard_normal((N, D)).astype(np.float32)
    prev = rng.standard_normal((N, D)).astype(np.float32)
    y_ref, rstd = R.rmsnorm(x, w, 1e-5)
    dx_ref = R.rmsnorm_backward(dy, x, w, rstd)
    xb, wb, y, rs, dx = up(rt, x), up(rt, w), out(rt, N * D), out(rt, N), up(rt, prev)
    ops = [K.rmsnorm(rt, xb, wb, y, rs, N, D, 1e-5), K.rmsnorm_backward(rt, up(rt, dy), xb, wb, rs, dx, N, D, beta=1.0)]
    assert all(op.kernel.endswith("_wg") == wg for op in ops)
    rt.run(ops)
    assert rel(get(rt, y, (N, D)), y_ref) <= TOL
    assert rel(get(rt, rs, (N,)), rstd[:, 0]) <= TOL
    assert rel(get(rt, dx, (N, D)) - prev, dx_ref) <= 1e-4  # the difference loses a few bits to prev


@pytest.mark.parametrize("B,T,nh,hd,maxp", [(2, 5, 3, 16, 64), (1, 33, 2, 64, 5000)])
def test_rope(rt, B, T, nh, hd, maxp):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((B, T, nh, hd)).astype(np.float32)
    pos = rng.integers(0, maxp, (B, T))
    cos, sin = R.rope_tables(pos, hd, 10000.0)
    ct, st = R.rope_tables(np.arange(maxp), hd, 10000.0)
    tab = np.stack([ct[:, : hd // 2], st[:, : hd // 2]], -1)
    xb, pb, tb = up(rt, x), up(rt, pos.astype(np.int32)), up(rt, tab)
    rt.run([K.rope(rt, xb, pb, tb, B * T, nh, hd, maxp)])
    assert rel(get(rt, xb, x.shape), R.rope(x, cos, sin)) <= TOL
    rt.write(xb, x)
    rt.run([K.rope(rt, xb, pb, tb, B * T, nh, hd, maxp, backward=True)])
    assert rel(get(rt, xb, x.shape), R.rope_backward(x, cos, sin)) <= TOL


@pytest.mark.parametrize("N,F", [(3, 40), (1, 1536)])
def test_swiglu_from_fused_gate_up(rt, N, F):
    rng = np.random.default_rng(F)
    g, u = (rng.standard_normal((N, F)).astype(np.float32) * 3 for _ in range(2))
    act = out(rt, N * F)
    rt.run([K.swiglu_fused(rt, up(rt, np.concatenate([g, u], axis=1)), act, N, F)])
    assert rel(get(rt, act, (N, F)), R.swiglu(g, u)) <= TOL


@pytest.mark.parametrize("n", [70, 1000])
def test_swiglu(rt, n):
    rng = np.random.default_rng(n)
    g, u, da = (rng.standard_normal(n).astype(np.float32) * 3 for _ in range(3))
    gb, ub = up(rt, g), up(rt, u)
    act, dg, du = out(rt, n), out(rt, n), out(rt, n)
    rt.run([K.swiglu(rt, gb, ub, act, n), K.swiglu_backward(rt, up(rt, da), gb, ub, dg, du, n)])
    dg_ref, du_ref = R.swiglu_backward(da, g, u)
    assert rel(get(rt, act, (n,)), R.swiglu(g, u)) <= TOL
    assert rel(get(rt, dg, (n,)), dg_ref) <= TOL
    assert rel(get(rt, du, (n,)), du_ref) <= TOL


# --- attention ----------------------------------------------------------------------------------------------

def segment_ids(rng, B, T, packed):
    """(B, T) segment ids: sorted (few segments), runs (packed rows: 0, 1, 2, ... then -1 padding), scattered
    (ids reused in separate runs and out of order: the block ranges must still skip only what sees nothing)."""
    if packed == "sorted":
        return np.sort(rng.integers(0, 3, (B, T)), axis=1)
    if packed == "runs":
        seg = np.full((B, T), -1)
        for b in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T - 5), 6, replace=False))
            seg[b, :T - 5] = np.searchsorted(cuts, np.arange(T - 5), side="right")
        return seg
    return rng.permutation(7)[np.repeat(rng.integers(0, 7, (B, -(-T // 9))), 9, axis=1)[:, :T]]


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("B,T,H,KV,hd,packed", [(2, 7, 4, 2, 16, None), (1, 33, 3, 1, 64, "sorted"),
                                                (2, 40, 4, 2, 32, "sorted"), (1, 35, 2, 1, 40, None),
                                                (2, 150, 2, 1, 16, "runs"), (1, 100, 2, 2, 64, "scattered")])
def test_attention_forward_backward(rt, monkeypatch, flash, B, T, H, KV, hd, packed):
    """flash: attention_flash.wgsl (blocks through workgroup memory, hardware GPUs: 32-query blocks where
    the workgroup memory holds them, else 16 — lavapipe's 32 KiB gives 32 at hd <= 40, 16 at hd 64; hd 40
    has two vec4 accumulators per invocation, as hd 64 on a 48 KiB GPU). With segments the flash kernels
    also read each block's id range (segment_ranges) and skip block pairs that see nothing of each other."""
    monkeypatch.setenv("LORALAB_WGPU_ATTN", "flash" if flash else "simple")
    rng = np.random.default_rng(T)
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    k = rng.standard_normal((B, T, KV, hd)).astype(np.float32)
    v = rng.standard_normal((B, T, KV, hd)).astype(np.float32)
    dout = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    seg = segment_ids(rng, B, T, packed) if packed else None
    mask = R.attention_mask(T, seg)
    o_ref, lse_ref = R.attention(q, k, v, mask)
    dq_ref, dk_ref, dv_ref = R.attention_backward(dout, q, k, v, mask, lse_ref)
    qb, kb, vb = up(rt, q), up(rt, k), up(rt, v)
    room = np.zeros(2 * B * -(-T // 16), np.int32)  # the block ranges' room after the ids, as graph.Acts has
    sb = up(rt, np.concatenate([seg.astype(np.int32).ravel(), room])) if packed else None
    dyn = up(rt, np.zeros(4, np.uint32))
    o, lse, delta = out(rt, q.size), out(rt, B * H * T), out(rt, B * H * T)
    dq, dk, dv = out(rt, q.size), out(rt, k.size), out(rt, v.size)
    ops = K.segment_ranges(rt, sb, B, T, hd) if packed else []
    assert len(ops) == (1 if packed and flash else 0)
    ops += [K.attention(rt, qb, kb, vb, o, lse, dyn, B, T, T, H, KV, hd, sb, ranges=True)]
    ops += K.attention_backward(rt, up(rt, dout), qb, kb, vb, o, lse, delta, dq, dk, dv, dyn, B, T, H, KV, hd, sb,
                                ranges=True)
    assert all(("attention_flash.wgsl" in op.kernel) == flash for op in ops if "segments.wgsl" not in op.kernel)
    rt.run(ops)
    assert rel(get(rt, o, q.shape), o_ref) <= TOL
    assert rel(get(rt, lse, lse_ref.shape), lse_ref) <= TOL
    for got, ref in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert rel(get(rt, got, ref.shape), ref) <= 1e-4  # sums of ~T products of differences


def test_flash_attention_skips_block_pairs_by_segment_ranges(rt, monkeypatch):
    """segment_ranges writes each block's [lo, hi] ids (against numpy), packed rows have block pairs whose ranges
    miss, and the kernels act on the ranges: ranges that claim every off-diagonal pair misses change the result."""
    monkeypatch.setenv("LORALAB_WGPU_ATTN", "flash")
    B, T, H, KV, hd = 2, 150, 2, 1, 16
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((B, T, n, hd)).astype(np.float32) for n in (H, KV, KV))
    seg = segment_ids(rng, B, T, "runs").astype(np.int32)
    bq = K.attention_block(rt, hd)
    nb = -(-T // bq)
    sb = up(rt, np.concatenate([seg.ravel(), np.zeros(2 * B * -(-T // 16), np.int32)]))
    rt.run(K.segment_ranges(rt, sb, B, T, hd))
    got = rt.read(sb).view(np.int32)[B * T:B * T + 2 * B * nb].reshape(B, nb, 2)
    pad = np.pad(seg, ((0, 0), (0, nb * bq - T)), mode="edge").reshape(B, nb, bq)
    assert np.array_equal(got, np.stack([pad.min(axis=2), pad.max(axis=2)], axis=2))
    lo, hi = got[..., 0], got[..., 1]
    assert (hi[:, None, :] < lo[:, :, None]).any()  # some (query block, earlier key block) pairs are skipped
    dyn = up(rt, np.zeros(4, np.uint32))
    ref, _ = R.attention(q, k, v, R.attention_mask(T, seg))

    def run(ranges_ids):
        s2 = up(rt, ranges_ids)
        o, lse = out(rt, q.size), out(rt, B * H * T)
        rt.run([K.attention(rt, up(rt, q), up(rt, k), up(rt, v), o, lse, dyn, B, T, T, H, KV, hd, s2, ranges=True)])
        return get(rt, o, q.shape)

    right = np.concatenate([seg.ravel(), got.ravel(), np.zeros(2 * B * (-(-T // 16) - nb), np.int32)])
    assert rel(run(right), ref) <= TOL
    wrong = right.copy()
    wrong[B * T:B * T + 2 * B * nb] = np.tile(np.repeat(np.arange(nb, dtype=np.int32), 2), B)  # block j: [j, j]
    assert rel(run(wrong), ref) > 1e-2


def kv_case(rng, B, start, T, H, KV, hd, Tmax, cached):
    """q (B, T, H, hd) and start + T keys / values, the first `cached` of them already in (B, Tmax) caches."""
    k_all = rng.standard_normal((B, start + T, KV, hd)).astype(np.float32)
    v_all = rng.standard_normal((B, start + T, KV, hd)).astype(np.float32)
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    kc0 = np.zeros((B, Tmax, KV, hd), np.float32)
    vc0 = np.zeros((B, Tmax, KV, hd), np.float32)
    kc0[:, :cached], vc0[:, :cached] = k_all[:, :cached], v_all[:, :cached]
    return q, k_all, v_all, kc0, vc0


@pytest.mark.parametrize("B,start,T,H,KV,hd", [(1, 0, 1, 4, 2, 16), (1, 77, 1, 9, 3, 64), (2, 150, 3, 4, 2, 16),
                                                 (1, 5, 2, 4, 4, 32)])
def test_split_key_decode_attention(rt, monkeypatch, B, start, T, H, KV, hd):
    """decode_part + decode_merge (hardware GPUs): the keys of each query over K.DECODE_SPLITS workgroups —
    most of them empty at short contexts, several tiles each at long ones — merged, against the reference."""
    monkeypatch.setattr(rt, "tiled", True)
    Tmax = 200
    q, k_all, v_all, kc0, vc0 = kv_case(np.random.default_rng(start + hd), B, start, T, H, KV, hd, Tmax, start + T)
    dyn = up(rt, np.array([start, 0, 0, 0], np.uint32))
    o, lse = out(rt, q.size), out(rt, B * H * T)
    rows, S = B * H * T, K.DECODE_SPLITS
    ops = K.attention(rt, up(rt, q), up(rt, kc0), up(rt, vc0), o, lse, dyn, B, T, Tmax, H, KV, hd,
                      split=(out(rt, rows * S * 2), out(rt, rows * S * hd), S))
    assert [op.kernel.split(":")[1].split("[")[0] for op in ops] == ["decode_part", "decode_merge"]
    rt.run(ops)
    ref, lse_ref = R.attention(q, k_all, v_all, R.attention_mask(T, None, t_offset=start, t_keys=start + T))
    assert rel(get(rt, o, q.shape), ref) <= TOL
    assert rel(get(rt, lse, lse_ref.shape), lse_ref) <= TOL


@pytest.mark.parametrize("split", ["no", "32 lanes", "4 lanes"])
@pytest.mark.parametrize("B,start,T,H,KV,hd", [(1, 9, 1, 4, 2, 16), (2, 5, 3, 3, 3, 32), (1, 90, 1, 2, 1, 64)])
def test_kv_cache_decode_attention(rt, monkeypatch, split, B, start, T, H, KV, hd):
    """kv_store appends at dyn[0]; attention of T new queries over start + T cached keys (split: the
    flash-decoding variant hardware GPUs use; its lane count is an `override` constant sized to the
    adapter's workgroup memory — a small limit gives 4 lanes)."""
    monkeypatch.setattr(rt, "tiled", split != "no")
    if split == "4 lanes":
        monkeypatch.setattr(rt, "limits", dict(rt.limits, **{"max-compute-workgroup-storage-size": 256}))
    Tmax = 100
    q, k_all, v_all, kc0, vc0 = kv_case(np.random.default_rng(start), B, start, T, H, KV, hd, Tmax, start)
    kc, vc = up(rt, kc0), up(rt, vc0)
    dyn = up(rt, np.array([start, 0, 0, 0], np.uint32))
    o, lse = out(rt, q.size), out(rt, B * H * T)
    ops = [K.kv_store(rt, up(rt, k_all[:, start:]), up(rt, v_all[:, start:]), kc, vc, dyn, B, T, Tmax, KV, hd),
           K.attention(rt, up(rt, q), kc, vc, o, lse, dyn, B, T, Tmax, H, KV, hd)]
    assert ("forward_split" in ops[-1].kernel) == (split != "no")
    assert ("LANES=4]" in ops[-1].kernel) == (split == "4 lanes")
    rt.run(ops)
    ref, lse_ref = R.attention(q, k_all, v_all, R.attention_mask(T, None, t_offset=start, t_keys=start + T))
    assert rel(get(rt, o, q.shape), ref) <= TOL
    assert rel(get(rt, lse, lse_ref.shape), lse_ref) <= TOL
    np.testing.assert_array_equal(get(rt, kc, kc0.shape)[:, : start + T], k_all)


@pytest.mark.parametrize("flash", [False, True])
def test_prefill_attention_over_cache(rt, monkeypatch, flash):
    """T > 4 new queries at positions start.. over a cache of TK > start + T slots (prefill after a prompt)."""
    monkeypatch.setenv("LORALAB_WGPU_ATTN", "flash" if flash else "simple")
    B, start, T, H, KV, hd, Tmax = 2, 21, 37, 4, 2, 32, 70
    rng = np.random.default_rng(7)
    k_all = rng.standard_normal((B, start + T, KV, hd)).astype(np.float32)
    v_all = rng.standard_normal((B, start + T, KV, hd)).astype(np.float32)
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    kc_np = np.zeros((B, Tmax, KV, hd), np.float32)
    vc_np = np.zeros((B, Tmax, KV, hd), np.float32)
    kc_np[:, :start + T], vc_np[:, :start + T] = k_all, v_all
    o, lse = out(rt, q.size), out(rt, B * H * T)
    op = K.attention(rt, up(rt, q), up(rt, kc_np), up(rt, vc_np), o, lse, up(rt, np.array([start, 0, 0, 0], np.uint32)),
                     B, T, Tmax, H, KV, hd)
    assert ("attention_flash.wgsl" in op.kernel) == flash
    rt.run([op])
    ref, lse_ref = R.attention(q, k_all, v_all, R.attention_mask(T, None, t_offset=start, t_keys=start + T))
    assert rel(get(rt, o, q.shape), ref) <= TOL
    assert rel(get(rt, lse, lse_ref.shape), lse_ref) <= TOL


@pytest.mark.parametrize("B,start,T,H,KV,hd", [(1, 9, 1, 4, 2, 16), (2, 5, 3, 3, 1, 32)])
def test_rope_decode_qkv_appends_to_cache(rt, B, start, T, H, KV, hd):
    rng = np.random.default_rng(T + hd)
    TK, maxp = 12, 64
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    k = rng.standard_normal((B, T, KV, hd)).astype(np.float32)
    v = rng.standard_normal((B, T, KV, hd)).astype(np.float32)
    pos = np.broadcast_to(np.arange(start, start + T), (B, T))
    cos, sin = R.rope_tables(pos, hd, 10000.0)
    ct, st = R.rope_tables(np.arange(maxp), hd, 10000.0)
    tab = up(rt, np.stack([ct[:, : hd // 2], st[:, : hd // 2]], -1))
    qkv = np.concatenate([q.reshape(B * T, -1), k.reshape(B * T, -1), v.reshape(B * T, -1)], axis=1)
    qb, kc, vc = out(rt, q.size), out(rt, B * TK * KV * hd), out(rt, B * TK * KV * hd)
    rt.run([K.rope_decode_qkv(rt, up(rt, qkv), qb, kc, vc, up(rt, pos.astype(np.int32)), tab,
                              up(rt, np.array([start, 0, 0, 0], np.uint32)), B, T, TK, H, KV, hd, maxp)])
    assert rel(get(rt, qb, q.shape), R.rope(q, cos, sin)) <= TOL
    kcache, vcache = get(rt, kc, (B, TK, KV, hd)), get(rt, vc, (B, TK, KV, hd))
    assert rel(kcache[:, start:start + T], R.rope(k, cos, sin)) <= TOL
    np.testing.assert_array_equal(vcache[:, start:start + T], v)
    assert not kcache[:, :start].any() and not vcache[:, start + T:].any()


# --- fused, vocabulary-chunked cross-entropy ------------------------------------------------------------------

@pytest.mark.parametrize("N,V,D,C", [(11, 300, 64, 128), (40, 1000, 32, 1000)])
def test_cross_entropy_chunked(rt, N, V, D, C):
    rng = np.random.default_rng(N)
    h = rng.standard_normal((N, D)).astype(np.float32)
    W = quantize_q8_0(rng.standard_normal((V, D)).astype(np.float32))
    lab = rng.integers(0, V, N)
    lab[::4] = R.IGNORE
    Wd = W.dequantize()
    loss_ref, lse_ref, n = R.cross_entropy(h, lambda a, b: Wd[a:b], V, lab, chunk=C)
    dh_ref = R.cross_entropy_backward(h, lambda a, b: Wd[a:b], V, lab, lse_ref, n, chunk=C)
    gw = K.upload_weight(rt, W, "head")
    hb, lb = up(rt, h), up(rt, lab.astype(np.int32))
    z, st, loss, dh = out(rt, N * C), out(rt, N * 4), out(rt, 4), out(rt, N * D)
    ops = []
    for c0 in range(0, V, C):
        cn = min(C, V - c0)
        ops += [K.matmul(rt, hb, gw, z, N, cn, D, w_row0=c0), K.ce_chunk_forward(rt, z, lb, st, N, cn, c0, c0 == 0)]
    ops += K.ce_finish(rt, lb, st, loss, N)
    for c0 in range(0, V, C):
        cn = min(C, V - c0)
        ops += [K.matmul(rt, hb, gw, z, N, cn, D, w_row0=c0), K.ce_chunk_backward(rt, z, lb, st, N, cn, c0, 1.0 / n),
                K.matmul(rt, z, gw, dh, N, D, cn, mode="backward_dx", w_row0=c0, beta=float(c0 > 0))]
    rt.run(ops)
    assert abs(get(rt, loss, (1,))[0] / n - loss_ref) <= 1e-5 * abs(loss_ref)
    assert rel(get(rt, st, (N, 4))[:, 3], lse_ref) <= TOL
    assert rel(get(rt, dh, (N, D)), dh_ref) <= 1e-4
    # the training path: row chunks over the whole vocabulary, gradient formed in place (rows_fused)
    rc = 4
    zr, st2, loss2, dh2 = out(rt, rc * V), out(rt, N * 4), out(rt, 4), out(rt, N * D)
    ops = []
    for row0 in range(0, N, rc):
        rows = min(rc, N - row0)
        ops += [K.matmul(rt, hb, gw, zr, rows, V, D, a_off=row0 * D),
                K.ce_rows_fused(rt, zr, lb, st2, rows, V, row0, 1.0 / n),
                K.matmul(rt, zr, gw, dh2, rows, D, V, mode="backward_dx", c_off=row0 * D)]
    rt.run(ops + K.ce_finish(rt, lb, st2, loss2, N))
    assert abs(get(rt, loss2, (1,))[0] / n - loss_ref) <= 1e-5 * abs(loss_ref)
    assert rel(get(rt, dh2, (N, D)), dh_ref) <= 1e-4


# --- optimizers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,max_norm,wd", [(1000, 0.0, 0.0), (4096, 0.05, 0.01)])
def test_grad_norm_clip_and_adamw(rt, n, max_norm, wd):
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(np.float32)
    pb, mb, vb = up(rt, p0), out(rt, n), out(rt, n)
    gstat, parts, gb, hyp = out(rt, 4), out(rt, 64), out(rt, n), out(rt, 4)
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    ntok = 37
    ops = K.grad_norm(rt, gb, parts, gstat, hyp, n, 64, max_norm)  # recorded once: the step's numbers are in hyp
    ops.append(K.adamw(rt, pb, gb, mb, vb, gstat, hyp, n, (0.9, 0.999), 1e-8))
    for step in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32) * ntok
        rt.write(gb, g)
        rt.write(hyp, K.adam_hyp(1e-2, wd, (0.9, 0.999), step, 1.0 / ntok))
        rt.run(ops)
        gg = g / np.float32(ntok)
        norm = float(np.linalg.norm(gg))
        assert abs(get(rt, gstat, (1,))[0] - norm) <= 1e-5 * norm
        if max_norm:
            gg = gg * np.float32(min(1.0, max_norm / (norm + 1e-6)))
        R.adamw(p, gg, m, v, step, 1e-2, 0.9, 0.999, 1e-8, wd)
        assert rel(get(rt, pb, (n,)), p) <= TOL
        assert not get(rt, gb, (n,)).any()  # the accumulator is zeroed by the step


@pytest.mark.parametrize("n", [512, 2048])
def test_adam8bit_matches_numpy_train(rt, n):
    from loralabd.engine.numpy_train import CODE_SIGNED, CODE_UNSIGNED, dequantize_blockwise, quantize_blockwise
    from loralabd.engine.webgpu.train import ZERO_S, ZERO_U

    rng = np.random.default_rng(n)
    p = rng.standard_normal(n).astype(np.float32)
    pb, gb, gstat = up(rt, p), out(rt, n), up(rt, np.array([0, 1, 0, 0], np.float32))
    mq, vq = up(rt, np.full(n, ZERO_S, np.uint8)), up(rt, np.full(n, ZERO_U, np.uint8))
    am = out(rt, 2 * (n // 256))
    mids = lambda c: np.concatenate([(c[1:] + c[:-1]) / 2.0, [np.inf]]).astype(np.float32)  # noqa: E731
    codes = up(rt, np.concatenate([CODE_SIGNED, CODE_UNSIGNED, mids(CODE_SIGNED), mids(CODE_UNSIGNED)]).astype(np.float32))
    ms, vs = quantize_blockwise(np.zeros(n, np.float32), CODE_SIGNED), quantize_blockwise(np.zeros(n, np.float32), CODE_UNSIGNED)
    hyp = out(rt, 4)
    op = K.adam8bit(rt, pb, gb, mq, vq, am, gstat, codes, hyp, n, (0.9, 0.999), 1e-8)  # recorded once
    for step in range(1, 6):
        g = rng.standard_normal(n).astype(np.float32)
        rt.write(gb, g)
        rt.write(hyp, K.adam_hyp(1e-2, 0.0, (0.9, 0.999), step, 1.0))
        rt.run([op])
        m, v = dequantize_blockwise(*ms, CODE_SIGNED, (n,)), dequantize_blockwise(*vs, CODE_UNSIGNED, (n,))
        R.adamw(p, g, m, v, step, 1e-2)
        ms, vs = quantize_blockwise(m, CODE_SIGNED), quantize_blockwise(v, CODE_UNSIGNED)
    assert rel(get(rt, pb, (n,)), p) <= 1e-5
    got_m = rt.read(mq).view(np.uint8)[:n]
    assert (got_m == ms[0]).mean() >= 0.99  # a code may flip where f32 division lands on a midpoint
    assert rel(get(rt, am, (n // 256, 2))[:, 0], ms[1]) <= 1e-5


# --- sampling: tests/test_sampler.py (GPU top-k / top-p / seeded sampling against reference.sample_token) ---
