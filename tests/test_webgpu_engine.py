"""The WebGPU engine as a whole against NumpyEngine / NumpyTrainSession (the reference), on lavapipe in CI.

Tolerances: loss 1e-4 relative, every dA/dB 1e-3 relative (max|Δ| / max|ref|), logits 1e-3·max|ref|
(the foundation issue's), 20 AdamW steps within 1e-4 relative loss and grad norm at every step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from loralabd.engine.interface import OptimSettings, Sampling
from loralabd.engine.lora import LoraAdapter, LoraConfig
from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.models.random import random_model, tiny_args
from loralabd.training.packing import Batch

wgpu_rt = pytest.importorskip("loralabd.engine.webgpu.runtime")
pytestmark = pytest.mark.gpu


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def tiny():
    if not wgpu_rt.available():
        pytest.skip("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
    from loralabd.engine.webgpu.engine import WebGPUEngine

    args = tiny_args()  # 2 layers, 4 heads / 2 KV heads (GQA), D 64, FFN 160, vocab 300
    model = random_model(args, seed=1)
    # 3 vocabulary chunks (loss), row chunks of 5 (training cross-entropy): both with a partial last chunk
    return args, NumpyEngine(model), WebGPUEngine(model, vocab_chunk=128, ce_row_chunk=5)


def trained_adapter(args, r=4, seed=0):
    """LoRA on all 7 projections with B != 0, so that every dA is non-zero too."""
    ad = LoraAdapter.init(args, LoraConfig(r=r, alpha=2 * r), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for k in ad.B:
        ad.B[k] = (rng.standard_normal(ad.B[k].shape) * 0.05).astype(np.float32)
    return ad


def batch(args, B=2, T=13, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, args.vocab_size, (B, T))
    lab = np.roll(tok, -1, axis=1)
    lab[:, -1] = -100
    lab[0, :3] = -100  # a masked prompt
    return tok, lab


def loss_and_grads(eng, tok, lab, ad, segments=None, positions=None):
    """Mean loss over the labelled positions, d(mean loss)/d(A, B) and the labelled-token count of one
    micro-batch, through a train session's gradients() (no optimizer step)."""
    sess = eng.train_session(ad, OptimSettings())
    try:
        loss_sum, n, g = sess.gradients(Batch.of(tok, lab, segments, positions))
    finally:
        sess.close()
    return loss_sum / n, {k: v * np.float32(1.0 / n) for k, v in g.items()}, n


def decode_kernels(we, adapters) -> set:
    """Kernel names of the decode programs (prefill chunk + token) of the decode that ran last, which used
    these adapters."""
    key, progs = list(we._arena.programs.items())[-1]
    assert [u for u, _ in key] == [a.uid for a, s in adapters if s != 0.0]
    return {o.kernel for p in progs for o in p.ops}


def test_training_step_matches_numpy(tiny):
    args, ne, we = tiny
    ad = trained_adapter(args)
    tok, lab = batch(args)
    l0, g0, n0 = loss_and_grads(ne, tok, lab, ad)
    l1, g1, n1 = loss_and_grads(we, tok, lab, ad)
    assert n1 == n0
    assert abs(l1 - l0) <= 1e-4 * abs(l0)
    assert set(g1) == set(g0) and len(g0) == 2 * 7 * args.num_hidden_layers
    worst = max(g0, key=lambda k: rel(g1[k], g0[k]))
    assert rel(g1[worst], g0[worst]) <= 1e-3, worst


