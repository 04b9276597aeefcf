// Matmul against a (possibly 4-bit) weight, fused with bias, LoRA and residual. Register-blocked: each
// invocation owns a 4x4 output tile, no shared memory and no barriers (lavapipe punishes both).
//   forward     (NT): C[m,n] = alpha*sum_k X[m,k] W[w_row0+n,k] + bias[n] + lscale*sum_r LP[m,r] LQ[n,r] + res + beta*C
//   backward_dx (NN): C[m,n] = alpha*sum_k X[m,k] W[w_row0+k,n]            + lscale*sum_r LP[m,r] LQ[n,r] + beta*C
//   backward_dw (TN): C[m,n] = alpha*sum_k X[k,m] W[k,n]  (dense W)                                     + beta*C
//   gemv        (NT, M small): one invocation per 4 outputs, all M rows — the decode path.
// LQ[n,r] is read at n*q_sn + r*q_sr so both B (out, r) and A (r, in) serve; LP rows have stride lp_ld and
// columns n >= seg1 (seg2) use LP's second (third) group of R — one dispatch for fused q/k/v or gate/up. LoRA dropout (training) is a
// counter-based mask keep(row, col) of the LoRA input x (N, in), recomputed wherever x meets the LoRA path:
// drop_mode 1 masks X (x·Aᵀ), 2 masks W (dA = dxaᵀ·x, W = x), 3 masks the LoRA term of dX. X rows start at a_off with
// stride lda; C rows at c_off with stride ldc (lets the LM head read only the last position of each row).
struct P {
    M: u32, N: u32, K: u32, R: u32,
    a_off: u32, lda: u32, c_off: u32, ldc: u32,
    w_row0: u32, w_ld: u32, q_sn: u32, q_sr: u32,
    has_bias: u32, has_res: u32, beta: f32, alpha: f32,
    lscale: f32, drop_mode: u32, drop_thr: u32, drop_salt: u32,
    drop_ld: u32, drop_scale: f32, lp_ld: u32, seg1: u32,
    seg2: u32,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
//#include quant.wgsl
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> lp: array<f32>;
@group(0) @binding(6) var<storage, read> lq: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;
@group(0) @binding(8) var<storage, read_write> c: array<f32>;
@group(0) @binding(9) var<storage, read> dyn: array<u32>;  // [dropout seed, step, micro-batch]

fn pcg(v: u32) -> u32 {
    let s = v * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

fn keep(row: u32, col: u32) -> f32 {  // dropout mask of x[row, col], already scaled by 1/(1-p)
    let key = pcg(dyn[0] ^ pcg(dyn[1] ^ pcg(dyn[2] ^ pcg(p.drop_salt))));
    return select(0.0, p.drop_scale, pcg(key ^ (row * p.drop_ld + col)) >= p.drop_thr);
}

fn keep4(row: u32, col: u32) -> vec4<f32> {
    return vec4<f32>(keep(row, col), keep(row, col + 1u), keep(row, col + 2u), keep(row, col + 3u));
}

fn xrow4(m: u32, k: u32) -> vec4<f32> {  // X[m, k..k+3], zero past K
    let b = p.a_off + m * p.lda + k;
    var r = vec4<f32>(0.0);
    if (k + 3u < p.K) {
        r = vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
    } else {
        for (var l = 0u; l < 4u; l++) {
            if (k + l < p.K) { r[l] = x[b + l]; }
        }
    }
    if (p.drop_mode == 1u) { r *= keep4(m, k); }
    return r;
}

fn store(m: u32, n: u32, v: f32) {
    if (m >= p.M || n >= p.N) { return; }
    var y = p.alpha * v;
    if (p.has_bias != 0u) { y += bias[n]; }
    if (p.R > 0u) {
        var s = 0.0;
        // fused q/k/v or gate/up: output columns past seg1 / seg2 take the next R columns of LP
        let lo = m * p.lp_ld + (select(0u, 1u, n >= p.seg1) + select(0u, 1u, n >= p.seg2)) * p.R;
        for (var r = 0u; r < p.R; r++) {
            s += lp[lo + r] * lq[n * p.q_sn + r * p.q_sr];
        }
        if (p.drop_mode == 3u) { s *= keep(m, n); }
        y += p.lscale * s;
    }
    let ci = p.c_off + m * p.ldc + n;
    if (p.has_res != 0u) { y += res[ci]; }
    if (p.beta != 0.0) { y += p.beta * c[ci]; }
    c[ci] = y;
}

fn store4(m: u32, n0: u32, v: vec4<f32>) {
    store(m, n0, v.x);
    store(m, n0 + 1u, v.y);
    store(m, n0 + 2u, v.z);
    store(m, n0 + 3u, v.w);
}

@compute @workgroup_size(8, 8)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.N || m0 >= p.M) { return; }
    let mm = p.M - 1u;
    let nn = p.N - 1u;
    let r0 = p.w_row0;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k = 0u; k < p.K; k += 4u) {
        let a0 = xrow4(m0, k);
        let a1 = xrow4(min(m0 + 1u, mm), k);
        let a2 = xrow4(min(m0 + 2u, mm), k);
        let a3 = xrow4(min(m0 + 3u, mm), k);
        let w0 = w4(r0 + n0, k, p.K);
        let w1 = w4(r0 + min(n0 + 1u, nn), k, p.K);
        let w2 = w4(r0 + min(n0 + 2u, nn), k, p.K);
        let w3 = w4(r0 + min(n0 + 3u, nn), k, p.K);
        c0 += vec4<f32>(dot(a0, w0), dot(a0, w1), dot(a0, w2), dot(a0, w3));
        c1 += vec4<f32>(dot(a1, w0), dot(a1, w1), dot(a1, w2), dot(a1, w3));
        c2 += vec4<f32>(dot(a2, w0), dot(a2, w1), dot(a2, w2), dot(a2, w3));
        c3 += vec4<f32>(dot(a3, w0), dot(a3, w1), dot(a3, w2), dot(a3, w3));
    }
    store4(m0, n0, c0);
    store4(m0 + 1u, n0, c1);
    store4(m0 + 2u, n0, c2);
    store4(m0 + 3u, n0, c3);
}

