// Causal GQA attention, one invocation per (batch, head, query): online softmax over the visible keys,
// so memory is linear in T (only the output and the logsumexp are stored). Keys live in a cache laid out
// (B, TK, KV, HD); training passes its fresh k/v with TK = T. dyn[0] = position of the first query.
// backward_dq also stores delta = rowsum(dout * out); backward_dkv then runs one invocation per
// (batch, kv head, key) over the queries that see it — no atomics.
const HD: u32 = {{HD}}u;
struct P { B: u32, T: u32, TK: u32, H: u32, KV: u32, has_seg: u32, scale: f32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;          // (B, T, H, HD), roped
@group(0) @binding(2) var<storage, read> k: array<f32>;          // (B, TK, KV, HD), roped
@group(0) @binding(3) var<storage, read> v: array<f32>;          // (B, TK, KV, HD)
@group(0) @binding(4) var<storage, read> seg: array<i32>;        // (B, TK) segment ids when packing
@group(0) @binding(5) var<storage, read> dyn: array<u32>;        // [t_off, seed, ...]
@group(0) @binding(6) var<storage, read_write> out: array<f32>;  // (B, T, H, HD)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;  // (B, H, T)
@group(0) @binding(8) var<storage, read> dout: array<f32>;       // (B, T, H, HD)
@group(0) @binding(9) var<storage, read_write> delta: array<f32>; // (B, H, T)
@group(0) @binding(10) var<storage, read_write> dq: array<f32>;  // (B, T, H, HD)
@group(0) @binding(11) var<storage, read_write> dk: array<f32>;  // (B, TK, KV, HD)
@group(0) @binding(12) var<storage, read_write> dv: array<f32>;
@group(0) @binding(13) var<storage, read> knew: array<f32>;      // (B, T, KV*HD) for kv_store
@group(0) @binding(14) var<storage, read> vnew: array<f32>;
@group(0) @binding(15) var<storage, read_write> kc: array<f32>;  // (B, TK, KV*HD)
@group(0) @binding(16) var<storage, read_write> vc: array<f32>;

fn visible(b: u32, qi: u32, j: u32) -> bool {
    return p.has_seg == 0u || seg[b * p.TK + j] == seg[b * p.TK + qi];
}

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = gid.x + gid.y * nw.x * 64u;
    if (idx >= p.B * p.H * p.T) { return; }
    let i = idx % p.T;
    let h = (idx / p.T) % p.H;
    let b = idx / (p.T * p.H);
    let kvh = h / (p.H / p.KV);
    let qi = dyn[0] + i;
    let qb = ((b * p.T + i) * p.H + h) * HD;
    var qv: array<f32, HD>;
    var acc: array<f32, HD>;
    for (var d = 0u; d < HD; d++) { qv[d] = q[qb + d]; acc[d] = 0.0; }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j <= qi; j++) {
        if (!visible(b, qi, j)) { continue; }
        let kb = ((b * p.TK + j) * p.KV + kvh) * HD;
        var s = 0.0;
        for (var d = 0u; d < HD; d++) { s += qv[d] * k[kb + d]; }
        s *= p.scale;
        let mn = max(m, s);
        let corr = exp(m - mn);
        let e = exp(s - mn);
        l = l * corr + e;
        for (var d = 0u; d < HD; d++) { acc[d] = acc[d] * corr + e * v[kb + d]; }
        m = mn;
    }
    for (var d = 0u; d < HD; d++) { out[qb + d] = acc[d] / l; }
    lse[(b * p.H + h) * p.T + i] = m + log(l);
}

@compute @workgroup_size(64)
fn backward_dq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = gid.x + gid.y * nw.x * 64u;
    if (idx >= p.B * p.H * p.T) { return; }
    let i = idx % p.T;
    let h = (idx / p.T) % p.H;
    let b = idx / (p.T * p.H);
    let kvh = h / (p.H / p.KV);
    let qi = dyn[0] + i;
    let qb = ((b * p.T + i) * p.H + h) * HD;
    var go: array<f32, HD>;
    var acc: array<f32, HD>;
    var dl = 0.0;
    for (var d = 0u; d < HD; d++) {
        go[d] = dout[qb + d];
        acc[d] = 0.0;
        dl += go[d] * out[qb + d];
    }
    let li = (b * p.H + h) * p.T + i;
    delta[li] = dl;
    let L = lse[li];
    for (var j = 0u; j <= qi; j++) {
        if (!visible(b, qi, j)) { continue; }
        let kb = ((b * p.TK + j) * p.KV + kvh) * HD;
        var s = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < HD; d++) {
            s += q[qb + d] * k[kb + d];
            dp += go[d] * v[kb + d];
        }
        let pr = exp(s * p.scale - L);
        let ds = pr * (dp - dl) * p.scale;
        for (var d = 0u; d < HD; d++) { acc[d] += ds * k[kb + d]; }
    }
    for (var d = 0u; d < HD; d++) { dq[qb + d] = acc[d]; }
}

