// RMSNorm: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); one invocation per row (no barriers).
// backward: dx = beta*dx + rstd * (g - xhat * mean(g * xhat)), g = dy * w (w is frozen: no dw).
struct P { N: u32, D: u32, eps: f32, beta: f32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // (N, D)
@group(0) @binding(2) var<storage, read> w: array<f32>;       // (D,)
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // (N, D)
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>; // (N,)
@group(0) @binding(5) var<storage, read> dy: array<f32>;      // (N, D)
@group(0) @binding(6) var<storage, read_write> dx: array<f32>; // (N, D)

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n = gid.x + gid.y * nw.x * 64u;
    if (n >= p.N) { return; }
    let b = n * p.D;
    var ss = 0.0;
    for (var i = 0u; i < p.D; i++) { ss += x[b + i] * x[b + i]; }
    let r = 1.0 / sqrt(ss / f32(p.D) + p.eps);
    rstd[n] = r;
    for (var i = 0u; i < p.D; i++) { y[b + i] = (x[b + i] * r) * w[i]; }
}

@compute @workgroup_size(64)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n = gid.x + gid.y * nw.x * 64u;
    if (n >= p.N) { return; }
    let b = n * p.D;
    let r = rstd[n];
    var dot = 0.0;
    for (var i = 0u; i < p.D; i++) { dot += dy[b + i] * w[i] * x[b + i] * r; }
    let mean = dot / f32(p.D);
    for (var i = 0u; i < p.D; i++) {
        let xh = x[b + i] * r;
        var v = r * (dy[b + i] * w[i] - xh * mean);
        if (p.beta != 0.0) { v += p.beta * dx[b + i]; }
        dx[b + i] = v;
    }
}

// Hardware GPUs: one workgroup of 64 per row (a row's serial loop over D in one invocation leaves the GPU
// idle: 4096 rows are 64 workgroups); sums reduce through workgroup memory.
var<workgroup> red: array<f32, 64>;

fn wg_sum(v: f32, l: u32) -> f32 {
    red[l] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (l < s) { red[l] += red[l + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn forward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32,
              @builtin(num_workgroups) nw: vec3<u32>) {
    let n = wid.x + wid.y * nw.x;
    if (n >= p.N) { return; }
    let b = n * p.D;
    var ss = 0.0;
    if (p.D % 4u == 0u) {  // vec4 steps: a third of the dependent loads at D = 576 (decode is latency-bound)
        for (var i = 4u * l; i < p.D; i += 256u) {
            let v = vec4<f32>(x[b + i], x[b + i + 1u], x[b + i + 2u], x[b + i + 3u]);
            ss += dot(v, v);
        }
    } else {
        for (var i = l; i < p.D; i += 64u) { ss += x[b + i] * x[b + i]; }
    }
    let r = 1.0 / sqrt(wg_sum(ss, l) / f32(p.D) + p.eps);
    if (l == 0u) { rstd[n] = r; }
    for (var i = l; i < p.D; i += 64u) { y[b + i] = (x[b + i] * r) * w[i]; }
}

@compute @workgroup_size(64)
fn backward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32,
               @builtin(num_workgroups) nw: vec3<u32>) {
    let n = wid.x + wid.y * nw.x;
    if (n >= p.N) { return; }
    let b = n * p.D;
    let r = rstd[n];
    var dot = 0.0;
    for (var i = l; i < p.D; i += 64u) { dot += dy[b + i] * w[i] * x[b + i] * r; }
    let mean = wg_sum(dot, l) / f32(p.D);
    for (var i = l; i < p.D; i += 64u) {
        let xh = x[b + i] * r;
        var v = r * (dy[b + i] * w[i] - xh * mean);
        if (p.beta != 0.0) { v += p.beta * dx[b + i]; }
        dx[b + i] = v;
    }
}
