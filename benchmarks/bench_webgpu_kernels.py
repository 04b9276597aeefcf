"""Kernel variants of the WebGPU backend on the training shapes, then one training step's profile.

    python benchmarks/bench_webgpu_kernels.py                  # SmolLM2-135M shapes, batch 8 x 512
    python benchmarks/bench_webgpu_kernels.py --quick          # small shapes: a lavapipe smoke run
    python benchmarks/bench_webgpu_kernels.py --mmt 8x4x32,4x4x16 --no-step

Matmuls: forward (X·Wᵀ + LoRA, Q4_1) and backward_dx (dY·W) for each projection shape, every tile variant
(LORALAB_WGPU_MMT), checked against numpy (rel = max|Δ|/max|ref|) and timed with timestamp queries (median
of the repeats' per-call time). Attention: the one-invocation-per-query kernels against attention_flash.wgsl
(outputs compared on the GPU). Then a training step (random weights) with the defaults: ms/step and the
top kernels. One JSON line per measurement, a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralabd.engine.lora import LoraAdapter, LoraConfig  # noqa: E402
from loralabd.engine.webgpu import kernels as K  # noqa: E402
from loralabd.engine.webgpu.runtime import get_runtime  # noqa: E402
from loralabd.models.quant import quantize_q4_1  # noqa: E402
from loralabd.models.random import random_model, smollm2_135m_args  # noqa: E402

ROWS = []


def emit(**kw):
    print(json.dumps(kw), flush=True)


def timed(rt, ops, repeats):
    """Median seconds per op over `repeats` profiled runs of the op list (all ops one kernel)."""
    ts = []
    for _ in range(repeats):
        prof = rt.profile(ops)
        ts.append(sum(prof.values()) / len(ops))
    return float(np.median(ts))


def up(rt, a):
    a = np.ascontiguousarray(a)
    return rt.buffer(a.nbytes, "bench", a)


def bench_matmul(rt, M, shapes, variants, r, reps, repeats):
    rng = np.random.default_rng(0)
    for N, Kd in shapes:
        W = quantize_q4_1(rng.standard_normal((N, Kd)).astype(np.float32) * 0.05)
        Wd = W.dequantize()
        x = rng.standard_normal((M, Kd)).astype(np.float32)
        dy = rng.standard_normal((M, N)).astype(np.float32)
        xa = rng.standard_normal((M, r)).astype(np.float32)
        Bm = rng.standard_normal((N, r)).astype(np.float32) * 0.1
        gw = K.upload_weight(rt, W, "w")
        xb, dyb, xab, Bb = up(rt, x), up(rt, dy), up(rt, xa), up(rt, Bm)
        y, dx = rt.buffer(4 * M * N, "y"), rt.buffer(4 * M * Kd, "dx")
        ref_y = x @ Wd.T + 0.5 * xa @ Bm.T
        ref_dx = dy @ Wd
        for var in variants:
            os.environ["LORALAB_WGPU_MMT"] = var
            tiled = rt.tiled
            rt.tiled = var != "plain"  # plain: the register-blocked kernels without workgroup memory
            f = K.matmul(rt, xb, gw, y, M, N, Kd, lora=(xab, Bb, r, r, 1, 0.5))
            b = K.matmul(rt, dyb, gw, dx, M, Kd, N, mode="backward_dx")
            rt.tiled = tiled
            rt.run([f, b])
            ey = float(np.abs(rt.read(y, np.float32)[: M * N].reshape(M, N) - ref_y).max() / np.abs(ref_y).max())
            ex = float(np.abs(rt.read(dx, np.float32)[: M * Kd].reshape(M, Kd) - ref_dx).max() / np.abs(ref_dx).max())
            tf, tb = timed(rt, [f] * reps, repeats), timed(rt, [b] * reps, repeats)
            fl = 2.0 * M * N * Kd
            for mode, t, e in (("forward", tf, ey), ("backward_dx", tb, ex)):
                row = dict(what="matmul", variant=var, mode=mode, M=M, N=N, K=Kd, us=round(1e6 * t, 1),
                           tflops=round(fl / t / 1e12, 2), rel=e)
                emit(**row)
                ROWS.append(row)
        os.environ.pop("LORALAB_WGPU_MMT", None)
        for bb in (gw.wq, gw.ws, xb, dyb, xab, Bb, y, dx):
            rt.free(bb)


def bench_attention(rt, B, T, H, KV, hd, repeats):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    k = rng.standard_normal((B, T, KV, hd)).astype(np.float32)
    v = rng.standard_normal((B, T, KV, hd)).astype(np.float32)
    do = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    qb, kb, vb, dob = up(rt, q), up(rt, k), up(rt, v), up(rt, do)
    dyn = up(rt, np.zeros(4, np.uint32))
    res = {}
    for var in ("simple", "flash"):
        os.environ["LORALAB_WGPU_ATTN"] = var
        o, lse, delta = rt.buffer(4 * q.size, "o"), rt.buffer(4 * B * H * T, "l"), rt.buffer(4 * B * H * T, "d")
        dq, dk, dv = rt.buffer(4 * q.size, "dq"), rt.buffer(4 * k.size, "dk"), rt.buffer(4 * v.size, "dv")
        fw = K.attention(rt, qb, kb, vb, o, lse, dyn, B, T, T, H, KV, hd)
        bw = K.attention_backward(rt, dob, qb, kb, vb, o, lse, delta, dq, dk, dv, dyn, B, T, H, KV, hd)
        rt.run([fw] + bw)
        res[var] = [rt.read(x, np.float32).copy() for x in (o, lse, dq, dk, dv)]
        for name, op in (("forward", fw), ("backward_dq", bw[0]), ("backward_dkv", bw[1])):
            t = timed(rt, [op] * 3, repeats)
            row = dict(what="attention", variant=var, mode=name, B=B, T=T, H=H, KV=KV, hd=hd, us=round(1e6 * t, 1))
            emit(**row)
            ROWS.append(row)
    os.environ.pop("LORALAB_WGPU_ATTN", None)
    errs = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(res["flash"], res["simple"])]
    emit(what="attention_check", rel_flash_vs_simple=dict(zip(("out", "lse", "dq", "dk", "dv"), errs)))


def bench_step(rt, B, T, layers, steps, top):
    args = smollm2_135m_args()
    if layers:
        args = replace(args, num_hidden_layers=layers)
    from loralabd.engine.webgpu.engine import WebGPUEngine
    from loralabd.training.packing import Batch

    model = random_model(args, seed=0)
    eng = WebGPUEngine(model)
    ad = LoraAdapter.init(args, LoraConfig(r=8, alpha=16), seed=0)
    sess = eng.train_session(ad)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, args.vocab_size, (B, T))
    lab = np.roll(tok, -1, axis=1)
    lab[:, -1] = -100
    b = Batch.of(tok, lab)
    sess.step([b], 1e-4, 1.0)
    m0 = sess.metrics()[0]
    loss0 = (m0.loss_sum, m0.targets)
    t0 = time.perf_counter()
    for _ in range(steps):
        sess.step([b], 1e-4, 1.0)
    sess.metrics()  # waits for the device
    dt = (time.perf_counter() - t0) / steps
    prog = sess.prepare(B, T)
    prof = rt.profile(prog.ops)
    total = sum(prof.values()) or 1.0
    tops = sorted(prof.items(), key=lambda kv: -kv[1])[:top]
    emit(what="step", device=rt.info()["name"], batch=B, seq=T, layers=args.num_hidden_layers,
         first_loss=float(loss0[0]) / max(loss0[1], 1), ms_per_step=round(1e3 * dt, 2),
         tokens_per_s=round(B * T / dt, 1), dispatches=len(prog.ops) + 3, gpu_ms=round(1e3 * total, 2),
         top=[[k, round(1e3 * v, 2), round(100 * v / total, 1)] for k, v in tops])
    sess.close()
    eng.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mmt", default="plain,tiled,4x4,8x4,4x8,8x8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--only-step", action="store_true", help="just the training step (kernels per LORALAB_WGPU_*)")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    rt = get_runtime()
    emit(what="adapter", **rt.info())
    if a.quick:
        M, shapes, att, step = 256, [(64, 96)], (1, 64, 3, 1, 64), (1, 32, 2)
    else:
        M, shapes, att, step = 4096, [(576, 576), (192, 576), (1536, 576), (576, 1536), (8, 576)], (8, 512, 9, 3, 64), (8, 512, None)
    variants = [v for v in a.mmt.split(",") if v]
    if a.only_step:
        bench_step(rt, *step, steps=1 if a.quick else 3, top=a.top)
        return
    bench_matmul(rt, M, shapes, variants, 8, 10, a.repeats)
    bench_attention(rt, *att, a.repeats)
    if not a.no_step:
        bench_step(rt, *step, steps=1 if a.quick else 3, top=a.top)
    print("\nvariant     mode          M     N     K      us  TFLOP/s  rel")
    for r in ROWS:
        if r["what"] == "matmul":
            print(f"{r['variant']:<10}  {r['mode']:<12} {r['M']:>5} {r['N']:>5} {r['K']:>5} {r['us']:>8} {r['tflops']:>7}  {r['rel']:.1e}")
    for r in ROWS:
        if r["what"] == "attention":
            print(f"attention {r['variant']:<7} {r['mode']:<13} {r['us']:>10} us")


if __name__ == "__main__":
    main()
