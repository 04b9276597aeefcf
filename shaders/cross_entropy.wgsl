// Vocabulary-chunked fused cross-entropy. The caller computes one chunk of logits z = h . W[c0:c0+C]^T into
// a (N, C) scratch buffer (matmul.wgsl), then:
//   chunk_forward : running (max, sum-exp, target logit) per row — B*T*V logits never exist at once
//   finish        : lse = max + log(sum)
//   loss_sum      : loss[0] = sum over labelled rows of lse - target (one workgroup)
//   chunk_backward: z <- (softmax - onehot) * gscale on labelled rows, 0 elsewhere; then dh += z . W[c0:...]
// Training uses row chunks instead: z = h[row0:row0+N] . W^T holds all V logits of a few rows, and
//   rows_fused    : one workgroup per row: max, sum-exp, lse, target into st, then z <- gradient in place,
// so the logits are computed once (not twice) per step and the (N, V) block is never whole.
struct P { N: u32, C: u32, c0: u32, first: u32, gscale: f32, row0: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> z: array<f32>;    // (N, C)
@group(0) @binding(2) var<storage, read> labels: array<i32>;     // (N,), -100 = ignored
@group(0) @binding(3) var<storage, read_write> st: array<f32>;   // (N, 4) [max, sum, target, lse]
@group(0) @binding(4) var<storage, read_write> loss: array<f32>; // [sum of losses]

@compute @workgroup_size(64)
fn chunk_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n = gid.x + gid.y * nw.x * 64u;
    if (n >= p.N) { return; }
    var m = -3.0e38;
    var s = 0.0;
    var tgt = 0.0;
    if (p.first == 0u) { m = st[n * 4u]; s = st[n * 4u + 1u]; tgt = st[n * 4u + 2u]; }
    let b = n * p.C;
    var zm = -3.0e38;
    for (var c = 0u; c < p.C; c++) { zm = max(zm, z[b + c]); }
    let mn = max(m, zm);
    var acc = 0.0;
    for (var c = 0u; c < p.C; c++) { acc += exp(z[b + c] - mn); }
    s = s * exp(m - mn) + acc;
    let lab = labels[n];
    if (lab >= i32(p.c0) && lab < i32(p.c0 + p.C)) { tgt = z[b + u32(lab) - p.c0]; }
    st[n * 4u] = mn;
    st[n * 4u + 1u] = s;
    st[n * 4u + 2u] = tgt;
}

@compute @workgroup_size(64)
fn finish(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n = gid.x + gid.y * nw.x * 64u;
    if (n >= p.N) { return; }
    st[n * 4u + 3u] = st[n * 4u] + log(st[n * 4u + 1u]);
}

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn loss_sum(@builtin(local_invocation_id) lid: vec3<u32>) {
    var s = 0.0;
    for (var n = lid.x; n < p.N; n += 256u) {
        if (labels[n] != -100) { s += st[n * 4u + 3u] - st[n * 4u + 2u]; }
    }
    part[lid.x] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) { part[lid.x] += part[lid.x + w]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { loss[0] = part[0]; }
}

var<workgroup> wmax: array<f32, 256>;

@compute @workgroup_size(256)
fn rows_fused(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let r = wid.x;  // row within the chunk; its global row is row0 + r
    let n = p.row0 + r;
    let b = r * p.C;
    var mx = -3.0e38;
    for (var c = lid.x; c < p.C; c += 256u) { mx = max(mx, z[b + c]); }
    wmax[lid.x] = mx;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) { wmax[lid.x] = max(wmax[lid.x], wmax[lid.x + w]); }
        workgroupBarrier();
    }
    let m = wmax[0];
    var s = 0.0;
    for (var c = lid.x; c < p.C; c += 256u) { s += exp(z[b + c] - m); }
    part[lid.x] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) { part[lid.x] += part[lid.x + w]; }
        workgroupBarrier();
    }
    let lse = m + log(part[0]);
    let lab = labels[n];
    if (lid.x == 0u) {
        st[n * 4u] = m;
        st[n * 4u + 1u] = part[0];
        st[n * 4u + 2u] = select(0.0, z[b + u32(max(lab, 0))], lab >= 0);
        st[n * 4u + 3u] = lse;
    }
    workgroupBarrier();  // the target logit is read before the row is overwritten
    let g = select(p.gscale, 0.0, lab == -100);
    for (var c = lid.x; c < p.C; c += 256u) {
        var v = exp(z[b + c] - lse);
        if (i32(c) == lab) { v -= 1.0; }
        z[b + c] = v * g;
    }
}

@compute @workgroup_size(64)
fn chunk_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    if (i >= p.N * p.C) { return; }
    let n = i / p.C;
    let c = i % p.C;
    let lab = labels[n];
    if (lab == -100) { z[i] = 0.0; return; }
    var g = exp(z[i] - st[n * 4u + 3u]);
    if (u32(lab) == p.c0 + c) { g -= 1.0; }
    z[i] = g * p.gscale;
}
