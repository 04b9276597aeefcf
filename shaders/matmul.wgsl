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
    seg2: u32, eps: f32,
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
@group(0) @binding(10) var<storage, read> lnw: array<f32>;  // XNORM: the RMSNorm weight (K,)

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
    var s = 0.0;
    if (p.R > 0u) {
        // fused q/k/v or gate/up: output columns past seg1 / seg2 take the next R columns of LP
        let lo = m * p.lp_ld + (select(0u, 1u, n >= p.seg1) + select(0u, 1u, n >= p.seg2)) * p.R;
        for (var r = 0u; r < p.R; r++) {
            s += lp[lo + r] * lq[n * p.q_sn + r * p.q_sr];
        }
        if (p.drop_mode == 3u) { s *= keep(m, n); }
    }
    store_lora(m, n, v, s);
}

fn store_lora(m: u32, n: u32, v: f32, s: f32) {  // s: the LoRA sum of output (m, n), before lscale
    var y = p.alpha * v;
    if (p.has_bias != 0u) { y += bias[n]; }
    if (p.R > 0u) { y += p.lscale * s; }
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
        let xl = vec4<f32>(xin(xo + 4u * w), xin(xo + 4u * w + 1u), xin(xo + 4u * w + 2u), xin(xo + 4u * w + 3u));
        let xh = vec4<f32>(xin(xo + 16u + 4u * w), xin(xo + 17u + 4u * w), xin(xo + 18u + 4u * w),
                           xin(xo + 19u + 4u * w));
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
        sq += dot(q, vec4<f32>(xin(xo + 4u * w), xin(xo + 4u * w + 1u), xin(xo + 4u * w + 2u), xin(xo + 4u * w + 3u)));
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
        if (k + l < p.K) { r[l] = xin(b + l); }
    }
    return r;
}

// The decode kernels (gemv_wg, gemv_lanes) read X through xin, which can apply the op that
// produced X on the fly, saving its dispatch: XSWIGLU: X is the fused [gate | up] projection (rows of 2K,
// lda = 2K) and xin = silu(gate) * up, as swiglu.wgsl's forward_fused; XNORM: xin = RMSNorm(X row) * lnw
// with the row's rstd from xnorm_prep, summed in rmsnorm.wgsl's forward_wg order.
var<workgroup> xnr: f32;

fn xin(i: u32) -> f32 {
//#if XSWIGLU
    let a = x[i];
    return a / (1.0 + exp(-a)) * x[i + p.K];
//#else
//#if XNORM
    return (x[i] * xnr) * lnw[(i - p.a_off) % p.lda];
//#else
    return x[i];
//#endif
//#endif
}

fn xnorm_prep(m: u32, t: u32) {  // XNORM: xnr = rstd of X row m; all 64 invocations call it
//#if XNORM
    let b = p.a_off + m * p.lda;
    var ss = 0.0;
    if (p.K % 4u == 0u) {
        for (var i = 4u * t; i < p.K; i += 256u) {
            let v = vec4<f32>(x[b + i], x[b + i + 1u], x[b + i + 2u], x[b + i + 3u]);
            ss += dot(v, v);
        }
    } else {
        for (var i = t; i < p.K; i += 64u) { ss += x[b + i] * x[b + i]; }
    }
    red[t] = ss;  // the gemv's own reduction array: free until xnr is set (barrier below)
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (t < w) { red[t] += red[t + w]; }
        workgroupBarrier();
    }
    if (t == 0u) { xnr = 1.0 / sqrt(red[0] / f32(p.K) + p.eps); }
    workgroupBarrier();
//#endif
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

// acc as four named vec4 (an array indexed in a loop may be placed in local memory by the driver)
struct Acc4 { c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32> }

fn tile_mac(tx: u32, ty: u32, acc: Acc4) -> Acc4 {
    var r = acc;
    for (var kk = 0u; kk < BK; kk++) {
        let a = xtile[kk * 16u + ty];
        let b = wtile[kk * 16u + tx];
        r.c0 += a.x * b;
        r.c1 += a.y * b;
        r.c2 += a.z * b;
        r.c3 += a.w * b;
    }
    return r;
}