def test_training_step_with_hardware_kernels(tiny, monkeypatch):
    """The kernels a hardware GPU gets (register-blocked tiled matmuls, split-K dA/dB, flash attention) in a
    whole step, with dropout."""
    args, ne, we = tiny
    monkeypatch.setattr(we.rt, "tiled", True)
    ad = trained_adapter(args, seed=11)
    tok, lab = batch(args, B=4, T=256, seed=11)  # N = 1024 rows: tiles and 2 split-K slices
    sess = we.train_session(ad, OptimSettings(kind="adamw"))
    ops = sess.prepare(4, 256).ops
    kernels = {o.kernel.split(":")[1].split("[")[0] for o in ops}
    from loralabd.engine.webgpu.kernels import MMT_DEFAULT

    mm = "_tiled" if os.environ.get("LORALAB_WGPU_MMT", MMT_DEFAULT) == "tiled" else "_mmt"
    assert {"forward" + mm, "backward_dx" + mm, "backward_dw_split", "split_reduce", "forward_wg"} <= kernels
    assert {"forward", "backward_dq", "backward_dkv"} <= {o.kernel.split(":")[1].split("[")[0] for o in ops
                                                          if o.kernel.startswith("attention_flash.wgsl")}
    loss, n, g = sess.gradients(Batch.of(tok, lab))
    sess.close()
    g1 = {k: v * np.float32(1.0 / n) for k, v in g.items()}
    l0, g0, _ = loss_and_grads(ne, tok, lab, ad)
    assert abs(loss / n - l0) <= 1e-4 * l0
    assert max(rel(g1[k], g0[k]) for k in g0) <= 1e-3
    # decoding with gemv_wg / gemv_lanes and split-key attention: the logits of a 71-token prefix, and greedy
    # decoding after a 70-token prompt (chunked prefill, then one token program per token), on an engine
    # made while the runtime says "hardware" (its prefill chunks are a hardware GPU's, >= 64 rows: tiled)
    from loralabd.engine.webgpu.engine import WebGPUEngine

    hw = WebGPUEngine(ne.model)
    try:
        assert rel(hw.logits(tok[:1, :71], [(ad, 1.0)]), ne.logits(tok[:1, :71], [(ad, 1.0)])) <= 1e-5
        prompt = [int(t) for t in tok[0, :70]]
        assert list(hw.decode(prompt, 10, Sampling(), [(ad, 1.0)])) == \
            list(ne.decode(prompt, 10, Sampling(), [(ad, 1.0)]))
        kernels = {k.split(":")[1].split("[")[0] for k in decode_kernels(hw, [(ad, 1.0)])}
        assert {"gemv_wg", "gemv_lanes", "decode_part", "decode_merge", "forward" + mm} <= kernels
        # the token program reads the norms and SwiGLU in the projections' prologues: one RMSNorm (the final)
        token = [o.kernel for o in list(hw._arena.programs.values())[-1][1].ops]
        assert sum("rmsnorm" in k for k in token) == 1 and not any("swiglu" in k for k in token)
        assert any("XNORM=1" in k for k in token) and any("XSWIGLU=1" in k for k in token)
    finally:
        hw.close()


@pytest.mark.parametrize("tiled", [False, True])
def test_keeping_activations_gives_the_bits_recomputing_gives(tiny, monkeypatch, tiled):
    """Activation checkpointing is a choice of memory against time, not of results: a session that keeps every
    layer's activations and one that recomputes them in the backward take the same steps bit for bit (same
    kernels on the same inputs), with dropout and gradient accumulation; keeping holds more memory, as planned."""
    args, ne, we = tiny
    monkeypatch.setattr(we.rt, "tiled", tiled)
    ad = trained_adapter(args, seed=5)
    ad.config = LoraConfig(r=4, alpha=8, dropout=0.1)
    b0, b1 = (Batch.of(*batch(args, B=2, T=40, seed=s)) for s in (5, 6))
    states, live = [], []
    for recompute in (False, True):
        sess = we.train_session(ad, OptimSettings(seed=3, recompute=recompute))
        sess.reserve(2, 40)
        before = we.rt.live_bytes
        for _ in range(2):
            sess.step([b0, b1], 1e-3, 1.0)
        states.append((sess.state_dict(), [(m.loss_sum, m.grad_norm) for m in sess.metrics()]))
        live.append(sess.memory_bytes())
        plan = we.memory_plan(2, 40, ad.config, recompute=recompute)
        assert plan.parts["activations"] > 0
        sess.close()
        assert we.rt.live_bytes <= before
    (s0, m0), (s1, m1) = states
    assert m0 == m1 and set(s0) == set(s1)
    for k in s0:
        assert np.array_equal(s0[k], s1[k]), k
    kept, recomputed = (we.memory_plan(2, 40, ad.config, recompute=r).parts["activations"] for r in (False, True))
    assert kept > recomputed and live[0] > live[1]


