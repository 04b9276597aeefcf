// AdamW over one flat f32 buffer holding every LoRA matrix (torch.optim.AdamW arithmetic), with the
// gradient scaled on the fly by gstat[1] = (1 / labelled tokens) * clip coefficient. What changes every
// step (learning rate, bias corrections, token count) is in the storage buffer hyp, so the optimizer is
// recorded once per run: hyp = [inv_n, decay = 1 - lr*wd, step_size = lr / (1 - b1^t), sqrt(1 - b2^t)].
//   sumsq : per-workgroup partial sums of grad^2           clip : gstat = [norm, scale] from the partials
//   adamw : p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v)/sqrt_bc2 + eps); grad = 0
struct P { n: u32, nparts: u32, max_norm: f32, b1: f32, c1: f32, b2: f32, c2: f32, eps: f32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> prm: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> gstat: array<f32>;  // [norm, grad scale]
@group(0) @binding(6) var<storage, read_write> parts: array<f32>;  // (nparts,)
@group(0) @binding(7) var<storage, read> hyp: array<f32>;          // [inv_n, decay, step_size, sqrt_bc2]

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn sumsq(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var s = 0.0;
    for (var i = wid.x * 256u + lid.x; i < p.n; i += p.nparts * 256u) { s += grad[i] * grad[i]; }
    red[lid.x] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) { red[lid.x] += red[lid.x + w]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { parts[wid.x] = red[0]; }
}

@compute @workgroup_size(1)
fn clip() {
    var s = 0.0;
    for (var i = 0u; i < p.nparts; i++) { s += parts[i]; }
    let norm = sqrt(s) * hyp[0];
    var coef = 1.0;
    if (p.max_norm > 0.0) { coef = min(1.0, p.max_norm / (norm + 1e-6)); }
    gstat[0] = norm;
    gstat[1] = hyp[0] * coef;
}

@compute @workgroup_size(64)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    if (i >= p.n) { return; }
    let g = grad[i] * gstat[1];
    var w = prm[i] * hyp[1];
    let mi = m[i] * p.b1 + p.c1 * g;
    let vi = v[i] * p.b2 + p.c2 * g * g;
    w -= hyp[2] * mi / (sqrt(vi) / hyp[3] + p.eps);
    prm[i] = w;
    m[i] = mi;
    v[i] = vi;
    grad[i] = 0.0;
}
