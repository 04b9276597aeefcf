// Block ranges of packed rows' segment ids: for each (row, block of BQ positions) the smallest and largest id,
// written after the (B, T) ids. Blocked attention (attention_flash.wgsl, has_seg = 2) skips a key block whose
// range misses its query block's: no position of one sees a position of the other, whatever the ids' order.
struct P { B: u32, T: u32, BQ: u32, NB: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> seg: array<i32>;  // (B, T) ids, then (B, NB) x [lo, hi]

@compute @workgroup_size(64)
fn ranges(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 64u;
    if (i >= p.B * p.NB) { return; }
    let row = (i / p.NB) * p.T;
    let j0 = (i % p.NB) * p.BQ;
    var lo = seg[row + j0];
    var hi = lo;
    for (var j = j0 + 1u; j < min(j0 + p.BQ, p.T); j++) {
        let s = seg[row + j];
        lo = min(lo, s);
        hi = max(hi, s);
    }
    seg[p.B * p.T + 2u * i] = lo;
    seg[p.B * p.T + 2u * i + 1u] = hi;
}