fn store_acc(m: u32, n: u32, acc: Acc4) {
    store4(m, n, acc.c0);
    store4(m + 1u, n, acc.c1);
    store4(m + 2u, n, acc.c2);
    store4(m + 3u, n, acc.c3);
}

fn load_x_tile(m0: u32, k0: u32, t: u32) {  // X[m0 + t/4, k0 + 4*(t%4) ..+3] -> xtile transposed
    let m = t / 4u;
    let kq = (t % 4u) * 4u;
    let v = xrow4(min(m0 + m, p.M - 1u), k0 + kq);
    for (var l = 0u; l < 4u; l++) { xtile[(kq + l) * 16u + m / 4u][m % 4u] = v[l]; }
}

// Split K (few output tiles, as at small batches): workgroup z of num_workgroups.z takes one BK-aligned
// slice of K and writes its raw partial sums to C bound to a scratch buffer (z, M, N); split_epilogue sums
// the slices and applies the epilogue (bias, LoRA, residual, beta) through store().
fn k_slice(z: u32, nz: u32) -> vec2<u32> {
    let per = ((p.K + nz - 1u) / nz + BK - 1u) / BK * BK;
    return vec2<u32>(min(z * per, p.K), min((z + 1u) * per, p.K));
}

fn finish_tile(m: u32, n: u32, acc: Acc4, z: u32, nz: u32) {
    if (nz == 1u) {
        store_acc(m, n, acc);
        return;
    }
    let base = z * p.M * p.N;
    split_store(base, m, n, acc.c0);
    split_store(base, m + 1u, n, acc.c1);
    split_store(base, m + 2u, n, acc.c2);
    split_store(base, m + 3u, n, acc.c3);
}

@compute @workgroup_size(16, 16)
fn forward_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(num_workgroups) nw: vec3<u32>) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let t = lid.y * 16u + lid.x;
    let ks = k_slice(wid.z, nw.z);
    var acc = Acc4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = ks.x; k0 < ks.y; k0 += BK) {
        load_x_tile(m0, k0, t);
        let n = t / 4u;
        let kq = (t % 4u) * 4u;
        var w = vec4<f32>(0.0);
        if (k0 + kq < p.K) { w = w4(p.w_row0 + min(n0 + n, p.N - 1u), k0 + kq, p.K); }
        for (var l = 0u; l < 4u; l++) { wtile[(kq + l) * 16u + n / 4u][n % 4u] = w[l]; }
        workgroupBarrier();
        acc = tile_mac(lid.x, lid.y, acc);
        workgroupBarrier();
    }
    finish_tile(m0 + lid.y * 4u, n0 + lid.x * 4u, acc, wid.z, nw.z);
}

@compute @workgroup_size(16, 16)
fn backward_dx_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                     @builtin(num_workgroups) nw: vec3<u32>) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let t = lid.y * 16u + lid.x;
    let ks = k_slice(wid.z, nw.z);
    var acc = Acc4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = ks.x; k0 < ks.y; k0 += BK) {
        load_x_tile(m0, k0, t);
        let kk = t / 16u;
        let nq = (t % 16u) * 4u;
        var w = vec4<f32>(0.0);
        if (k0 + kk < p.K && n0 + nq < p.N) { w = w4(p.w_row0 + k0 + kk, n0 + nq, p.N); }
        wtile[kk * 16u + nq / 4u] = w;
        workgroupBarrier();
        acc = tile_mac(lid.x, lid.y, acc);
        workgroupBarrier();
    }
    finish_tile(m0 + lid.y * 4u, n0 + lid.x * 4u, acc, wid.z, nw.z);
}

override KSPLITS: u32 = 2u;

