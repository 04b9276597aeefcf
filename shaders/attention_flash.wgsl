// Flash attention for hardware GPUs (attention.wgsl is the one-invocation-per-query version lavapipe runs
// best): blocks of BQ queries x BQ keys (32, or 16 where workgroup memory is short) staged through
// workgroup memory, 256 invocations a workgroup.
//   forward      grid (query blocks, H, B): online softmax over key blocks, stores out and log-sum-exp
//   backward_dq  grid (query blocks, H, B): delta = rowsum(dout*out) (stored), dq = sum_j dS_ij k_j
//   backward_dkv grid (key blocks, KV, B): over the heads of the group and the query blocks that see the
//                keys, dv = sum_i P_ij dout_i, dk = sum_i dS_ij q_i, from the stored lse and delta (no atomics)
// Same bindings and layouts as attention.wgsl. Tiles are rows of HD floats as vec4, padded by one vec4 so
// that the 8 rows a quarter-warp reads at once fall on different banks. With TPR = 256/BQ invocations a
// row, invocation t computes scores of query t/TPR against keys t%TPR + TPR*c (c < BQ/TPR); accumulators
// (out, dq, dk, dv) hold row t/TPR, vec4 columns t%TPR + TPR*c.
const HD: u32 = {{HD}}u;
const NV: u32 = HD / 4u;       // vec4 per row
const RS: u32 = NV + 1u;       // padded tile row stride (vec4)
const BQ: u32 = {{BQ}}u;       // queries (and keys) per block
const TPR: u32 = 256u / BQ;    // invocations per row
const SC: u32 = BQ / TPR;      // scores per invocation
const NDV: u32 = {{NDV}}u;     // ceil(NV / TPR): vec4 columns of a row per invocation (1 or 2; NDV2 set for 2)
const SS: u32 = BQ + 1u;       // score tile row stride
const NEG: f32 = -1.0e30;      // masked score