def test_sizing_plans_the_hardware_kernels_of_a_small_batch(tiny):
    """The planner runs the engine's own allocation code on a sizing runtime that records no dispatch: with
    the hardware kernels at a small batch (the split-K scratch: the cross-entropy's dX has K = vocab) it must
    plan every buffer the real session allocates."""
    from loralabd.engine.webgpu import kernels as K
    from loralabd.engine.webgpu.sizing import plan_buffers

    args, ne, we = tiny
    cfg = LoraConfig(r=4, alpha=8)
    planned = plan_buffers(ne.model, 2, 64, cfg, tiled=True)
    assert ("mm_split", "workspace") in {(n, part) for n, part, _ in planned}
    assert K.k_splits(type("HW", (), {"tiled": True, "limits": {}})(), 128, args.hidden_size, args.vocab_size,
                      "backward_dx") > 1  # the shape above does split


def test_packed_training_step_matches_numpy(tiny):
    """Two sequences packed in one row: segment-masked attention, positions restarting at 0."""
    args, ne, we = tiny
    ad = trained_adapter(args, seed=3)
    tok, lab = batch(args, B=2, T=11, seed=2)
    seg = np.array([[0] * 4 + [1] * 7, [0] * 11])
    pos = np.array([list(range(4)) + list(range(7)), list(range(11))])
    l0, g0, _ = loss_and_grads(ne, tok, lab, ad, segments=seg, positions=pos)
    l1, g1, _ = loss_and_grads(we, tok, lab, ad, segments=seg, positions=pos)
    assert abs(l1 - l0) <= 1e-4 * abs(l0)
    assert max(rel(g1[k], g0[k]) for k in g0) <= 1e-3


def test_micro_batches_of_different_shapes_step_as_numpy(tiny):
    """Gradient accumulation whose micro-batches differ in rows and length (a packed text set's last rows):
    padded to one program's shape, the step equals NumpyTrainSession's, which takes them as they come."""
    args, ne, we = tiny
    ad = LoraAdapter.init(args, LoraConfig(r=4, alpha=8), seed=6)
    s0, s1 = ne.train_session(ad), we.train_session(ad)
    t1, l1 = batch(args, B=2, T=12, seed=8)
    t2, l2 = batch(args, B=1, T=7, seed=9)
    seg = np.array([[0] * 3 + [1] * 4])
    micro = [Batch.of(t1, l1), Batch.of(t2, l2, segments=seg, positions=np.array([list(range(3)) + list(range(4))]))]
    for _ in range(3):
        s0.step(micro, 5e-3, 1.0)
        s1.step(micro, 5e-3, 1.0)
    m0, m1 = s0.metrics(), s1.metrics()
    assert [m.targets for m in m0] == [m.targets for m in m1]
    assert max(abs(a.loss_sum - b.loss_sum) / abs(a.loss_sum) for a, b in zip(m0, m1)) <= 1e-4
    w0, w1 = s0.state_dict(), s1.state_dict()
    assert max(rel(w1[k], w0[k]) for k in w0 if k.endswith((".A", ".B"))) <= 1e-3


