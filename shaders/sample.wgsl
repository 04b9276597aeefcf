// Next-token choice on the GPU, so that decoding never reads logits back. The sampling settings live in the
// small storage buffer `samp` (not in the uniform), so one recorded program (pipelines + bind groups) serves
// every request: the host rewrites `samp` once per request (kernels.sampling_words).
//
// entry `sample` (grid (B,), one workgroup of 256 per row b; l_i = logits[b*ld + i], i < V):
//   T = temperature <= 0 (or NaN): argmax of l (ties: the lowest id, as numpy.argmax); top_k/top_p ignored.
//   else, with z_i = l_i / T:
//   - top-k: keep {i : l_i >= t_k}, t_k the k-th largest logit (top_k == 0 or >= V: all). Ties at the
//     k-th value are all kept (the set may hold more than k ids). Thresholds compare logits, which order
//     tokens exactly as z does (division by T > 0 is monotone).
//   - top-p (top_p < 1): of the top-k set, keep {i : l_i >= t_p}, t_p the largest logit value whose
//     set {l_i >= t_p} holds softmax mass (renormalised over the top-k set) >= top_p: the smallest set of
//     highest-probability tokens reaching top_p, again with every token equal to the last one kept.
//     top_p <= 0 keeps only the maximum (and its ties); top_p >= 1 keeps the whole top-k set.
//   Both thresholds are found by bisection over the order-preserving u32 encoding of f32 (okey), not by
//   sorting: <= 32 bisection probes each (top-p: plus the first probe below), every probe one pass over
//   the row or the candidates and one workgroup reduction. After each probe the
//   interval's ends snap to the nearest keys present in the row, so the search usually ends well before 32
//   (top-k also stops as soon as a cut holds exactly k); once the lower end keeps <= CAP tokens they are
//   copied (in a fixed order) to workgroup memory and the remaining probes and the final choice read only
//   those. top-p's first probe is a cut at e_i ~ (1 - top_p) / (2n) (n tokens left), which keeps the
//   nucleus with a wide margin, so a peaked distribution is compacted at once.
//   Mass: e_i = exp((l_i - l_max) / T), summed in f32.
//   - choice: argmax over kept i of z_i + g_i, g_i = -log(-log(u_i)) Gumbel noise,
//     u_i = (f32(h >> 8) + 0.5) / 2^24, h = pcg(pcg(pcg(pcg(seed) ^ counter) ^ b) ^ pcg(i)):
//     an exact sample from softmax(z) renormalised over the kept set.
//   The id goes to ids[(counter % ring) * B + b] and tok[b] (the next decode step's input token).
// entry `advance` (grid (1,), one invocation; runs as its own dispatch after `sample`): samp[1] += 1,
//   dyn[0] += p.advance, pos[b] = i32(dyn[0]) for b < p.V (for this entry P.V carries the row count B).
// loralabd.engine.reference.sample_token is the numpy oracle of exactly this algorithm.
struct P { V: u32, ld: u32, ring: u32, advance: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> logits: array<f32>;        // (B, ld), row b uses logits[b*ld .. b*ld+V)
@group(0) @binding(2) var<storage, read_write> samp: array<u32>;    // [seed, counter, temperature (f32 bits), top_k, top_p (f32 bits), 0, 0, 0]
@group(0) @binding(3) var<storage, read_write> ids: array<i32>;     // (ring, B): the chosen id of row b goes to ids[(counter % ring) * B + b]
@group(0) @binding(4) var<storage, read_write> tok: array<i32>;     // (B,) also written there: the next decode step's input token
@group(0) @binding(5) var<storage, read_write> dyn: array<u32>;     // [kv position, ...]
@group(0) @binding(6) var<storage, read_write> pos: array<i32>;     // (B,) next step's rope positions

// Workgroup reduction of (sum f32, sum f32, sum u32, min u32, max u32): 256 -> 16 -> 1 in a fixed order (so
// the f32 sums are the same on every run), three barriers; every invocation calls it in uniform control flow
// and gets the uniform result.
struct R { s: f32, s2: f32, c: u32, mn: u32, mx: u32 }
var<workgroup> ws: array<f32, 256>;
var<workgroup> ws2: array<f32, 256>;
var<workgroup> wc: array<u32, 256>;
var<workgroup> wn: array<u32, 256>;
var<workgroup> wx: array<u32, 256>;
var<workgroup> res: R;
var<workgroup> cfg: array<u32, 4>;

const CAP: u32 = 1024u;                 // compacted candidates (logit, id), 8 KiB
var<workgroup> cl: array<f32, CAP>;
var<workgroup> ci: array<u32, CAP>;

// A pass over the row: each invocation reads 16 values (256 apart, so a subgroup reads consecutive words)
// before it uses any, so that 16 loads are in flight (a single workgroup per row has little else to hide
// latency with); ids past V are clamped to the row's last value and masked by the caller (i >= V).
struct L16 { a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32> }
const STEP: u32 = 4096u;

fn ld4(r: u32, last: u32) -> vec4<f32> {
    return vec4<f32>(logits[min(r, last)], logits[min(r + 256u, last)], logits[min(r + 512u, last)],
                     logits[min(r + 768u, last)]);
}

fn load16(row: u32, base: u32) -> L16 {
    let last = row + p.V - 1u;
    let r = row + base;
    return L16(ld4(r, last), ld4(r + 1024u, last), ld4(r + 2048u, last), ld4(r + 3072u, last));
}

fn reduce(lid: u32, v: R) -> R {
    ws[lid] = v.s;
    ws2[lid] = v.s2;
    wc[lid] = v.c;
    wn[lid] = v.mn;
    wx[lid] = v.mx;
    workgroupBarrier();
    if (lid < 16u) {
        let a = lid * 16u;
        var r = R(ws[a], ws2[a], wc[a], wn[a], wx[a]);
        for (var j = a + 1u; j < a + 16u; j += 1u) {
            r = R(r.s + ws[j], r.s2 + ws2[j], r.c + wc[j], min(r.mn, wn[j]), max(r.mx, wx[j]));
        }
        ws[a] = r.s;
        ws2[a] = r.s2;
        wc[a] = r.c;
        wn[a] = r.mn;
        wx[a] = r.mx;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var r = R(ws[0], ws2[0], wc[0], wn[0], wx[0]);
        for (var j = 16u; j < 256u; j += 16u) {
            r = R(r.s + ws[j], r.s2 + ws2[j], r.c + wc[j], min(r.mn, wn[j]), max(r.mx, wx[j]));
        }
        res = r;
    }
    return workgroupUniformLoad(&res);
}

fn pcg(v: u32) -> u32 {
    let s = v * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

// Order-preserving u32 encoding of an f32 (-0 is read as +0): a < b  <=>  okey(a) < okey(b).
fn okey(x: f32) -> u32 {
    var u = bitcast<u32>(x);
    if (u == 0x80000000u) { u = 0u; }
    return select(u | 0x80000000u, ~u, (u >> 31u) == 1u);
}

fn unkey(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k ^ 0x80000000u, (k >> 31u) == 1u));
}

