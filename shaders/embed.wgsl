// Token embedding gather: out[t, :] = W[tok[t], :], dequantized from the stored format (q8_0, q4_1, f16, f32).
// The embedding is frozen, so there is no backward entry.
struct P { n_tok: u32, D: u32, w_ld: u32, vocab: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> tok: array<i32>;
//#include quant.wgsl
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    let nc = (p.D + 3u) / 4u;
    let t = i / nc;
    if (t >= p.n_tok) { return; }
    let c = (i % nc) * 4u;
    let id = u32(clamp(tok[t], 0, i32(p.vocab) - 1));
    let v = w4(id, c, p.D);
    for (var l = 0u; l < 4u; l++) {
        if (c + l < p.D) { out[t * p.D + c + l] = v[l]; }
    }
}
