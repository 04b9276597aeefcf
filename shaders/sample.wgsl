// Next-token choice on the GPU so that one id per row comes back per decoded token: argmax of the logits
// (temperature 0) or of logits/T + Gumbel noise (an exact sample from softmax(logits/T)). One workgroup
// per row; ties go to the lowest id, as numpy's argmax does. The id is also written where the next
// step's embedding reads it.
struct P { V: u32, ld: u32, temp: f32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> logits: array<f32>;       // (B, ld)
@group(0) @binding(2) var<storage, read> dyn: array<u32>;          // [t_off, seed, ...]
@group(0) @binding(3) var<storage, read_write> out: array<i32>;    // (B,) chosen ids
@group(0) @binding(4) var<storage, read_write> tok: array<i32>;    // (B,) next step's input tokens

var<workgroup> best: array<f32, 256>;
var<workgroup> bidx: array<u32, 256>;

fn pcg(v: u32) -> u32 {
    let s = v * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

@compute @workgroup_size(256)
fn argmax(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x;
    var bs = -3.4e38;
    var bi = 0xffffffffu;
    let key = pcg(dyn[1] ^ pcg(dyn[0] * 2654435761u + b));
    for (var i = lid.x; i < p.V; i += 256u) {
        var s = logits[b * p.ld + i];
        if (p.temp > 0.0) {
            let u = (f32(pcg(key ^ pcg(i)) >> 8u) + 0.5) / 16777216.0;
            s = s / p.temp - log(-log(u));
        }
        if (s > bs) { bs = s; bi = i; }
    }
    best[lid.x] = bs;
    bidx[lid.x] = bi;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) {
            let o = lid.x + w;
            if (best[o] > best[lid.x] || (best[o] == best[lid.x] && bidx[o] < bidx[lid.x])) {
                best[lid.x] = best[o];
                bidx[lid.x] = bidx[o];
            }
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[b] = i32(bidx[0]);
        tok[b] = i32(bidx[0]);
    }
}
