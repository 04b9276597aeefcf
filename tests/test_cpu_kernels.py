"""The numpy engine's CPU kernels (engine/cpu_ops.py) against engine/reference.py, and its row split over threads
(engine/cpu_layer.py) against the single-thread path."""

import numpy as np
import pytest

from loralabd.engine import cpu_ops as C
from loralabd.engine import reference as R
from loralabd.engine.lora import LoraAdapter, LoraConfig
from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.models import load_model

from conftest import rel_err, write_tiny_hf_model

TOL = 1e-5  # relative: the kernels reorder f32 sums, nothing more


def rnd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("T,Tk,offset,packed", [(150, 150, 0, False), (150, 150, 0, True), (7, 27, 20, False),
                                                (1, 40, 39, False)])
def test_attention_matches_reference(T, Tk, offset, packed):
    rng = np.random.default_rng(0)
    B, H, KV, hd = 2, 6, 2, 16
    q, k, v, dout = rnd(rng, B, T, H, hd), rnd(rng, B, Tk, KV, hd), rnd(rng, B, Tk, KV, hd), rnd(rng, B, T, H, hd)
    seg = np.sort(rng.integers(0, 3, (B, T)), axis=1) if packed else None
    blocks = C.attention_blocks(T, Tk, offset, seg, H // KV)
    mask = R.attention_mask(T, seg, t_offset=offset, t_keys=Tk)
    with C.own_threads():
        out, lse = C.attention(q, k, v, blocks)
        grads = C.attention_backward(dout, out, q, k, v, lse, blocks) if T == Tk else ()
    ref_out, ref_lse = R.attention(q, k, v, mask)
    assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
    for g, ref in zip(grads, R.attention_backward(dout, q, k, v, mask, ref_lse) if grads else ()):
        assert rel_err(g, ref) <= TOL


def test_cross_entropy_and_gradient_in_one_pass():
    rng = np.random.default_rng(1)
    N, D, V = 300, 16, 1000
    h, W = rnd(rng, N, D), rnd(rng, V, D)
    labels = rng.integers(0, V, N)
    labels[::7] = R.IGNORE
    with C.own_threads():
        loss, dh, n = C.cross_entropy_grad(h, W, labels, chunk=128)
    ref_loss, lse, ref_n = R.cross_entropy(h, lambda a, b: W[a:b], V, labels, 128)
    assert n == ref_n and abs(loss - ref_loss) <= TOL * abs(ref_loss)
    assert rel_err(dh, R.cross_entropy_backward(h, lambda a, b: W[a:b], V, labels, lse, n, 128)) <= TOL
    assert C.cross_entropy_grad(h, W, np.full(N, R.IGNORE), 128)[2] == 0


def test_elementwise_kernels():
    rng = np.random.default_rng(2)
    g, u, da = rnd(rng, 200, 48), rnd(rng, 200, 48), rnd(rng, 200, 48)
    assert rel_err(C.swiglu(g, u), R.swiglu(g, u)) <= TOL
    dgu = np.empty((200, 96), np.float32)
    C.swiglu_backward(da, g, u, dgu)
    dg, du = R.swiglu_backward(da, g, u)
    assert rel_err(dgu[:, :48], dg) <= TOL and rel_err(dgu[:, 48:], du) <= TOL
    x, w, dy, add = rnd(rng, 150, 64), rnd(rng, 64), rnd(rng, 150, 64), rnd(rng, 150, 64)
    y, rstd = C.rmsnorm(x, w, 1e-5)
    ref_y, ref_rstd = R.rmsnorm(x, w, 1e-5)
    assert np.array_equal(y, ref_y) and np.array_equal(rstd, ref_rstd)
    assert rel_err(C.rmsnorm_backward(dy, x, w, rstd, add), add + R.rmsnorm_backward(dy, x, w, rstd)) <= TOL
    xr = rnd(rng, 2, 5, 3, 8)
    cos, sin = R.rope_tables(np.arange(5)[None].repeat(2, 0), 8, 10000.0)
    assert np.array_equal(C.rope(xr, cos, sin, np.empty_like(xr)), R.rope(xr, cos, sin))
    assert np.array_equal(C.rope_backward(xr, cos, sin, np.empty_like(xr)), R.rope_backward(xr, cos, sin))


def test_gemm_accumulates_into_views():
    rng = np.random.default_rng(3)
    big = rnd(rng, 50, 40)
    for M, K, N in [(7, 5, 9), (1, 5, 9), (7, 1, 9)]:
        A, Bt = rnd(rng, M, K), rnd(rng, N, K)
        for a in (A, np.asfortranarray(A), np.ascontiguousarray(rnd(rng, M, K + 3))[:, 2:2 + K]):
            for b in (Bt.T, np.ascontiguousarray(Bt.T)):
                c = big.copy()
                C.gemm_acc(a, b, c[3:3 + M, 4:4 + N], 0.5)
                want = big.copy()
                want[3:3 + M, 4:4 + N] += 0.5 * (a @ b)
                assert np.allclose(c, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_rows_split_over_threads_match_one_thread(tmp_path, monkeypatch, dropout):
    """The engine's layers with their rows in two blocks (LoRA gradients summed over the blocks) against one block."""
    write_tiny_hf_model(tmp_path, "qwen2")  # biases on q/k/v too
    model = load_model(tmp_path, weights="f32")
    cfg = LoraConfig(r=4, alpha=8, dropout=dropout, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    ad = LoraAdapter.init(model.args, cfg, seed=1)
    rng = np.random.default_rng(2)
    for key in ad.B:
        ad.B[key][:] = rnd(rng, *ad.B[key].shape) * 0.05
    tok = rng.integers(0, model.args.vocab_size, (3, 90))
    lab = rng.integers(0, model.args.vocab_size, (3, 90))
    lab[:, :10] = R.IGNORE
    seg = np.sort(rng.integers(0, 3, (3, 90)), axis=1)
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(C, "n_threads", lambda t=threads: t)
        eng = NumpyEngine(model)
        runs.append(eng.loss_and_grads(tok, lab, ad, segments=seg, drop_rng=np.random.default_rng(5)))
        runs[-1] += (eng.logits(tok[:1, :30], [(ad, 1.0)]),)
    (l1, g1, n1, z1), (l2, g2, n2, z2) = runs
    assert n1 == n2 and abs(l1 - l2) <= TOL * abs(l1) and sorted(g1) == sorted(g2)
    for key in g1:
        assert rel_err(g2[key], g1[key]) <= 1e-4, key
    assert rel_err(z2, z1) <= TOL