// One element (id i, ignored when i >= V) of a probe at key K: mass (s) and count (c) of {okey >= K},
// smallest key >= K (mn), largest key < K (mx), and mass (s2) of {okey >= K2} (K2 <= K).
fn visit(r: ptr<function, R>, l: f32, i: u32, K: u32, K2: u32, mass: bool, lmax: f32, T: f32) {
    if (i >= p.V) { return; }
    let k = okey(l);
    var e = 0.0;
    if (mass && k >= K2) {
        e = exp((l - lmax) / T);
        (*r).s2 += e;
    }
    if (k >= K) {
        (*r).c += 1u;
        (*r).mn = min((*r).mn, k);
        (*r).s += e;
    } else {
        (*r).mx = max((*r).mx, k);
    }
}

fn visit4(r: ptr<function, R>, v: vec4<f32>, i: u32, K: u32, K2: u32, mass: bool, lmax: f32, T: f32) {
    visit(r, v.x, i, K, K2, mass, lmax, T);
    visit(r, v.y, i + 256u, K, K2, mass, lmax, T);
    visit(r, v.z, i + 512u, K, K2, mass, lmax, T);
    visit(r, v.w, i + 768u, K, K2, mass, lmax, T);
}

// Phase 0's element: min / max key and this invocation's count.
fn span(r: ptr<function, R>, l: f32, i: u32) {
    if (i >= p.V) { return; }
    let k = okey(l);
    (*r).mn = min((*r).mn, k);
    (*r).mx = max((*r).mx, k);
    (*r).c += 1u;
}