@compute @workgroup_size(64)
fn split_epilogue(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;  // X is the scratch of *_tiled's K slices (KSPLITS, M, N)
    let mn = p.M * p.N;
    if (i >= mn) { return; }
    var s = 0.0;
    for (var z = 0u; z < KSPLITS; z++) { s += x[z * mn + i]; }
    store(i / p.N, i % p.N, s);
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
        xnorm_prep(m, lid.x);
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

// Decode of a skinny projection (a LoRA A: N = r .. 3r outputs) on hardware GPUs: one workgroup of 64 lanes
// an output, the lanes over its 32-wide blocks — gemv_wg's 8 lanes would leave a few workgroups each walking
// a long dependent chain of loads.
@compute @workgroup_size(64)
fn gemv_lanes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nw: vec3<u32>) {
    let n = wid.x + wid.y * nw.x;
    let row = min(n, p.N - 1u);
    let nb = (p.K + 31u) / 32u;
    for (var m = 0u; m < p.M; m++) {
        xnorm_prep(m, lid.x);
        var acc = 0.0;
        let xo = p.a_off + m * p.lda;
//#if F32
        // a dense row (a LoRA A): vec4 steps over the 64 lanes, 3 dependent loads a lane at K = 576 (not 8)
        for (var k = 4u * lid.x; k < p.K; k += 256u) { acc += dot(w4(p.w_row0 + row, k, p.K), xrow4_at(xo + k, k)); }
//#else
        for (var b = lid.x; b < nb; b += 64u) { acc += wdot_block(p.w_row0 + row, b, xo + b * 32u); }
//#endif
        red[lid.x] = acc;
        workgroupBarrier();
        for (var w = 32u; w > 0u; w >>= 1u) {
            if (lid.x < w) { red[lid.x] += red[lid.x + w]; }
            workgroupBarrier();
        }
        if (lid.x == 0u && n < p.N) { store(m, n, red[0]); }
        workgroupBarrier();
    }
}

// dA / dB on large GPUs: the batch*seq reduction of backward_dw split over num_workgroups.z slices
// (partials to a scratch buffer bound as c), then split_reduce sums them into the real C (bound as c,
// the partials as x): C = alpha * sum_z partial_z + beta * C. K = slices in split_reduce.
// workgroup shape (WX, WY), WX * WY = 64, set at pipeline creation: dA (r x in) and dB (out x r) have one
// side of r = 8..16 columns, which an 8 x 8 shape would cover with 2 of 8 lanes
override WX: u32 = 8u;
override WY: u32 = 8u;

@compute @workgroup_size(WX, WY)
fn backward_dw_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.N || m0 >= p.M) { return; }
    let ks = (p.K + nw.z - 1u) / nw.z;
    let k_lo = gid.z * ks;
    let k_hi = min(p.K, k_lo + ks);
    let mm = p.M - 1u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k = k_lo; k < k_hi; k++) {
        let b = p.a_off + k * p.lda;
        let a = vec4<f32>(x[b + m0], x[b + min(m0 + 1u, mm)], x[b + min(m0 + 2u, mm)], x[b + min(m0 + 3u, mm)]);
        var w = w4(k, n0, p.N);
        if (p.drop_mode == 2u) { w *= keep4(k, n0); }
        c0 += a.x * w;
        c1 += a.y * w;
        c2 += a.z * w;
        c3 += a.w * w;
    }
    let base = gid.z * p.M * p.N;
    split_store(base, m0, n0, c0);
    split_store(base, m0 + 1u, n0, c1);
    split_store(base, m0 + 2u, n0, c2);
    split_store(base, m0 + 3u, n0, c3);
}

