// Weight formats, included by matmul.wgsl and embed.wgsl (which declare `p.w_ld`).
// w4(row, col, ncols) = W[row, col..col+3] as f32, col % 4 == 0. Quantized rows are blocks of 32 along
// the input dimension (ggml layout), dequantized here in registers; nothing is expanded in memory.
//   F32 : wq f32 (rows, w_ld)                     — guarded past ncols
//   F16 : wq u32 = 2 halves, rows padded to w_ld % 4 == 0 with zeros
//   Q4_1: wq u32 (rows, nb, 4) nibbles, ws u32 (rows, nb) = f16 [d, m]; w = d*q + m; w_ld = nb
//   Q8_0: wq u32 (rows, nb, 8) int8, ws u32 = f16 d, two per word; w = d*q; w_ld = nb
//#if F32
@group(0) @binding(2) var<storage, read> wq: array<f32>;
fn w4(row: u32, col: u32, ncols: u32) -> vec4<f32> {
    let b = row * p.w_ld + col;
    if (col + 3u < ncols) {
        return vec4<f32>(wq[b], wq[b + 1u], wq[b + 2u], wq[b + 3u]);
    }
    var r = vec4<f32>(0.0);
    for (var l = 0u; l < 4u; l++) {
        if (col + l < ncols) { r[l] = wq[b + l]; }
    }
    return r;
}
//#endif
//#if F16
@group(0) @binding(2) var<storage, read> wq: array<u32>;
fn w4(row: u32, col: u32, ncols: u32) -> vec4<f32> {
    let e = (row * p.w_ld + col) / 2u;
    return vec4<f32>(unpack2x16float(wq[e]), unpack2x16float(wq[e + 1u]));
}
//#endif
//#if Q4_1
@group(0) @binding(2) var<storage, read> wq: array<u32>;
@group(0) @binding(3) var<storage, read> ws: array<u32>;
fn w4(row: u32, col: u32, ncols: u32) -> vec4<f32> {
    let blk = row * p.w_ld + col / 32u;
    let j = col % 32u;
    let word = wq[blk * 4u + (j % 16u) / 4u];
    let sh = select(0u, 4u, j >= 16u);
    let q = vec4<u32>(word >> sh, word >> (sh + 8u), word >> (sh + 16u), word >> (sh + 24u)) & vec4<u32>(15u);
    let dm = unpack2x16float(ws[blk]);
    return vec4<f32>(q) * dm.x + dm.y;
}
//#endif
//#if Q8_0
@group(0) @binding(2) var<storage, read> wq: array<u32>;
@group(0) @binding(3) var<storage, read> ws: array<u32>;
fn w4(row: u32, col: u32, ncols: u32) -> vec4<f32> {
    let blk = row * p.w_ld + col / 32u;
    let w = bitcast<i32>(wq[blk * 8u + (col % 32u) / 4u]);
    let q = vec4<i32>(extractBits(w, 0u, 8u), extractBits(w, 8u, 8u), extractBits(w, 16u, 8u), extractBits(w, 24u, 8u));
    let d = unpack2x16float(ws[blk / 2u])[blk % 2u];
    return vec4<f32>(q) * d;
}
//#endif