fn span4(r: ptr<function, R>, v: vec4<f32>, i: u32) {
    span(r, v.x, i);
    span(r, v.y, i + 256u);
    span(r, v.z, i + 512u);
    span(r, v.w, i + 768u);
}

// A probe's share of this invocation over the whole row (its count is also this invocation's share of
// {okey >= K}, which compact needs), or over the n compacted candidates.
fn probe_row(lid: u32, row: u32, K: u32, K2: u32, mass: bool, lmax: f32, T: f32) -> R {
    var r = R(0.0, 0.0, 0u, 0xffffffffu, 0u);
    for (var base = lid; base < p.V; base += STEP) {
        let x = load16(row, base);
        visit4(&r, x.a, base, K, K2, mass, lmax, T);
        visit4(&r, x.b, base + 1024u, K, K2, mass, lmax, T);
        visit4(&r, x.c, base + 2048u, K, K2, mass, lmax, T);
        visit4(&r, x.d, base + 3072u, K, K2, mass, lmax, T);
    }
    return r;
}

fn probe_cand(lid: u32, n: u32, K: u32, K2: u32, mass: bool, lmax: f32, T: f32) -> R {
    var r = R(0.0, 0.0, 0u, 0xffffffffu, 0u);
    for (var j = lid; j < n; j += 256u) { visit(&r, cl[j], 0u, K, K2, mass, lmax, T); }
    return r;
}

// Copy the tokens with okey >= K (this invocation holds `my` of them) to (cl, ci): invocation by invocation,
// each in its own index order, so the layout (and every later f32 sum) is the same on every run.
fn compact(lid: u32, row: u32, K: u32, my: u32) {
    wc[lid] = my;
    workgroupBarrier();
    if (lid < 16u) {
        var s = 0u;
        for (var j = lid * 16u; j < lid * 16u + 16u; j += 1u) {
            let t = wc[j];
            wc[j] = s;
            s += t;
        }
        wx[lid] = s;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var s = 0u;
        for (var j = 0u; j < 16u; j += 1u) {
            let t = wx[j];
            wx[j] = s;
            s += t;
        }
    }
    workgroupBarrier();
    var off = wc[lid] + wx[lid / 16u];
    for (var base = lid; base < p.V; base += STEP) {
        let x = load16(row, base);
        put4(&off, x.a, base, K);
        put4(&off, x.b, base + 1024u, K);
        put4(&off, x.c, base + 2048u, K);
        put4(&off, x.d, base + 3072u, K);
    }
    workgroupBarrier();
}

fn put(off: ptr<function, u32>, l: f32, i: u32, K: u32) {
    if (i < p.V && okey(l) >= K) {
        cl[*off] = l;
        ci[*off] = i;
        *off += 1u;
    }
}

fn put4(off: ptr<function, u32>, v: vec4<f32>, i: u32, K: u32) {
    put(off, v.x, i, K);
    put(off, v.y, i + 256u, K);
    put(off, v.z, i + 512u, K);
    put(off, v.w, i + 768u, K);
}