fn split_store(base: u32, m: u32, n0: u32, v: vec4<f32>) {
    if (m >= p.M) { return; }
    let o = base + m * p.N + n0;
    if (n0 < p.N) { c[o] = v.x; }
    if (n0 + 1u < p.N) { c[o + 1u] = v.y; }
    if (n0 + 2u < p.N) { c[o + 2u] = v.z; }
    if (n0 + 3u < p.N) { c[o + 3u] = v.w; }
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

// Skinny products on hardware GPUs (N <= 16 outputs: the LoRA x·Aᵀ and dY·B): a workgroup of 64 = SKR rows x
// SKL lanes; the lanes of a row split K in vec4 steps and reduce through workgroup memory, where a 64x64
// tile leaves 7/8 of its lanes idle at N = 8. Few rows (a small batch) take more lanes a row (kernels.py):
// the K loop is a chain of dependent loads, and 512 rows of 8 lanes were 64 workgroups of 18 steps each.
override SKR: u32 = 8u;
override SKL: u32 = 64u / SKR;
var<workgroup> skr: array<vec4<f32>, 256>;  // [row][lane][column group]

fn skinny_finish(l: u32, m: u32, a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>) {
    let row = l / SKL;
    let lane = l % SKL;
    let o = (row * SKL + lane) * 4u;
    skr[o] = a0;
    skr[o + 1u] = a1;
    skr[o + 2u] = a2;
    skr[o + 3u] = a3;
    workgroupBarrier();
    if (lane < 4u && lane * 4u < p.N && m < p.M) {
        var v = vec4<f32>(0.0);
        for (var j = 0u; j < SKL; j++) { v += skr[(row * SKL + j) * 4u + lane]; }
        store4(m, lane * 4u, v);
    }
}

@compute @workgroup_size(64)
fn forward_skinny(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32,
                  @builtin(num_workgroups) nw: vec3<u32>) {
    let m = (wid.x + wid.y * nw.x) * SKR + l / SKL;
    let mc = min(m, p.M - 1u);
    let nn = p.N - 1u;
    let r0 = p.w_row0;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var k = (l % SKL) * 4u; k < p.K; k += 4u * SKL) {
        let xv = xrow4(mc, k);
        a0 += vec4<f32>(dot(xv, w4(r0, k, p.K)), dot(xv, w4(r0 + min(1u, nn), k, p.K)),
                        dot(xv, w4(r0 + min(2u, nn), k, p.K)), dot(xv, w4(r0 + min(3u, nn), k, p.K)));
        if (p.N > 4u) {
            a1 += vec4<f32>(dot(xv, w4(r0 + 4u, k, p.K)), dot(xv, w4(r0 + min(5u, nn), k, p.K)),
                            dot(xv, w4(r0 + min(6u, nn), k, p.K)), dot(xv, w4(r0 + min(7u, nn), k, p.K)));
        }
        if (p.N > 8u) {
            a2 += vec4<f32>(dot(xv, w4(r0 + 8u, k, p.K)), dot(xv, w4(r0 + min(9u, nn), k, p.K)),
                            dot(xv, w4(r0 + min(10u, nn), k, p.K)), dot(xv, w4(r0 + min(11u, nn), k, p.K)));
        }
        if (p.N > 12u) {
            a3 += vec4<f32>(dot(xv, w4(r0 + 12u, k, p.K)), dot(xv, w4(r0 + min(13u, nn), k, p.K)),
                            dot(xv, w4(r0 + min(14u, nn), k, p.K)), dot(xv, w4(r0 + min(15u, nn), k, p.K)));
        }
    }
    skinny_finish(l, m, a0, a1, a2, a3);
}

@compute @workgroup_size(64)
fn backward_dx_skinny(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32,
                      @builtin(num_workgroups) nw: vec3<u32>) {
    let m = (wid.x + wid.y * nw.x) * SKR + l / SKL;
    let mc = min(m, p.M - 1u);
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var k4 = (l % SKL) * 4u; k4 < p.K; k4 += 4u * SKL) {
        let xv = xrow4(mc, k4);  // zero past K
        for (var i = 0u; i < 4u; i++) {
            let wr = p.w_row0 + min(k4 + i, p.K - 1u);
            let xi = xv[i];
            a0 += xi * w4(wr, 0u, p.N);
            if (p.N > 4u) { a1 += xi * w4(wr, 4u, p.N); }
            if (p.N > 8u) { a2 += xi * w4(wr, 8u, p.N); }
            if (p.N > 12u) { a3 += xi * w4(wr, 12u, p.N); }
        }
    }
    skinny_finish(l, m, a0, a1, a2, a3);
}

