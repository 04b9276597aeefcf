// Rotary position embedding, HF rotate_half convention, in place on (N, nh, hd) rows.
// cos/sin come from a table computed on the CPU in f64 (angles pos * theta^(-2j/hd) lose ~1e-3 rad in f32
// at long positions), indexed by each row's position so packed sequences work.
struct P { N: u32, nh: u32, hd: u32, max_pos: u32, nkv: u32, T: u32, TK: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> pos: array<i32>;       // (N,)
@group(0) @binding(2) var<storage, read> tab: array<f32>;       // (max_pos, hd/2, 2) [cos, sin]
@group(0) @binding(3) var<storage, read_write> x: array<f32>;   // (N, nh, hd)
@group(0) @binding(4) var<storage, read> kin: array<f32>;       // (N, (nh + 2 nkv) * hd) for decode_qkv
@group(0) @binding(6) var<storage, read_write> kc: array<f32>;  // (B, TK, nkv, hd) caches
@group(0) @binding(7) var<storage, read_write> vc: array<f32>;
@group(0) @binding(8) var<storage, read> dyn: array<u32>;       // [position of the first new token, ...]

fn rotate(i: u32, dir: f32) {
    let h2 = p.hd / 2u;
    let j = i % h2;
    let row = i / h2;  // n * nh + head
    let n = row / p.nh;
    if (n >= p.N) { return; }
    let t = u32(clamp(pos[n], 0, i32(p.max_pos) - 1));
    let c = tab[(t * h2 + j) * 2u];
    let s = dir * tab[(t * h2 + j) * 2u + 1u];
    let b = row * p.hd + j;
    let a = x[b];
    let e = x[b + h2];
    x[b] = a * c - e * s;
    x[b + h2] = e * c + a * s;
}

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    rotate(gid.x + gid.y * nw.x * 64u, 1.0);
}

// The transpose of the rotation is the rotation by -angle.
@compute @workgroup_size(64)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    rotate(gid.x + gid.y * nw.x * 64u, -1.0);
}

fn cos_sin(n: u32, j: u32) -> vec2<f32> {
    let h2 = p.hd / 2u;
    let t = u32(clamp(pos[n], 0, i32(p.max_pos) - 1));
    return vec2<f32>(tab[(t * h2 + j) * 2u], tab[(t * h2 + j) * 2u + 1u]);
}

// Decoding, from the fused q/k/v projection qkv (N, (nh + 2 nkv) * hd): roped q into x, roped k and v
// straight into the caches at position dyn[0] — one dispatch instead of three per layer.
@compute @workgroup_size(64)
fn decode_qkv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    let h2 = p.hd / 2u;
    let ld = (p.nh + 2u * p.nkv) * p.hd;
    let nq = p.N * p.nh * h2;
    let nk = p.N * p.nkv * h2;
    if (i < nq + nk) {
        let isk = i >= nq;
        let e = select(i, i - nq, isk);
        let nheads = select(p.nh, p.nkv, isk);
        let j = e % h2;
        let n = e / h2 / nheads;
        let head = (e / h2) % nheads;
        let cs = cos_sin(n, j);
        let src = n * ld + select(0u, p.nh * p.hd, isk) + head * p.hd + j;
        let a = kin[src];
        let f = kin[src + h2];
        if (isk) {
            let dst = ((n / p.T) * p.TK + dyn[0] + n % p.T) * p.nkv * p.hd + head * p.hd + j;
            kc[dst] = a * cs.x - f * cs.y;
            kc[dst + h2] = f * cs.x + a * cs.y;
        } else {
            let dst = (n * p.nh + head) * p.hd + j;
            x[dst] = a * cs.x - f * cs.y;
            x[dst + h2] = f * cs.x + a * cs.y;
        }
        return;
    }
    let e = i - nq - nk;
    let w = p.nkv * p.hd;
    if (e >= p.N * w) { return; }
    let n = e / w;
    vc[((n / p.T) * p.TK + dyn[0] + n % p.T) * w + e % w] = kin[n * ld + (p.nh + p.nkv) * p.hd + e % w];
}