@pytest.mark.parametrize("kind,clip,steps", [("adamw", 1.0, 20), ("adam8bit", None, 6)])
def test_train_session_follows_numpy(tiny, kind, clip, steps):
    """Same loss curve, grad norms and final weights as NumpyTrainSession, with 2 micro-batches per step."""
    args, ne, we = tiny
    ad = LoraAdapter.init(args, LoraConfig(r=4, alpha=8), seed=5)
    optim = OptimSettings(kind=kind, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    s0, s1 = ne.train_session(ad, optim), we.train_session(ad, optim)
    tok, lab = batch(args, B=2, T=12, seed=7)
    whole = Batch.of(tok, lab)
    start = s1.evaluate(whole)[0]
    micro = [Batch.of(tok[half], lab[half]) for half in (slice(0, 1), slice(1, 2))]
    for step in range(steps):
        for mb in micro:  # each micro-batch's loss at the weights the step starts from
            a0, n0, _ = s0.gradients(mb)
            a1, n1, _ = s1.gradients(mb)
            assert n0 == n1 and abs(a1 - a0) <= 1e-4 * abs(a0), (step, a0, a1)
        s0.step(micro, 5e-3, clip)  # (at 3e-2 this toy run oscillates: chaos, not a bug)
        s1.step(micro, 5e-3, clip)
        if step == 2:  # a read between steps, then the rest read back at once from the GPU's ring
            m0, m1 = s0.metrics(), s1.metrics()
            assert len(m0) == len(m1) == 3
    m0, m1 = m0 + s0.metrics(), m1 + s1.metrics()
    assert len(m0) == len(m1) == steps and s0.t == s1.t == steps
    for step, (a, b) in enumerate(zip(m0, m1)):
        assert a.targets == b.targets == sum(mb.n_targets for mb in micro)
        assert abs(b.loss_sum - a.loss_sum) <= 1e-4 * abs(a.loss_sum), (step, a.loss_sum, b.loss_sum)
        assert abs(b.grad_norm - a.grad_norm) <= 1e-4 * a.grad_norm + 1e-7, (step, a.grad_norm, b.grad_norm)
    w0, w1 = s0.snapshot(), s1.snapshot()
    if kind == "adamw":
        assert max(rel(w1.B[k], w0.B[k]) for k in w0.B) <= 1e-3
    # (8-bit: ~1e-6 gradient differences flip a few codes that sit on quantization midpoints, and a flipped
    # code moves its weight's step by up to ~10%; test_adam8bit_step_is_numpy_train_arithmetic checks the
    # step itself exactly.)
    e0, e1 = s0.evaluate(whole), s1.evaluate(whole)
    assert e0[1] == e1[1] and abs(e1[0] - e0[0]) <= 1e-3 * e0[0]
    assert e1[0] < 0.95 * start  # and it did learn
    s1.close()


def test_adam8bit_step_is_numpy_train_arithmetic(tiny):
    """From the GPU's own state and gradients, one 8-bit step gives numpy_train's codes and weights."""
    from loralabd.engine import reference as R
    from loralabd.engine.numpy_train import CODE_SIGNED, CODE_UNSIGNED, dequantize_blockwise, quantize_blockwise

    args, ne, we = tiny
    ad = LoraAdapter.init(args, LoraConfig(r=4, alpha=8), seed=5)
    s1 = we.train_session(ad, OptimSettings(kind="adam8bit", betas=(0.9, 0.99), weight_decay=0.01))
    tok, lab = batch(args, B=2, T=12, seed=7)
    b = Batch.of(tok, lab)
    for step in range(1, 4):
        st = s1.state_dict()
        _, n, g = s1.gradients(b)  # the gradient the step computes (same program, same inputs)
        g = {k: v * np.float32(1.0 / n) for k, v in g.items()}  # the kernel's scale: grad * (1 / n)
        s1.step([b], 5e-3)
        new = s1.state_dict()
        assert new["step"][0] == step
        for k in g:
            p = st[f"param.{k}"].copy()
            m = dequantize_blockwise(st[f"m.{k}.q"], st[f"m.{k}.absmax"], CODE_SIGNED, p.shape)
            v = dequantize_blockwise(st[f"v.{k}.q"], st[f"v.{k}.absmax"], CODE_UNSIGNED, p.shape)
            R.adamw(p, g[k], m, v, step, 5e-3, 0.9, 0.99, 1e-8, 0.01)
            assert rel(new[f"param.{k}"], p) <= 1e-6, k
            np.testing.assert_array_equal(new[f"m.{k}.q"], quantize_blockwise(m, CODE_SIGNED)[0])
            np.testing.assert_array_equal(new[f"v.{k}.q"], quantize_blockwise(v, CODE_UNSIGNED)[0])
    s1.close()


def test_checkpoint_moves_between_engines(tiny):
    """A WebGPU state_dict resumes in NumpyTrainSession (and back) with the same next step."""
    args, ne, we = tiny
    ad = LoraAdapter.init(args, LoraConfig(r=2, alpha=4, targets=("q_proj", "down_proj")), seed=9)
    tok, lab = batch(args, B=1, T=9, seed=9)
    b = Batch.of(tok, lab)
    s1 = we.train_session(ad, OptimSettings(kind="adamw"))
    for _ in range(3):
        s1.step([b], 1e-2)
    state = s1.state_dict()
    s0 = ne.train_session(ad, OptimSettings(kind="adamw"))
    s0.load_state_dict(state)
    s2 = we.train_session(ad, OptimSettings(kind="adamw"))
    s2.load_state_dict(s0.state_dict())
    assert s0.t == s2.t == 3
    for s in (s0, s1, s2):
        s.step([b], 1e-2)
    w0, w1, w2 = s0.snapshot(), s1.snapshot(), s2.snapshot()
    assert max(rel(w1.A[k], w0.A[k]) for k in w0.A) <= 1e-4
    assert max(rel(w2.A[k], w1.A[k]) for k in w0.A) == 0.0
    s1.close()
    s2.close()


def test_logits_loss_and_decoding_match_numpy(tiny):
    args, ne, we = tiny
    ad = trained_adapter(args, seed=4)
    ad2 = trained_adapter(args, r=2, seed=6)
    tok, lab = batch(args, B=2, T=9, seed=4)
    adapters = [(ad, 1.0), (ad2, 0.5)]  # two adapters at once: the first fused, the second added
    assert rel(we.logits(tok, adapters), ne.logits(tok, adapters)) <= 1e-5
    assert abs(we.loss(tok, lab, [(ad, 1.0)]) - ne.loss(tok, lab, [(ad, 1.0)])) <= 1e-5
    # decoding through the KV cache (both adapters: the unfused path) gives the tokens of NumpyEngine's
    for row in range(2):
        prompt = [int(t) for t in tok[row, :6]]
        assert list(we.decode(prompt, 12, Sampling(), adapters)) == list(ne.decode(prompt, 12, Sampling(), adapters))
    prompt = [int(t) for t in tok[0, :5]]
    assert list(we.decode(prompt, 24, Sampling(), [(ad, 1.0)])) == list(ne.decode(prompt, 24, Sampling(), [(ad, 1.0)]))
    for eng in (we, ne):  # seeded sampling: the same seed gives the same tokens request after request
        sampled = list(eng.decode(prompt, 24, Sampling(temperature=1.0, seed=1)))
        other = list(eng.decode(prompt, 24, Sampling(temperature=1.0, seed=2)))
        assert sampled != other
        assert list(eng.decode(prompt, 24, Sampling(temperature=1.0, seed=1))) == sampled, eng.backend
        assert list(eng.decode(prompt, 24, Sampling(temperature=1.0, seed=2))) == other, eng.backend
        gen = eng.decode(prompt, 24, Sampling(temperature=1.0, seed=1))
        first = [next(gen) for _ in range(3)]
        gen.close()  # stopped early: the next request is not disturbed
        assert first == sampled[:3]
        assert list(eng.decode(prompt, 24, Sampling(temperature=1.0, seed=1))) == sampled, eng.backend
    # GPU sampling and reference.sample_token are one algorithm: the same tokens for a seed
    for sp in (Sampling(temperature=1.0, seed=1), Sampling(temperature=0.8, top_k=3, seed=1),
               Sampling(temperature=1.2, top_p=0.7, seed=4), Sampling(temperature=0.9, top_k=20, top_p=0.8, seed=9)):
        assert list(we.decode(prompt, 24, sp, [(ad, 1.0)])) == list(ne.decode(prompt, 24, sp, [(ad, 1.0)])), sp


def test_fused_decode_path_matches_numpy(tiny):
    """Decoding with one adapter fuses q/k/v and gate/up into one matmul each (LoRA of the parts side by side,
    zeros for untargeted parts): same logits as NumpyEngine, fewer dispatches."""
    args, ne, we = tiny
    ad = trained_adapter(args, seed=12)
    part = LoraAdapter.init(args, LoraConfig(r=3, alpha=6, targets=("k_proj", "up_proj", "o_proj")), seed=13)
    for k in part.B:
        part.B[k] = np.full_like(part.B[k], 0.05)
    tok, _ = batch(args, B=2, T=9, seed=12)
    for adapters in ([(ad, 1.0)], [(part, 0.7)], []):
        assert rel(we.logits(tok, adapters), ne.logits(tok, adapters)) <= 1e-5
        for row in range(2):
            prompt = [int(t) for t in tok[row, :6]]
            assert list(we.decode(prompt, 8, Sampling(), adapters)) == list(ne.decode(prompt, 8, Sampling(), adapters))
        kernels = decode_kernels(we, adapters)
        assert any("decode_qkv" in k for k in kernels) and any("forward_fused" in k for k in kernels)
        assert not any("kv_store" in k for k in kernels)


@pytest.mark.parametrize("arch,weights", [("llama", "f32"), ("qwen2", "f16")])
def test_hf_dense_weights(tmp_path, arch, weights):
    """HF models kept in f32 / f16 (and qwen2's q/k/v biases): logits and gradients match."""
    if not wgpu_rt.available():
        pytest.skip("no WebGPU adapter")
    from conftest import write_tiny_hf_model
    from loralabd.engine.webgpu.engine import WebGPUEngine
    from loralabd.models import load_model

    write_tiny_hf_model(tmp_path, arch)
    model = load_model(tmp_path, weights=weights)
    ne, we = NumpyEngine(model), WebGPUEngine(model)
    ad = trained_adapter(model.args, seed=2)
    tok, lab = batch(model.args, B=1, T=10, seed=3)
    assert rel(we.logits(tok, [(ad, 1.0)]), ne.logits(tok, [(ad, 1.0)])) <= 1e-5
    l0, g0, _ = loss_and_grads(ne, tok, lab, ad)
    l1, g1, _ = loss_and_grads(we, tok, lab, ad)
    assert abs(l1 - l0) <= 1e-4 * abs(l0)
    assert max(rel(g1[k], g0[k]) for k in g0) <= 1e-3


def test_close_gives_the_memory_back(tiny):
    from loralabd.engine.webgpu.engine import WebGPUEngine

    args, ne, _ = tiny
    rt = wgpu_rt.get_runtime()
    rt.dummy, rt.dummy_rw  # the runtime's own placeholder buffers, made on first use
    before = rt.live_bytes
    we = WebGPUEngine(ne.model)
    assert len(list(we.decode([1, 2, 3], 4, Sampling(), [(trained_adapter(args), 1.0)]))) == 4
    we.logits(np.array([[1, 2, 3]]))
    assert rt.live_bytes > before + ne.model.weight_bytes() // 2
    we.close()
    assert rt.live_bytes == before


def test_make_engine_backend_choice(tiny):
    from loralabd.engine.select import choose_backend, make_engine

    args, ne, we = tiny
    assert choose_backend("numpy") == "numpy" and choose_backend("webgpu") == "webgpu"
    hw = wgpu_rt.get_runtime().is_hardware
    assert choose_backend("auto") == ("webgpu" if hw else "numpy")
    assert make_engine(ne.model, "webgpu").backend == "webgpu"
    assert make_engine(ne.model, "numpy").backend == "numpy"
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("cuda")


def test_lora_dropout_matches_numpy_with_the_same_masks(tiny):
    """GPU dropout masks are counter-based (seed, step, micro-batch, layer, projection); fed the same masks,
    NumpyEngine gives the same loss and gradients."""
    from loralabd.engine.webgpu.graph import drop_salt
    from loralabd.engine.webgpu.kernels import dropout_keep
    from loralabd.models.args import LINEAR_NAMES

    args, ne, we = tiny
    p = 0.3
    ad = trained_adapter(args, seed=8)
    ad.config = LoraConfig(r=4, alpha=8, dropout=p)
    tok, lab = batch(args, B=2, T=10, seed=8)
    N = tok.size
    b = Batch.of(tok, lab)

    class SameMasks:  # what NumpyEngine draws masks from: .random(shape) >= p keeps
        def __init__(self, step, micro):
            self.masks = iter([dropout_keep((N, args.linear_shape(n)[1]), 7, step, micro, drop_salt(i, n), p)
                               for i in range(args.num_hidden_layers) for n in LINEAR_NAMES])

        def random(self, shape):
            m = next(self.masks)
            assert m.shape == shape
            return m.astype(np.float64)

    # An optimizer whose update is the normalised accumulated gradient itself: betas 0 (m = g, v = g²,
    # no bias correction), eps ≫ |g| and lr = eps, so p_new = p - lr·g/(|g| + eps) = p - g (to f32 rounding).
    big = 1e6
    sess = we.train_session(ad, OptimSettings(kind="adamw", betas=(0.0, 0.0), eps=big, seed=7))
    l0, g0, n0 = ne.loss_and_grads(tok, lab, ad, drop_rng=SameMasks(0, 0))
    l0b, g0b, _ = ne.loss_and_grads(tok, lab, ad, drop_rng=SameMasks(0, 1))
    loss0, n1, gs = sess.gradients(b)  # micro-batch 0 of step 0
    assert n1 == n0 and abs(loss0 / n1 - l0) <= 1e-4 * l0
    for k in g0:
        assert rel(gs[k] * np.float32(1.0 / n1), g0[k]) <= 1e-3, k
    before = sess.state_dict()
    sess.step([b, b], big)  # micro-batches 0 and 1 of step 0: other masks for the second
    (m,) = sess.metrics()
    assert m.targets == 2 * n1
    loss1 = m.loss_sum - loss0  # micro-batch 1's loss sum
    assert abs(loss1 / n1 - l0b) <= 1e-4 * l0b and abs(l0b - l0) > 1e-6  # the masks differ per micro-batch
    after = sess.state_dict()
    g1 = {k: before[f"param.{k}"] - after[f"param.{k}"] for k in g0}  # d(mean loss of both)/d(A, B)
    for k in g0:
        assert rel(g1[k], (g0[k] + g0b[k]) / 2) <= 1e-3, k
    # and the next step draws other masks again: (seed, step 1, micro-batch 0)
    l2, g2, _ = ne.loss_and_grads(tok, lab, sess.snapshot(), drop_rng=SameMasks(1, 0))
    loss2, n2, gs2 = sess.gradients(b)
    assert abs(loss2 / n2 - l2) <= 1e-4 * l2
    for k in g2:
        assert rel(gs2[k] * np.float32(1.0 / n2), g2[k]) <= 1e-3, k
    sess.close()
    keep = dropout_keep((N, args.hidden_size), 7, 0, 0, 0, p)
    assert abs(keep.mean() - (1 - p)) < 0.05


@pytest.mark.slow
def test_default_model_logits_and_greedy_64(default_model):
    """The real SmolLM2-135M Q4_1: logits within 1e-3·max|ref| and the same 64 greedy tokens."""
    if not wgpu_rt.available():
        pytest.skip("no WebGPU adapter")
    from loralabd.engine.webgpu.engine import WebGPUEngine

    ne, we = NumpyEngine(default_model), WebGPUEngine(default_model)
    tk = default_model.tokenizer
    prompt = tk.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ref = ne.logits(np.asarray([prompt]))
    got = we.logits(np.asarray([prompt]))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    g_ref = list(ne.decode(prompt, 64))
    g = list(we.decode(prompt, 64))
    assert len(g_ref) == 64
    assert g == g_ref
    assert tk.decode(g[:8], skip_special=True).startswith("The capital of France is Paris")


def test_one_program_for_rows_of_every_length(tiny):
    """Packed batches are cut to their longest row, so each step can bring another (batch, seq): the session
    keeps one training program, grown to the largest shape seen, and pads smaller batches into it — the
    memory of one program, as the plan counts, and nothing rebuilt when rows come shorter."""
    args, ne, we = tiny
    ad = LoraAdapter.init(args, LoraConfig(r=4, alpha=8), seed=7)
    s0, s1 = ne.train_session(ad), we.train_session(ad)
    shapes = [(2, 12), (2, 8), (1, 12), (2, 16), (2, 4)]
    for j, (b, t) in enumerate(shapes):
        tok, lab = batch(args, B=b, T=t, seed=20 + j)
        s0.step([Batch.of(tok, lab)], 5e-3, 1.0)
        s1.step([Batch.of(tok, lab)], 5e-3, 1.0)
        assert s0.evaluate(Batch.of(tok, lab))[1] == s1.evaluate(Batch.of(tok, lab))[1]
    assert [k for k in s1._programs if k[0] != "eval"] == [(2, 16)]
    assert [k for k in s1._programs if k[0] == "eval"] == [("eval", 2, 16)]
    s2 = we.train_session(ad)  # as Trainer does: the run's largest micro-batch up front, one program throughout
    s2.reserve(2, 16)
    tok, lab = batch(args, B=1, T=8, seed=30)
    s2.step([Batch.of(tok, lab)], 5e-3, 1.0)
    assert [k for k in s2._programs if k[0] != "eval"] == [(2, 16)]
    s2.close()
    m0, m1 = s0.metrics(), s1.metrics()
    assert max(abs(a.loss_sum - b.loss_sum) / abs(a.loss_sum) for a, b in zip(m0, m1)) <= 1e-4
    w0, w1 = s0.state_dict(), s1.state_dict()
    assert max(rel(w1[k], w0[k]) for k in w0 if k.endswith((".A", ".B"))) <= 1e-3