//#if MMT
// --- register-blocked tiles for hardware GPUs (forward_mmt NT, backward_dx_mmt NN): a (16*TM) x (16*TN)
// output tile per 16x16 workgroup, TM x TN outputs per invocation (TM, TN = 4 or 8; rows 4*ty + 64g,
// columns 4*tx + 64h, so that a quarter-warp's vec4 reads of workgroup memory hit distinct banks), K in
// steps of 16 staged k-major through workgroup memory (the 4-bit block dequantized once per step, reused by
// 16*TM rows); the next step's global loads are issued before this step's arithmetic (register prefetch).
// Accumulators and staging registers are named variables, never arrays: an array indexed in a loop the
// driver does not unroll lives in local memory (measured on an H200: ~1.6 TFLOP/s whatever the tile).
const BM: u32 = {{BM}}u;   // 16 * TM
const BN: u32 = {{BN}}u;   // 16 * TN
const MK: u32 = 16u;
var<workgroup> xs: array<vec4<f32>, 16u * BM / 4u>;  // [kk][m/4]: rows m..m+3 at one k
var<workgroup> wt: array<vec4<f32>, 16u * BN / 4u>;  // [kk][n/4]

fn fetch_x(e: u32, m0: u32, k0: u32) -> vec4<f32> {  // X[m0 + e%BM, k0 + 4*(e/BM) ..+3]
    return xrow4(min(m0 + e % BM, p.M - 1u), k0 + (e / BM) * 4u);
}

fn stash_x(e: u32, v: vec4<f32>) {  // transposed: xs[k][m]
    let m = e % BM;
    let i = (e / BM) * 4u * (BM / 4u) + m / 4u;
    let c = m % 4u;
    xs[i][c] = v.x;
    xs[i + BM / 4u][c] = v.y;
    xs[i + BM / 2u][c] = v.z;
    xs[i + 3u * BM / 4u][c] = v.w;
}

fn fetch_w(e: u32, n0: u32, k0: u32, nn: bool) -> vec4<f32> {
    if (nn) {  // W[w_row0 + k0 + e/(BN/4), n0 + 4*(e%(BN/4)) ..+3]
        let kk = e / (BN / 4u);
        let n = n0 + (e % (BN / 4u)) * 4u;
        if (k0 + kk < p.K && n < p.N) { return w4(p.w_row0 + k0 + kk, n, p.N); }
        return vec4<f32>(0.0);
    }
    let kq = (e / BN) * 4u;  // W[w_row0 + n0 + e%BN, k0 + kq ..+3]
    if (k0 + kq < p.K) { return w4(p.w_row0 + min(n0 + e % BN, p.N - 1u), k0 + kq, p.K); }
    return vec4<f32>(0.0);
}

fn stash_w(e: u32, v: vec4<f32>, nn: bool) {
    if (nn) {
        wt[e] = v;  // e = kk * (BN/4) + n/4
        return;
    }
    let n = e % BN;
    let i = (e / BN) * 4u * (BN / 4u) + n / 4u;
    let c = n % 4u;
    wt[i][c] = v.x;
    wt[i + BN / 4u][c] = v.y;
    wt[i + BN / 2u][c] = v.z;
    wt[i + 3u * BN / 4u][c] = v.w;
}

fn mm_tiles(wid: vec3<u32>, lid: vec3<u32>, nn: bool) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let t = lid.y * 16u + lid.x;
    let tx = lid.x;
    let ty = lid.y;
    // c{g}{r}{h}: row 4*ty + 64g + r, columns 4*tx + 64h ..+3
    var c000 = vec4<f32>(0.0); var c010 = vec4<f32>(0.0); var c020 = vec4<f32>(0.0); var c030 = vec4<f32>(0.0);