// sum_j W[row, 32*blk + j] * X[xo + j] over one 32-wide block: the scale is read once per block and the
// 4-bit / 8-bit codes are unpacked a word at a time (ggml's vec_dot layout).
fn wdot_block(row: u32, blk: u32, xo: u32) -> f32 {
//#if Q4_1
    let bi = row * p.w_ld + blk;
    let dm = unpack2x16float(ws[bi]);
    var sq = 0.0;
    var sx = 0.0;
    for (var w = 0u; w < 4u; w++) {
        let word = wq[bi * 4u + w];
        let lo = vec4<f32>(vec4<u32>(word, word >> 8u, word >> 16u, word >> 24u) & vec4<u32>(15u));
        let hi = vec4<f32>(vec4<u32>(word >> 4u, word >> 12u, word >> 20u, word >> 28u) & vec4<u32>(15u));
        let xl = vec4<f32>(x[xo + 4u * w], x[xo + 4u * w + 1u], x[xo + 4u * w + 2u], x[xo + 4u * w + 3u]);
        let xh = vec4<f32>(x[xo + 16u + 4u * w], x[xo + 17u + 4u * w], x[xo + 18u + 4u * w], x[xo + 19u + 4u * w]);
        sq += dot(lo, xl) + dot(hi, xh);
        sx += xl.x + xl.y + xl.z + xl.w + xh.x + xh.y + xh.z + xh.w;
    }
    return dm.x * sq + dm.y * sx;
//#else
//#if Q8_0
    let bi = row * p.w_ld + blk;
    let d = unpack2x16float(ws[bi / 2u])[bi % 2u];
    var sq = 0.0;
    for (var w = 0u; w < 8u; w++) {
        let v = bitcast<i32>(wq[bi * 8u + w]);
        let q = vec4<f32>(vec4<i32>(extractBits(v, 0u, 8u), extractBits(v, 8u, 8u), extractBits(v, 16u, 8u),
                                    extractBits(v, 24u, 8u)));
        sq += dot(q, vec4<f32>(x[xo + 4u * w], x[xo + 4u * w + 1u], x[xo + 4u * w + 2u], x[xo + 4u * w + 3u]));
    }
    return d * sq;
//#else
    var s = 0.0;
    for (var w = 0u; w < 8u; w++) {
        let k = blk * 32u + 4u * w;
        if (k < p.K) { s += dot(w4(row, k, p.K), xrow4_at(xo + 4u * w, k)); }
    }
    return s;
//#endif
//#endif
}

