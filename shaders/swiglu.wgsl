// SwiGLU: act = silu(g) * u; backward dg = da*u*s*(1 + g*(1-s)), du = da*g*s with s = sigmoid(g).
struct P { n: u32, F: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> act: array<f32>;
@group(0) @binding(4) var<storage, read> dact: array<f32>;
@group(0) @binding(5) var<storage, read_write> dg: array<f32>;
@group(0) @binding(6) var<storage, read_write> du: array<f32>;

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    if (i >= p.n) { return; }
    let a = g[i];
    act[i] = a / (1.0 + exp(-a)) * u[i];
}

@compute @workgroup_size(64)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    if (i >= p.n) { return; }
    let a = g[i];
    let s = 1.0 / (1.0 + exp(-a));
    let d = dact[i];
    dg[i] = d * u[i] * s * (1.0 + a * (1.0 - s));
    du[i] = d * (a * s);
}

// Inference from the fused gate/up projection g = [gate | up] (N, 2F): act (N, F).
@compute @workgroup_size(64)
fn forward_fused(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    if (i >= p.n) { return; }
    let src = (i / p.F) * 2u * p.F + i % p.F;
    let a = g[src];
    act[i] = a / (1.0 + exp(-a)) * g[src + p.F];
}
