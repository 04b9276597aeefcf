// Adam with 8-bit optimizer state, bitsandbytes' scheme as numpy_train.py has it: blocks of 256 values,
// one absmax per block, each value the nearest of 256 dynamic-tree code points (dense near zero; signed
// table for m, unsigned for v). One invocation per block, two passes over it: the first finds the new
// absmax, the second recomputes the update, writes the weight and the new codes. No barriers, no atomics.
const QB: u32 = 256u;
struct P { n: u32, nblk: u32, max_norm: f32, b1: f32, c1: f32, b2: f32, c2: f32, eps: f32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> prm: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> mq: array<u32>;     // (n/4,) 4 codes per word
@group(0) @binding(4) var<storage, read_write> vq: array<u32>;
@group(0) @binding(5) var<storage, read_write> absmax: array<f32>; // (nblk, 2) [m, v]
@group(0) @binding(6) var<storage, read_write> gstat: array<f32>;  // [norm, grad scale]
@group(0) @binding(7) var<storage, read> codes: array<f32>;        // [signed 256 | unsigned 256 | mids s 256 | mids u 256]
@group(0) @binding(8) var<storage, read> hyp: array<f32>;          // [inv_n, decay, step_size, sqrt_bc2] (adamw.wgsl)

fn code_of(word: u32, l: u32) -> u32 { return (word >> (8u * l)) & 255u; }

fn nearest(y: f32, mids: u32) -> u32 {  // number of midpoints below y (numpy searchsorted, side left)
    var lo = 0u;
    var hi = 255u;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (codes[mids + mid] < y) { lo = mid + 1u; } else { hi = mid; }
    }
    return lo;
}

fn moments(i: u32, blk: u32) -> vec2<f32> {  // new (m, v) of element i
    let g = grad[i] * gstat[1];
    let m = codes[code_of(mq[i / 4u], i % 4u)] * absmax[blk * 2u];
    let v = codes[256u + code_of(vq[i / 4u], i % 4u)] * absmax[blk * 2u + 1u];
    return vec2<f32>(m * p.b1 + p.c1 * g, v * p.b2 + p.c2 * g * g);
}

@compute @workgroup_size(64)
fn step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let blk = gid.x + gid.y * nw.x * 64u;
    if (blk >= p.nblk) { return; }
    let base = blk * QB;
    var am = 0.0;
    var av = 0.0;
    for (var e = 0u; e < QB; e++) {
        let mv = moments(base + e, blk);
        am = max(am, abs(mv.x));
        av = max(av, abs(mv.y));
    }
    let sm = select(1.0, am, am > 0.0);
    let sv = select(1.0, av, av > 0.0);
    for (var w = 0u; w < QB / 4u; w++) {
        var pm = 0u;
        var pv = 0u;
        for (var l = 0u; l < 4u; l++) {
            let i = base + w * 4u + l;
            let mv = moments(i, blk);
            prm[i] = prm[i] * hyp[1] - hyp[2] * mv.x / (sqrt(mv.y) / hyp[3] + p.eps);
            pm |= nearest(mv.x / sm, 512u) << (8u * l);
            pv |= nearest(mv.y / sv, 768u) << (8u * l);
        }
        for (var l = 0u; l < 4u; l++) { grad[base + w * 4u + l] = 0.0; }
        mq[base / 4u + w] = pm;
        vq[base / 4u + w] = pv;
    }
    absmax[blk * 2u] = am;
    absmax[blk * 2u + 1u] = av;
}