fn xrow4_at(b: u32, k: u32) -> vec4<f32> {  // X at flat index b holding column k, zero past K
    var r = vec4<f32>(0.0);
    for (var l = 0u; l < 4u; l++) {
        if (k + l < p.K) { r[l] = x[b + l]; }
    }
    return r;
}

// Decode (small M) on lavapipe: one invocation per 4 outputs, all M rows (measured faster there than
// one output per invocation with block-wise unpacking).
@compute @workgroup_size(64)
fn gemv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n0 = (gid.x + gid.y * nw.x * 64u) * 4u;
    if (n0 >= p.N) { return; }
    let nn = p.N - 1u;
    let r0 = p.w_row0;
    for (var m = 0u; m < p.M; m++) {
        var acc = vec4<f32>(0.0);
        for (var k = 0u; k < p.K; k += 4u) {
            let a = xrow4(m, k);
            acc += vec4<f32>(dot(a, w4(r0 + n0, k, p.K)), dot(a, w4(r0 + min(n0 + 1u, nn), k, p.K)),
                             dot(a, w4(r0 + min(n0 + 2u, nn), k, p.K)), dot(a, w4(r0 + min(n0 + 3u, nn), k, p.K)));
        }
        store4(m, n0, acc);
    }
}

fn xcol(m: u32, k: u32) -> f32 {  // X[m, k] of backward_dx, zero past M (clamped read)
    return x[p.a_off + min(m, p.M - 1u) * p.lda + k];
}

@compute @workgroup_size(8, 8)
fn backward_dx(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.N || m0 >= p.M) { return; }
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k = 0u; k < p.K; k++) {
        let w = w4(p.w_row0 + k, n0, p.N);
        c0 += xcol(m0, k) * w;
        c1 += xcol(m0 + 1u, k) * w;
        c2 += xcol(m0 + 2u, k) * w;
        c3 += xcol(m0 + 3u, k) * w;
    }
    store4(m0, n0, c0);
    store4(m0 + 1u, n0, c1);
    store4(m0 + 2u, n0, c2);
    store4(m0 + 3u, n0, c3);
}

@compute @workgroup_size(8, 8)
fn backward_dw(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.N || m0 >= p.M) { return; }
    let mm = p.M - 1u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k = 0u; k < p.K; k++) {
        let b = p.a_off + k * p.lda;
        let a = vec4<f32>(x[b + m0], x[b + min(m0 + 1u, mm)], x[b + min(m0 + 2u, mm)], x[b + min(m0 + 3u, mm)]);
        var w = w4(k, n0, p.N);
        if (p.drop_mode == 2u) { w *= keep4(k, n0); }
        c0 += a.x * w;
        c1 += a.y * w;
        c2 += a.z * w;
        c3 += a.w * w;
    }
    store4(m0, n0, c0);
    store4(m0 + 1u, n0, c1);
    store4(m0 + 2u, n0, c2);
    store4(m0 + 3u, n0, c3);
}

// --- tiled variants for hardware GPUs: 64x64 output tile per 16x16 workgroup, K in steps of 16 staged
// through workgroup memory (dequantized once per tile, reused by 16 invocations). Slower on lavapipe,
// where barriers are expensive, so the runtime picks them only on hardware adapters.
const BK: u32 = 16u;
var<workgroup> xtile: array<vec4<f32>, 256>;  // [kk][m/4]: the 4 rows an invocation needs in one load
var<workgroup> wtile: array<vec4<f32>, 256>;  // [kk][n/4]

fn tile_mac(tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kk = 0u; kk < BK; kk++) {
        let a = xtile[kk * 16u + ty];
        let b = wtile[kk * 16u + tx];
        (*acc)[0] += a.x * b;
        (*acc)[1] += a.y * b;
        (*acc)[2] += a.z * b;
        (*acc)[3] += a.w * b;
    }
}

fn load_x_tile(m0: u32, k0: u32, t: u32) {  // X[m0 + t/4, k0 + 4*(t%4) ..+3] -> xtile transposed
    let m = t / 4u;
    let kq = (t % 4u) * 4u;
    let v = xrow4(min(m0 + m, p.M - 1u), k0 + kq);
    for (var l = 0u; l < 4u; l++) { xtile[(kq + l) * 16u + m / 4u][m % 4u] = v[l]; }
}