@compute @workgroup_size(64)
fn backward_dkv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = gid.x + gid.y * nw.x * 64u;
    if (idx >= p.B * p.KV * p.TK) { return; }
    let j = idx % p.TK;
    let kvh = (idx / p.TK) % p.KV;
    let b = idx / (p.TK * p.KV);
    let g = p.H / p.KV;
    let kb = ((b * p.TK + j) * p.KV + kvh) * HD;
    // k and v of this key are re-read from memory (cached) rather than held: two HD-float accumulators
    // are as many registers as a GPU invocation keeps without spilling
    var ak: array<f32, HD>;
    var av: array<f32, HD>;
    for (var d = 0u; d < HD; d++) { ak[d] = 0.0; av[d] = 0.0; }
    let t0 = dyn[0];
    for (var hh = 0u; hh < g; hh++) {
        let h = kvh * g + hh;
        for (var i = select(0u, j - t0, j >= t0); i < p.T; i++) {
            if (!visible(b, t0 + i, j)) { continue; }
            let qb = ((b * p.T + i) * p.H + h) * HD;
            let li = (b * p.H + h) * p.T + i;
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < HD; d++) {
                s += q[qb + d] * k[kb + d];
                dp += dout[qb + d] * v[kb + d];
            }
            let pr = exp(s * p.scale - lse[li]);
            let ds = pr * (dp - delta[li]) * p.scale;
            for (var d = 0u; d < HD; d++) {
                av[d] += pr * dout[qb + d];
                ak[d] += ds * q[qb + d];
            }
        }
    }
    for (var d = 0u; d < HD; d++) { dk[kb + d] = ak[d]; dv[kb + d] = av[d]; }
}

// Append this step's roped k and v (B, T, KV*HD) to the cache at position dyn[0].
@compute @workgroup_size(64)
fn kv_store(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = gid.x + gid.y * nw.x * 64u;
    let w = p.KV * HD;
    if (idx >= p.B * p.T * w) { return; }
    let c = idx % w;
    let t = (idx / w) % p.T;
    let b = idx / (w * p.T);
    let dst = (b * p.TK + dyn[0] + t) * w + c;
    kc[dst] = knew[idx];
    vc[dst] = vnew[idx];
}

// Decoding on hardware GPUs (flash-decoding): one workgroup of LANES lanes per (batch, head, query) splits
// the keys, each lane keeps its own online-softmax state, then the states merge in workgroup memory —
// so a long context is not one invocation's serial loop.
override LANES: u32 = 32u;  // set at pipeline creation so that LANES * HD floats fit workgroup memory
var<workgroup> sm: array<f32, LANES>;
var<workgroup> sl: array<f32, LANES>;
var<workgroup> sacc: array<f32, LANES * HD>;

@compute @workgroup_size(LANES)
fn forward_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(num_workgroups) nw: vec3<u32>) {
    let lane = lid.x;
    let raw = wid.x + wid.y * nw.x;
    let total = p.B * p.H * p.T;
    let idx = min(raw, total - 1u);  // no early return: every lane must reach the barriers
    let i = idx % p.T;
    let h = (idx / p.T) % p.H;
    let b = idx / (p.T * p.H);
    let kvh = h / (p.H / p.KV);
    let qi = dyn[0] + i;
    let qb = ((b * p.T + i) * p.H + h) * HD;
    var qv: array<f32, HD>;
    var acc: array<f32, HD>;
    for (var d = 0u; d < HD; d++) { qv[d] = q[qb + d]; acc[d] = 0.0; }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = lane; j <= qi; j += LANES) {
        if (!visible(b, qi, j)) { continue; }
        let kb = ((b * p.TK + j) * p.KV + kvh) * HD;
        var s = 0.0;
        for (var d = 0u; d < HD; d++) { s += qv[d] * k[kb + d]; }
        s *= p.scale;
        let mn = max(m, s);
        let corr = exp(m - mn);
        let e = exp(s - mn);
        l = l * corr + e;
        for (var d = 0u; d < HD; d++) { acc[d] = acc[d] * corr + e * v[kb + d]; }
        m = mn;
    }
    sm[lane] = m;
    sl[lane] = l;
    for (var d = 0u; d < HD; d++) { sacc[lane * HD + d] = acc[d]; }
    workgroupBarrier();
    for (var w = LANES / 2u; w > 0u; w >>= 1u) {
        if (lane < w) {
            let m1 = sm[lane];
            let m2 = sm[lane + w];
            let mn = max(m1, m2);
            let c1 = exp(m1 - mn);
            let c2 = exp(m2 - mn);
            sl[lane] = sl[lane] * c1 + sl[lane + w] * c2;
            for (var d = 0u; d < HD; d++) {
                sacc[lane * HD + d] = sacc[lane * HD + d] * c1 + sacc[(lane + w) * HD + d] * c2;
            }
            sm[lane] = mn;
        }
        workgroupBarrier();
    }
    if (raw < total) {
        for (var d = lane; d < HD; d += LANES) { out[qb + d] = sacc[d] / sl[0]; }
        if (lane == 0u) { lse[(b * p.H + h) * p.T + i] = sm[0] + log(sl[0]); }
    }
}