//#if TN8
    var c001 = vec4<f32>(0.0); var c011 = vec4<f32>(0.0); var c021 = vec4<f32>(0.0); var c031 = vec4<f32>(0.0);
//#endif
//#if TM8
    var c100 = vec4<f32>(0.0); var c110 = vec4<f32>(0.0); var c120 = vec4<f32>(0.0); var c130 = vec4<f32>(0.0);
//#if TN8
    var c101 = vec4<f32>(0.0); var c111 = vec4<f32>(0.0); var c121 = vec4<f32>(0.0); var c131 = vec4<f32>(0.0);
//#endif
//#endif
    var x0 = fetch_x(t, m0, 0u);
    var w0 = fetch_w(t, n0, 0u, nn);
//#if TM8
    var x1 = fetch_x(t + 256u, m0, 0u);
//#endif
//#if TN8
    var w1 = fetch_w(t + 256u, n0, 0u, nn);
//#endif
    for (var k0 = 0u; k0 < p.K; k0 += MK) {
        stash_x(t, x0);
        stash_w(t, w0, nn);
//#if TM8
        stash_x(t + 256u, x1);
//#endif
//#if TN8
        stash_w(t + 256u, w1, nn);
//#endif
        workgroupBarrier();
        if (k0 + MK < p.K) {  // the next step's loads fly while this step computes
            x0 = fetch_x(t, m0, k0 + MK);
            w0 = fetch_w(t, n0, k0 + MK, nn);
//#if TM8
            x1 = fetch_x(t + 256u, m0, k0 + MK);
//#endif
//#if TN8
            w1 = fetch_w(t + 256u, n0, k0 + MK, nn);
//#endif
        }
        for (var kk = 0u; kk < MK; kk++) {
            let a0 = xs[kk * (BM / 4u) + ty];
            let b0 = wt[kk * (BN / 4u) + tx];
            c000 += a0.x * b0; c010 += a0.y * b0; c020 += a0.z * b0; c030 += a0.w * b0;
//#if TN8
            let b1 = wt[kk * (BN / 4u) + tx + 16u];
            c001 += a0.x * b1; c011 += a0.y * b1; c021 += a0.z * b1; c031 += a0.w * b1;
//#endif
//#if TM8
            let a1 = xs[kk * (BM / 4u) + ty + 16u];
            c100 += a1.x * b0; c110 += a1.y * b0; c120 += a1.z * b0; c130 += a1.w * b0;
//#if TN8
            c101 += a1.x * b1; c111 += a1.y * b1; c121 += a1.z * b1; c131 += a1.w * b1;
//#endif
//#endif
        }
        workgroupBarrier();
    }
    let r0 = m0 + ty * 4u;
    let q0 = n0 + tx * 4u;
    store4(r0, q0, c000); store4(r0 + 1u, q0, c010); store4(r0 + 2u, q0, c020); store4(r0 + 3u, q0, c030);
//#if TN8
    store4(r0, q0 + 64u, c001); store4(r0 + 1u, q0 + 64u, c011); store4(r0 + 2u, q0 + 64u, c021); store4(r0 + 3u, q0 + 64u, c031);
//#endif
//#if TM8
    store4(r0 + 64u, q0, c100); store4(r0 + 65u, q0, c110); store4(r0 + 66u, q0, c120); store4(r0 + 67u, q0, c130);
//#if TN8
    store4(r0 + 64u, q0 + 64u, c101); store4(r0 + 65u, q0 + 64u, c111); store4(r0 + 66u, q0 + 64u, c121); store4(r0 + 67u, q0 + 64u, c131);
//#endif
//#endif
}

@compute @workgroup_size(16, 16)
fn forward_mmt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    mm_tiles(wid, lid, false);
}

@compute @workgroup_size(16, 16)
fn backward_dx_mmt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    mm_tiles(wid, lid, true);
}
//#endif