struct P { B: u32, T: u32, TK: u32, H: u32, KV: u32, has_seg: u32, scale: f32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;          // (B, T, H, HD), roped
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;          // (B, TK, KV, HD), roped
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;          // (B, TK, KV, HD)
@group(0) @binding(4) var<storage, read> seg: array<i32>;              // (B, TK) segment ids when packing
@group(0) @binding(5) var<storage, read> dyn: array<u32>;              // [t_off, ...]
@group(0) @binding(6) var<storage, read_write> out: array<vec4<f32>>;  // (B, T, H, HD)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;        // (B, H, T)
@group(0) @binding(8) var<storage, read> dout: array<vec4<f32>>;       // (B, T, H, HD)
@group(0) @binding(9) var<storage, read_write> delta: array<f32>;      // (B, H, T)
@group(0) @binding(10) var<storage, read_write> dq: array<vec4<f32>>;  // (B, T, H, HD)
@group(0) @binding(11) var<storage, read_write> dk: array<vec4<f32>>;  // (B, TK, KV, HD)
@group(0) @binding(12) var<storage, read_write> dv: array<vec4<f32>>;

var<workgroup> ta: array<vec4<f32>, {{TILE}}>;  // BQ * RS: q block
var<workgroup> tb: array<vec4<f32>, {{TILE}}>;  // dout block
var<workgroup> tk: array<vec4<f32>, {{TILE}}>;  // k block
var<workgroup> tv: array<vec4<f32>, {{TILE}}>;  // v block
var<workgroup> sp: array<f32, {{STILE}}>;       // BQ * SS: P (forward: scores, then P)
var<workgroup> sd: array<f32, {{STILE}}>;       // dS
var<workgroup> ra: array<f32, BQ>;         // per query row: running max / lse
var<workgroup> rb: array<f32, BQ>;         // running sum / delta
var<workgroup> sq: array<i32, BQ>;         // segment of each query row
var<workgroup> sk: array<i32, BQ>;         // segment of each key row

// row r0 + r of head hn of a (B, n, nh, HD) tensor, zero past n
fn qrow(b: u32, r: u32, hn: u32) -> u32 { return ((b * p.T + r) * p.H + hn) * NV; }
fn krow(b: u32, r: u32, hn: u32) -> u32 { return ((b * p.TK + r) * p.KV + hn) * NV; }

fn load_q(b: u32, i0: u32, h: u32, t: u32, with_dout: bool) {
    for (var e = t; e < BQ * NV; e += 256u) {
        let r = e / NV;
        let c = e % NV;
        var a = vec4<f32>(0.0);
        var o = vec4<f32>(0.0);
        if (i0 + r < p.T) {
            let g = qrow(b, i0 + r, h) + c;
            a = q[g];
            if (with_dout) { o = dout[g]; }
        }
        ta[r * RS + c] = a;
        tb[r * RS + c] = o;
    }
}

fn load_kv(b: u32, j0: u32, kvh: u32, t: u32) {
    for (var e = t; e < BQ * NV; e += 256u) {
        let r = e / NV;
        let c = e % NV;
        var a = vec4<f32>(0.0);
        var o = vec4<f32>(0.0);
        if (j0 + r < p.TK) {
            let g = krow(b, j0 + r, kvh) + c;
            a = k[g];
            o = v[g];
        }
        tk[r * RS + c] = a;
        tv[r * RS + c] = o;
    }
    if (t < BQ && p.has_seg != 0u) { sk[t] = seg[b * p.TK + min(j0 + t, p.TK - 1u)]; }
}

fn seg_q(b: u32, i0: u32, t: u32) {
    if (t < BQ && p.has_seg != 0u) { sq[t] = seg[b * p.TK + min(dyn[0] + i0 + t, p.TK - 1u)]; }
}

// has_seg 2: seg also holds each BQ block's [lo, hi] id range after the (B, TK) ids (segments.wgsl). A query
// block and a key block whose ranges miss each other see nothing of each other (other rows packed in), so the
// loops skip that pair: the same sums, less work on packed rows (a value and workgroup uniform branch)
fn disjoint(b: u32, qb: u32, kb: u32) -> bool {
    if (p.has_seg != 2u || p.T != p.TK || dyn[0] != 0u) { return false; }
    let o = p.B * p.TK + 2u * b * ((p.TK + BQ - 1u) / BQ);
    return seg[o + 2u * kb + 1u] < seg[o + 2u * qb] || seg[o + 2u * kb] > seg[o + 2u * qb + 1u];
}

// query row i of the block at i0 sees key row j of the block at j0
fn sees(i0: u32, i: u32, j0: u32, j: u32) -> bool {
    let qi = dyn[0] + i0 + i;
    let kj = j0 + j;
    return i0 + i < p.T && kj < p.TK && kj <= qi && (p.has_seg == 0u || sq[i] == sk[j]);
}

fn dot_rows(x: u32, y: u32, which: u32) -> f32 {  // which 0: ta·tk, 1: tb·tv
    var s = 0.0;
    if (which == 0u) {
        for (var c = 0u; c < NV; c++) { s += dot(ta[x * RS + c], tk[y * RS + c]); }
    } else {
        for (var c = 0u; c < NV; c++) { s += dot(tb[x * RS + c], tv[y * RS + c]); }
    }
    return s;
}

// partial row maxima / sums of the forward's online softmax: the TPR invocations of a row each reduce their
// own SC scores, then read the row's TPR partials (no invocation walks a whole row serially)
var<workgroup> pm: array<f32, 256>;
var<workgroup> ps: array<f32, 256>;

@compute @workgroup_size(256)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i0 = wid.x * BQ;
    let h = wid.y;
    let b = wid.z;
    let kvh = h / (p.H / p.KV);
    let i = t / TPR;
    let jq = t % TPR;
    load_q(b, i0, h, t, false);
    seg_q(b, i0, t);
    // accumulators are named vec4 (o0, o1 for columns jq, jq + TPR), not arrays a driver may put in local memory;
    // every invocation of row i keeps the row's running max mr and sum lr (the same values)
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    var mr = NEG;
    var lr = 0.0;
    let nk = min(p.TK, dyn[0] + min(i0 + BQ, p.T));  // keys the block's last query sees
    for (var j0 = 0u; j0 < nk; j0 += BQ) {
        if (disjoint(b, wid.x, j0 / BQ)) { continue; }
        workgroupBarrier();  // the last block's readers of tk / tv / sp are done
        load_kv(b, j0, kvh, t);
        workgroupBarrier();
        var lm = NEG;
        for (var c = 0u; c < SC; c++) {
            let j = jq + TPR * c;
            let s = select(NEG, dot_rows(i, j, 0u) * p.scale, sees(i0, i, j0, j));
            sp[i * SS + j] = s;
            lm = max(lm, s);
        }
        pm[t] = lm;
        workgroupBarrier();
        var mx = mr;
        for (var j = 0u; j < TPR; j++) { mx = max(mx, pm[i * TPR + j]); }
        var ls = 0.0;
        for (var c = 0u; c < SC; c++) {
            let j = jq + TPR * c;
            let s = sp[i * SS + j];
            let e = select(0.0, exp(s - mx), s > -1.0e29);
            sp[i * SS + j] = e;
            ls += e;
        }
        ps[t] = ls;
        workgroupBarrier();
        let corr = exp(mr - mx);
        var lsum = 0.0;
        for (var j = 0u; j < TPR; j++) { lsum += ps[i * TPR + j]; }
        lr = lr * corr + lsum;
        mr = mx;
        o0 *= corr;
        o1 *= corr;
        for (var j = 0u; j < BQ; j++) {
            let pj = sp[i * SS + j];
            if (jq < NV) { o0 += pj * tv[j * RS + jq]; }
//#if NDV2
            if (jq + TPR < NV) { o1 += pj * tv[j * RS + jq + TPR]; }
//#endif
        }
    }
    if (i0 + i < p.T) {
        let g = qrow(b, i0 + i, h);
        if (jq < NV) { out[g + jq] = o0 / lr; }
        if (NDV > 1u && jq + TPR < NV) { out[g + jq + TPR] = o1 / lr; }
        if (jq == 0u) { lse[(b * p.H + h) * p.T + i0 + i] = mr + log(lr); }
    }
}