// Decoding, the default on hardware GPUs (flash-decoding): the keys of each (batch, head, query) are split
// over S workgroups (grid (S, rows)) so that a short loop, not one long dependent chain, meets the memory
// latency; each writes its online-softmax state (m, l, acc[HD]), and decode_merge combines the S states.
// Within a workgroup of HD threads the keys go in tiles of HD: thread t scores key j0 + t (q read from
// workgroup memory), then thread d accumulates output dimension d. No per-thread arrays.
@group(0) @binding(17) var<storage, read_write> pml: array<f32>;   // (rows, S, 2) partial max, sum
@group(0) @binding(18) var<storage, read_write> pacc: array<f32>;  // (rows, S, HD) partial outputs
var<workgroup> qs: array<f32, HD>;
var<workgroup> ps: array<f32, HD>;

fn decode_row(idx: u32) -> vec4<u32> {  // (b, h, i, first element of q / out)
    let i = idx % p.T;
    let h = (idx / p.T) % p.H;
    let b = idx / (p.T * p.H);
    return vec4<u32>(b, h, i, ((b * p.T + i) * p.H + h) * HD);
}

@compute @workgroup_size(HD)
fn decode_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(num_workgroups) nw: vec3<u32>) {
    let t = lid.x;
    let S = nw.x;
    let split = wid.x;
    let idx = wid.y + wid.z * nw.y;  // (grid y, z) cover the rows
    let valid = idx < p.B * p.H * p.T;
    let r = decode_row(min(idx, p.B * p.H * p.T - 1u));
    let b = r.x;
    let kvh = r.y / (p.H / p.KV);
    let qi = dyn[0] + r.z;
    qs[t] = q[r.w + t];
    workgroupBarrier();
    let n = qi + 1u;
    let per = (n + S - 1u) / S;
    let lo = min(split * per, n);
    let hi = min(lo + per, n);
    var m = -3.0e38;
    var l = 0.0;
    var acc = 0.0;
    for (var j0 = lo; j0 < hi; j0 += HD) {
        let j = j0 + t;
        var s = -3.0e38;  // not a key: weight 0 below
        if (j < hi && visible(b, qi, j)) {
            let kb = ((b * p.TK + j) * p.KV + kvh) * HD;
            var dot = 0.0;
            for (var d = 0u; d < HD; d++) { dot += qs[d] * k[kb + d]; }
            s = dot * p.scale;
        }
        ps[t] = s;
        workgroupBarrier();
        let cnt = min(HD, hi - j0);
        var mt = m;
        for (var u = 0u; u < cnt; u++) { mt = max(mt, ps[u]); }
        let corr = exp(m - mt);
        l *= corr;
        acc *= corr;
        for (var u = 0u; u < cnt; u++) {
            let su = ps[u];
            if (su > -3.0e38) {
                let e = exp(su - mt);
                l += e;
                acc += e * v[((b * p.TK + j0 + u) * p.KV + kvh) * HD + t];
            }
        }
        m = mt;
        workgroupBarrier();  // every thread has read ps before the next tile writes it
    }
    if (valid) {
        pacc[(idx * S + split) * HD + t] = acc;
        if (t == 0u) {
            pml[(idx * S + split) * 2u] = m;
            pml[(idx * S + split) * 2u + 1u] = l;
        }
    }
}

override SPLITS: u32 = 16u;  // decode_merge's split count (kernels.DECODE_SPLITS sets it)

@compute @workgroup_size(HD)
fn decode_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(num_workgroups) nw: vec3<u32>) {
    let t = lid.x;
    let idx = wid.x + wid.y * nw.x;
    if (idx >= p.B * p.H * p.T) { return; }
    let S = SPLITS;  // a pipeline constant: the loops over the splits unroll, their loads in flight together
    var mx = -3.0e38;
    for (var s = 0u; s < S; s++) { mx = max(mx, pml[(idx * S + s) * 2u]); }
    var l = 0.0;
    var acc = 0.0;
    for (var s = 0u; s < S; s++) {
        let c = exp(pml[(idx * S + s) * 2u] - mx);  // an empty split: l = acc = 0
        l += c * pml[(idx * S + s) * 2u + 1u];
        acc += c * pacc[(idx * S + s) * HD + t];
    }
    let r = decode_row(idx);
    out[r.w + t] = acc / l;
    if (t == 0u) { lse[(r.x * p.H + r.y) * p.T + r.z] = mx + log(l); }
}