@compute @workgroup_size(16, 16)
fn forward_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let t = lid.y * 16u + lid.x;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.K; k0 += BK) {
        load_x_tile(m0, k0, t);
        let n = t / 4u;
        let kq = (t % 4u) * 4u;
        var w = vec4<f32>(0.0);
        if (k0 + kq < p.K) { w = w4(p.w_row0 + min(n0 + n, p.N - 1u), k0 + kq, p.K); }
        for (var l = 0u; l < 4u; l++) { wtile[(kq + l) * 16u + n / 4u][n % 4u] = w[l]; }
        workgroupBarrier();
        tile_mac(lid.x, lid.y, &acc);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) { store4(m0 + lid.y * 4u + i, n0 + lid.x * 4u, acc[i]); }
}

@compute @workgroup_size(16, 16)
fn backward_dx_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let t = lid.y * 16u + lid.x;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.K; k0 += BK) {
        load_x_tile(m0, k0, t);
        let kk = t / 16u;
        let nq = (t % 16u) * 4u;
        var w = vec4<f32>(0.0);
        if (k0 + kk < p.K && n0 + nq < p.N) { w = w4(p.w_row0 + k0 + kk, n0 + nq, p.N); }
        wtile[kk * 16u + nq / 4u] = w;
        workgroupBarrier();
        tile_mac(lid.x, lid.y, &acc);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) { store4(m0 + lid.y * 4u + i, n0 + lid.x * 4u, acc[i]); }
}

// Decode on hardware GPUs: a workgroup of 64 = 8 outputs x 8 lanes; the lanes of an output share its
// 32-wide blocks and reduce in workgroup memory, so even a 576-wide projection spreads over 72 workgroups.
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn gemv_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
           @builtin(num_workgroups) nw: vec3<u32>) {
    let n = (wid.x + wid.y * nw.x) * 8u + lid.x / 8u;
    let lane = lid.x % 8u;
    let row = min(n, p.N - 1u);
    let nb = (p.K + 31u) / 32u;
    for (var m = 0u; m < p.M; m++) {
        var acc = 0.0;
        let xo = p.a_off + m * p.lda;
        for (var b = lane; b < nb; b += 8u) { acc += wdot_block(p.w_row0 + row, b, xo + b * 32u); }
        red[lid.x] = acc;
        workgroupBarrier();
        for (var w = 4u; w > 0u; w >>= 1u) {
            if (lane < w) { red[lid.x] += red[lid.x + w]; }
            workgroupBarrier();
        }
        if (lane == 0u && n < p.N) { store(m, n, red[lid.x]); }
        workgroupBarrier();
    }
}

// dA / dB on large GPUs: the batch*seq reduction of backward_dw split over num_workgroups.z slices
// (partials to a scratch buffer bound as c), then split_reduce sums them into the real C (bound as c,
// the partials as x): C = alpha * sum_z partial_z + beta * C. K = slices in split_reduce.
@compute @workgroup_size(8, 8)
fn backward_dw_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.N || m0 >= p.M) { return; }
    let ks = (p.K + nw.z - 1u) / nw.z;
    let k_lo = gid.z * ks;
    let k_hi = min(p.K, k_lo + ks);
    let mm = p.M - 1u;
    var acc: array<vec4<f32>, 4>;
    for (var k = k_lo; k < k_hi; k++) {
        let b = p.a_off + k * p.lda;
        let a = vec4<f32>(x[b + m0], x[b + min(m0 + 1u, mm)], x[b + min(m0 + 2u, mm)], x[b + min(m0 + 3u, mm)]);
        var w = w4(k, n0, p.N);
        if (p.drop_mode == 2u) { w *= keep4(k, n0); }
        acc[0] += a.x * w;
        acc[1] += a.y * w;
        acc[2] += a.z * w;
        acc[3] += a.w * w;
    }
    let base = gid.z * p.M * p.N;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (m0 + i < p.M && n0 + j < p.N) { c[base + (m0 + i) * p.N + n0 + j] = acc[i][j]; }
        }
    }
}

@compute @workgroup_size(64)
fn split_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    let mn = p.M * p.N;
    if (i >= mn) { return; }
    var s = 0.0;
    for (var z = 0u; z < p.K; z++) { s += x[z * mn + i]; }
    var y = p.alpha * s;
    if (p.beta != 0.0) { y += p.beta * c[i]; }
    c[i] = y;
}