// (ws, wc)[a] = the better of entries a and j: the larger value, the lower id on ties; no id (all ones) loses.
fn better(a: u32, j: u32) {
    let bj = wc[j];
    let ba = wc[a];
    if (bj != 0xffffffffu && (ba == 0xffffffffu || ws[j] > ws[a] || (ws[j] == ws[a] && bj < ba))) {
        ws[a] = ws[j];
        wc[a] = bj;
    }
}

fn take(bs: ptr<function, f32>, bi: ptr<function, u32>, s: f32, i: u32) {
    if (*bi == 0xffffffffu || s > *bs || (s == *bs && i < *bi)) {
        *bs = s;
        *bi = i;
    }
}

// The final pass's element: greedy on l, else z + Gumbel noise over the kept tokens.
fn pick(bs: ptr<function, f32>, bi: ptr<function, u32>, l: f32, i: u32, sampling: bool, thr: u32, key: u32, T: f32) {
    if (i >= p.V) { return; }
    if (!sampling) {
        take(bs, bi, l, i);
    } else if (okey(l) >= thr) {
        take(bs, bi, l / T + gumbel(key, i), i);
    }
}

fn pick4(bs: ptr<function, f32>, bi: ptr<function, u32>, v: vec4<f32>, i: u32, sampling: bool, thr: u32, key: u32,
         T: f32) {
    pick(bs, bi, v.x, i, sampling, thr, key, T);
    pick(bs, bi, v.y, i + 256u, sampling, thr, key, T);
    pick(bs, bi, v.z, i + 512u, sampling, thr, key, T);
    pick(bs, bi, v.w, i + 768u, sampling, thr, key, T);
}

fn gumbel(key: u32, i: u32) -> f32 {
    let u = (f32(pcg(key ^ pcg(i)) >> 8u) + 0.5) * (1.0 / 16777216.0);
    return -log(-log(u));
}