@compute @workgroup_size(256)
fn backward_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i0 = wid.x * BQ;
    let h = wid.y;
    let b = wid.z;
    let kvh = h / (p.H / p.KV);
    let i = t / TPR;
    let jq = t % TPR;
    load_q(b, i0, h, t, true);
    seg_q(b, i0, t);
    if (t < BQ) {
        var dl = 0.0;
        var L = 0.0;
        if (i0 + t < p.T) {
            let g = qrow(b, i0 + t, h);
            for (var c = 0u; c < NV; c++) { dl += dot(dout[g + c], out[g + c]); }
            let li = (b * p.H + h) * p.T + i0 + t;
            delta[li] = dl;
            L = lse[li];
        }
        ra[t] = L;
        rb[t] = dl;
    }
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    let nk = min(p.TK, dyn[0] + min(i0 + BQ, p.T));
    for (var j0 = 0u; j0 < nk; j0 += BQ) {
        if (disjoint(b, wid.x, j0 / BQ)) { continue; }
        workgroupBarrier();
        load_kv(b, j0, kvh, t);
        workgroupBarrier();
        for (var c = 0u; c < SC; c++) {
            let j = jq + TPR * c;
            var ds = 0.0;
            if (sees(i0, i, j0, j)) {
                let pr = exp(dot_rows(i, j, 0u) * p.scale - ra[i]);
                ds = pr * (dot_rows(i, j, 1u) - rb[i]) * p.scale;
            }
            sd[i * SS + j] = ds;
        }
        workgroupBarrier();
        for (var j = 0u; j < BQ; j++) {
            let ds = sd[i * SS + j];
            if (jq < NV) { a0 += ds * tk[j * RS + jq]; }
//#if NDV2
            if (jq + TPR < NV) { a1 += ds * tk[j * RS + jq + TPR]; }
//#endif
        }
    }
    if (i0 + i < p.T) {
        let g = qrow(b, i0 + i, h);
        if (jq < NV) { dq[g + jq] = a0; }
        if (NDV > 1u && jq + TPR < NV) { dq[g + jq + TPR] = a1; }
    }
}

@compute @workgroup_size(256)
fn backward_dkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j0 = wid.x * BQ;
    let kvh = wid.y;
    let b = wid.z;
    let g = p.H / p.KV;
    let i = t / TPR;   // score phase: query row; accumulate phase: key row
    let jq = t % TPR;
    load_kv(b, j0, kvh, t);
    var ak0 = vec4<f32>(0.0);
    var ak1 = vec4<f32>(0.0);
    var av0 = vec4<f32>(0.0);
    var av1 = vec4<f32>(0.0);
    let t0 = dyn[0];
    let first = select(0u, ((j0 - t0) / BQ) * BQ, j0 > t0);  // earlier query blocks see none of these keys
    for (var hh = 0u; hh < g; hh++) {
        let h = kvh * g + hh;
        for (var i0 = first; i0 < p.T; i0 += BQ) {
            if (disjoint(b, i0 / BQ, wid.x)) { continue; }
            workgroupBarrier();
            load_q(b, i0, h, t, true);
            seg_q(b, i0, t);
            if (t < BQ) {
                let li = (b * p.H + h) * p.T + min(i0 + t, p.T - 1u);
                ra[t] = lse[li];
                rb[t] = delta[li];
            }
            workgroupBarrier();
            for (var c = 0u; c < SC; c++) {
                let j = jq + TPR * c;
                var pr = 0.0;
                var ds = 0.0;
                if (sees(i0, i, j0, j)) {
                    pr = exp(dot_rows(i, j, 0u) * p.scale - ra[i]);
                    ds = pr * (dot_rows(i, j, 1u) - rb[i]) * p.scale;
                }
                sp[i * SS + j] = pr;
                sd[i * SS + j] = ds;
            }
            workgroupBarrier();
            for (var r = 0u; r < BQ; r++) {
                let pr = sp[r * SS + i];
                let ds = sd[r * SS + i];
                if (jq < NV) {
                    av0 += pr * tb[r * RS + jq];
                    ak0 += ds * ta[r * RS + jq];
                }
//#if NDV2
                if (jq + TPR < NV) {
                    av1 += pr * tb[r * RS + jq + TPR];
                    ak1 += ds * ta[r * RS + jq + TPR];
                }
//#endif
            }
        }
    }
    if (j0 + i < p.TK) {
        let o = krow(b, j0 + i, kvh);
        if (jq < NV) { dk[o + jq] = ak0; dv[o + jq] = av0; }
        if (NDV > 1u && jq + TPR < NV) { dk[o + jq + TPR] = ak1; dv[o + jq + TPR] = av1; }
    }
}
