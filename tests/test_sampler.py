"""GPU token sampling (shaders/sample.wgsl, kernels.sample) against reference.sample_token, on lavapipe in CI.

The GPU and the numpy reference agree token for token: the integer parts (PCG hash, thresholds over the
order-preserving u32 encoding of f32) are bit-exact; the f32 parts (exp, log, sums in another order) can
only flip a choice when two Gumbel-perturbed scores, or a mass and top_p * total, lie within ~1e-6 of each
other, which the fixed seeds below do not hit. Statistics: 4000 draws per setting (rows x counters, every
(counter, row) pair is its own hash key); each frequency within 0.03 of the renormalised softmax over the
kept set (>= 3.8 standard deviations at n = 4000), tokens outside the kept set never drawn.
"""

from __future__ import annotations

import numpy as np
import pytest

from loralabd.engine import reference as R

wgpu_rt = pytest.importorskip("loralabd.engine.webgpu.runtime")
K = pytest.importorskip("loralabd.engine.webgpu.kernels")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def rt():
    if not wgpu_rt.available():
        pytest.skip("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
    return wgpu_rt.get_runtime()


def up(rt, a, name="t"):
    a = np.ascontiguousarray(a)
    return rt.buffer(a.nbytes, name, a)


def get(rt, buf, n, dtype=np.int32):
    return rt.read(buf, dtype)[:n].copy()


def words(seed, T, k, p, counter=0):
    w = K.sampling_words(seed, T, k, p)
    w[1] = counter
    return w


def padded(z, ld, fill=1e30):
    """Rows of z in a (B, ld) buffer whose entries past V are larger than any logit: they must never be read."""
    B, V = z.shape
    out = np.full((B, ld), fill, np.float32)
    out[:, :V] = z
    return out


# --- (1) greedy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [300, 49152 + 7])
@pytest.mark.parametrize("B", [1, 3])
def test_greedy_is_argmax(rt, V, B):
    rng = np.random.default_rng(V + B)
    z = rng.standard_normal((B, V)).astype(np.float32)
    z[-1, V // 2] = z[-1, V - 1] = z[-1].max() + 1  # an exact tie: the lower id wins, as np.argmax
    if B > 1:
        z[0, 7] = z[0, 3] = z[0].max() + 2  # another one, in another row
    ld = V + 5
    ids, tok = up(rt, np.full(B, -1, np.int32)), up(rt, np.full(B, -1, np.int32))
    # top-k / top-p are ignored at temperature 0
    samp = up(rt, words(9, 0.0, 5, 0.5))
    rt.run(K.sample(rt, up(rt, padded(z, ld)), samp, ids, tok, None, None, B, V, ld, 1)[:1])
    want = list(np.argmax(z, axis=1))
    assert list(get(rt, ids, B)) == want
    assert list(get(rt, tok, B)) == want
    assert [R.sample_token(z[b], 0.0, 5, 0.5, 9, 0, b) for b in range(B)] == want


# --- (2) GPU == reference --------------------------------------------------------------------------------

def _cases():
    rng = np.random.default_rng(1234)
    cases = []
    for T in (0.7, 1.0, 1.5):
        for k in (0, 1, 5, 50):
            for p in (1.0, 0.9, 0.5):
                V = int(rng.integers(300, 2500))
                V += V % 256 == 0
                cases.append((V, T, k, p))
    # larger / odd ones: long rows (compacted after top-k; a flat nucleus of thousands that never fits the
    # 1024 candidates of workgroup memory; top-k beyond them), top_p 0 (the maximum only), top_k >= V, V = 1
    cases += [(49152 + 7, 1.0, 40, 0.95), (49152 + 7, 1.5, 0, 0.95, 1.0), (5003, 1.0, 2000, 1.0),
              (3001, 1.5, 0, 0.9, 1.0), (700, 1.0, 0, 0.0), (333, 0.8, 400, 0.7), (1, 1.0, 3, 0.5),
              (1000, 2.0, 200, 0.99), (517, 0.3, 0, 0.97)]
    out = []
    for V, T, k, p, *sc in cases:
        scale = sc[0] if sc else float(rng.choice([1.0, 3.0, 8.0]))
        z = (rng.standard_normal((2, V)) * scale).astype(np.float32)
        if V > 20:
            z[1, :10] = np.round(z[1, :10])  # a few exact ties among the top values
            z[1, 10:20] = z[1].max()
        out.append((z, T, k, p, int(rng.integers(0, 2**32)), int(rng.integers(0, 2**20))))
    return out


def test_gpu_matches_reference(rt):
    cases = _cases()
    assert len(cases) >= 40
    ops, bufs = [], []
    for z, T, k, p, seed, counter in cases:
        B, V = z.shape
        ids = up(rt, np.full(B, -1, np.int32))
        ops += K.sample(rt, up(rt, padded(z, V + 3)), up(rt, words(seed, T, k, p, counter)), ids,
                        up(rt, np.zeros(B, np.int32)), None, None, B, V, V + 3, 1)[:1]
        bufs.append(ids)
    rt.run(ops)
    bad = []
    for (z, T, k, p, seed, counter), ids in zip(cases, bufs):
        got = list(get(rt, ids, z.shape[0]))
        want = [R.sample_token(z[b], T, k, p, seed, counter, b) for b in range(z.shape[0])]
        for b in range(z.shape[0]):
            assert R.sample_keep(z[b], T, k, p)[got[b]], (z.shape, T, k, p, b, got[b])  # inside the kept set
        if got != want:
            bad.append((z.shape[1], T, k, p, seed, counter, got, want))
    assert not bad, bad


def test_reference_keep_semantics():
    z = np.array([1.2, -0.3, 2.0, 1.0, 0.4, 1.0, -1.5, 0.0], np.float32)
    assert np.flatnonzero(R.sample_keep(z, 1.0, 3, 1.0)).tolist() == [0, 2, 3, 5]  # tie at the 3rd value: both kept
    assert np.flatnonzero(R.sample_keep(z, 1.0, 1, 1.0)).tolist() == [2]
    assert np.flatnonzero(R.sample_keep(z, 1.0, 0, 0.7)).tolist() == [0, 2, 3, 5]  # tie at the top-p cut
    assert np.flatnonzero(R.sample_keep(z, 1.0, 0, 0.5)).tolist() == [0, 2]
    assert np.flatnonzero(R.sample_keep(z, 1.0, 0, 0.0)).tolist() == [2]  # top_p 0: the maximum only
    assert R.sample_keep(z, 1.0, 8, 1.0).all() and R.sample_keep(z, 1.0, 0, 1.0).all()
    u = R.pcg_uniform(1, 2, 3, np.arange(1000))
    assert u.dtype == np.float32 and 0.0 < u.min() and u.max() < 1.0
    k = R.order_key(np.array([-np.inf, -2.0, -0.0, 0.0, 1e-30, 3.0, np.inf], np.float32))
    assert (np.diff(k.astype(np.int64)) >= 0).all() and k[2] == k[3]


# --- (3) counter / kv position / rope positions, ring rows -----------------------------------------------

@pytest.mark.parametrize("advance", [1, 2])
def test_advance_and_ring(rt, advance):
    B, V, ring, c0, kv0, steps = 3, 300, 4, 5, 17, 3
    rng = np.random.default_rng(advance)
    z = rng.standard_normal((B, V)).astype(np.float32)
    samp = up(rt, words(77, 1.0, 50, 0.9, c0))
    ids = up(rt, np.full(ring * B, -7, np.int32))
    tok = up(rt, np.full(B, -1, np.int32))
    dyn = up(rt, np.array([kv0, 1234, 0, 0], np.uint32))
    pos = up(rt, np.full(B + 1, -5, np.int32))
    ops = K.sample(rt, up(rt, z), samp, ids, tok, dyn, pos, B, V, V, ring, advance=advance)
    assert len(ops) == 2
    rt.run(ops * steps)  # one recorded program replayed
    w = get(rt, samp, 8, np.uint32)
    assert w[1] == c0 + steps and list(w[[0, 2, 3, 4]]) == list(words(77, 1.0, 50, 0.9)[[0, 2, 3, 4]])
    assert list(get(rt, dyn, 4, np.uint32)) == [kv0 + advance * steps, 1234, 0, 0]
    assert list(get(rt, pos, B + 1)) == [kv0 + advance * steps] * B + [-5]  # only B entries
    got = get(rt, ids, ring * B).reshape(ring, B)
    for c in range(c0, c0 + steps):
        assert list(got[c % ring]) == [R.sample_token(z[b], 1.0, 50, 0.9, 77, c, b) for b in range(B)]
    assert list(got[(c0 + steps) % ring]) == [-7] * B  # the ring row not reached stays untouched
    assert list(get(rt, tok, B)) == list(got[(c0 + steps - 1) % ring])  # the last step's tokens


# --- (4) statistics -----------------------------------------------------------------------------------------

Z8 = np.array([1.2, -0.3, 2.0, 1.0, 0.4, 1.0, -1.5, 0.0], np.float32)


def _expected(T, kept):
    e = np.exp((Z8.astype(np.float64) - Z8.max()) / T)
    e[~np.isin(np.arange(8), kept)] = 0.0
    return e / e.sum()


# (T, top_k, top_p, kept ids worked out by hand from the sorted logits 2.0, 1.2, 1.0, 1.0, 0.4, 0.0, -0.3, -1.5)
STATS = [
    (0.7, 0, 1.0, [0, 1, 2, 3, 4, 5, 6, 7]),  # plain temperature
    (1.0, 0, 0.7, [0, 2, 3, 5]),              # top-p: masses .376, .544, (tie) .821 >= .7: both tied kept
    (1.3, 3, 0.6, [0, 2]),                    # top-k 3 keeps 4 (tie at 1.0), then top-p .405, .624 >= .6
]


def test_frequencies_match_the_kept_softmax(rt):
    rows, counters = 50, 80  # 4000 draws per setting
    ops, bufs = [], []
    logits = up(rt, np.tile(Z8, (rows, 1)))
    for i, (T, k, p, _) in enumerate(STATS):
        ids = up(rt, np.full(counters * rows, -1, np.int32))
        ops += K.sample(rt, logits, up(rt, words(1000 + i, T, k, p)), ids, up(rt, np.zeros(rows, np.int32)),
                        None, None, rows, 8, 8, counters) * counters
        bufs.append(ids)
    rt.run(ops)
    for (T, k, p, kept), ids in zip(STATS, bufs):
        assert np.flatnonzero(R.sample_keep(Z8, T, k, p)).tolist() == kept
        got = get(rt, ids, counters * rows)
        assert got.min() >= 0
        freq = np.bincount(got, minlength=8) / got.size
        want = _expected(T, kept)
        assert (freq[want == 0] == 0).all(), (T, k, p, freq)  # never outside the kept set
        assert np.abs(freq - want).max() <= 0.03, (T, k, p, freq, want)


# --- (5) seeds ---------------------------------------------------------------------------------------------

def test_same_seed_same_tokens(rt):
    B, V, steps = 2, 300, 12
    z = np.random.default_rng(5).standard_normal((B, V)).astype(np.float32) * 0.5
    logits = up(rt, z)

    def run(seed):
        ids = up(rt, np.full(steps * B, -1, np.int32))
        rt.run(K.sample(rt, logits, up(rt, words(seed, 1.0, 0, 0.95)), ids, up(rt, np.zeros(B, np.int32)),
                        None, None, B, V, V, steps) * steps)
        return get(rt, ids, steps * B).reshape(steps, B)

    a, a2, c = run(42), run(42), run(43)
    assert (a == a2).all()
    assert (a != c).any()
    assert len(set(a[:, 0].tolist())) > 1  # the counter moves the draw from step to step
    assert (a[:, 0] != a[:, 1]).any()      # so does the row
    assert a.tolist() == [[R.sample_token(z[b], 1.0, 0, 0.95, 42, t, b) for b in range(B)] for t in range(steps)]


def test_sampling_words():
    w = K.sampling_words(2**40 + 5, 0.7, 40, 0.9)
    assert w.dtype == np.uint32 and w.shape == (8,)
    assert w[0] == 5 and w[1] == 0 and w[3] == 40 and list(w[5:]) == [0, 0, 0]
    assert w[2:3].view(np.float32)[0] == np.float32(0.7) and w[4:5].view(np.float32)[0] == np.float32(0.9)
    assert K.sampling_words(1, 0.0, 0, 3.0)[4:5].view(np.float32)[0] == 1.0  # top_p > 1 is no cut
    for bad in [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=-0.1)]:
        with pytest.raises(ValueError):
            K.sampling_words(**{**dict(seed=0, temperature=1.0, top_k=0, top_p=1.0), **bad})