@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_id) l3: vec3<u32>, @builtin(workgroup_id) w3: vec3<u32>,
          @builtin(num_workgroups) n3: vec3<u32>) {
    let lid = l3.x;
    let b = w3.x;
    let B = n3.x;
    let row = b * p.ld;
    if (lid == 0u) {
        cfg = array<u32, 4>(samp[2], samp[3], samp[4], 0u);
    }
    let c = workgroupUniformLoad(&cfg);
    let T = bitcast<f32>(c[0]);
    let top_k = c[1];
    let top_p = bitcast<f32>(c[2]);
    let counter = samp[1];
    let sampling = T > 0.0;
    let use_k = top_k > 0u && top_k < p.V;
    let use_p = !(top_p >= 1.0);

    var thr = 0u;        // kept: okey(l_i) >= thr (0: everything)
    var n = 0u;          // > 0: the candidates (every kept token among them) are in (cl, ci)[0..n)
    if (sampling && (use_k || use_p)) {
        // One loop, one reduction and one compaction site (lavapipe pays for every inlined barrier).
        // phase 0: max / min keys; 1: top-k search; 2: top-p's first probe; 3: top-p search.
        // Invariant of both searches: lo and hi are keys present in the row, the answer is in [lo, hi],
        // lo satisfies the search's condition, cnt = count(okey >= lo), my = this invocation's share of it.
        var phase = 0u;
        var lo = 0u;
        var hi = 0u;
        var cnt = p.V;
        var my = 0u;
        var kmax = 0u;
        var lmax = 0.0;
        var goal = 0.0;
        loop {
            var K = 0u;
            var K2 = 0u;
            if (phase == 1u && lo >= hi) {
                if (!use_p) { break; }
                phase = 2u;
                hi = kmax;
            }
            if (phase == 3u && lo >= hi) { break; }
            if (phase == 2u) {
                // the cut at e ~ (1 - top_p) / (2 cnt): with Z >= 1 (the maximum's e is 1) the tokens below
                // it hold < (1 - top_p) Z / 2, so it normally passes, and may allow compaction at once
                let eps = max(1.0 - max(top_p, 0.0), 1e-30) / (2.0 * f32(cnt));
                K = select(min(max(okey(lmax + T * log(eps)), lo + 1u), hi), lo, lo >= hi);
                K2 = lo;   // mass(okey >= lo): the top-k set's total
            } else if (phase != 0u) {
                let d = hi - lo;
                K = lo + (d >> 1u) + (d & 1u);  // ceil midpoint, lo < K <= hi, no overflow
                K2 = K;
            }
            var r = R(0.0, 0.0, 0u, 0xffffffffu, 0u);
            if (phase == 0u) {
                for (var base = lid; base < p.V; base += STEP) {
                    let x = load16(row, base);
                    span4(&r, x.a, base);
                    span4(&r, x.b, base + 1024u);
                    span4(&r, x.c, base + 2048u);
                    span4(&r, x.d, base + 3072u);
                }
            } else if (n > 0u) {
                r = probe_cand(lid, n, K, K2, phase >= 2u, lmax, T);
            } else {
                r = probe_row(lid, row, K, K2, phase >= 2u, lmax, T);
            }
            let q = reduce(lid, r);
            if (phase == 0u) {
                lo = q.mn;
                kmax = q.mx;
                hi = kmax;
                lmax = unkey(kmax);
                my = r.c;
                phase = select(2u, 1u, use_k);
            } else {
                if (phase == 2u) {
                    goal = top_p * q.s2;
                    phase = 3u;
                }
                let ok = select(q.c >= top_k, q.s >= goal, phase == 3u);
                if (ok) {
                    lo = q.mn;                          // the same set as {okey >= K}
                    cnt = q.c;
                    my = r.c;
                    if (phase == 1u && q.c == top_k) { hi = lo; }  // exactly the top-k set: done
                } else {
                    hi = q.mx;
                }
            }
            if (n == 0u && cnt <= CAP) {
                compact(lid, row, lo, my);
                n = cnt;
            }
        }
        thr = lo;
    }

    // argmax over kept i of z_i + g_i (sampling) or of l_i (greedy); ties to the lowest id
    let key = pcg(pcg(pcg(samp[0]) ^ counter) ^ b);
    var bs = 0.0;
    var bi = 0xffffffffu;
    if (n > 0u) {
        for (var j = lid; j < n; j += 256u) {
            let l = cl[j];
            if (okey(l) >= thr) {
                let i = ci[j];
                take(&bs, &bi, l / T + gumbel(key, i), i);
            }
        }
    } else {
        for (var base = lid; base < p.V; base += STEP) {
            let x = load16(row, base);
            pick4(&bs, &bi, x.a, base, sampling, thr, key, T);
            pick4(&bs, &bi, x.b, base + 1024u, sampling, thr, key, T);
            pick4(&bs, &bi, x.c, base + 2048u, sampling, thr, key, T);
            pick4(&bs, &bi, x.d, base + 3072u, sampling, thr, key, T);
        }
    }
    ws[lid] = bs;
    wc[lid] = bi;
    workgroupBarrier();
    if (lid < 16u) {
        for (var j = lid * 16u + 1u; j < lid * 16u + 16u; j += 1u) {
            better(lid * 16u, j);
        }
    }
    workgroupBarrier();
    if (lid == 0u) {
        for (var j = 16u; j < 256u; j += 16u) {
            better(0u, j);
        }
        let id = i32(wc[0]);
        ids[(counter % max(p.ring, 1u)) * B + b] = id;
        tok[b] = id;
    }
}

@compute @workgroup_size(1)
fn advance() {
    samp[1] = samp[1] + 1u;
    let t = dyn[0] + p.advance;
    dyn[0] = t;
    for (var b = 0u; b < p.V; b += 1u) {
        pos[b] = i32(t);
    }
}
