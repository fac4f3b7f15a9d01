// SwiGLU, the gated activation of Qwen2/Llama MLPs: out = silu(gate) * up,
// with silu(x) = x / (1 + exp(-x)). Inputs and output are bf16; the math is f32.
#pragma once

#include "common.cuh"

__device__ __forceinline__ uint16_t swiglu_one(uint16_t g, uint16_t u) {
    float gf = bf16_bits_to_f32(g);
    float uf = bf16_bits_to_f32(u);
    // expf, not __expf: the fast intrinsic loses accuracy for large |x|.
    float silu = gf / (1.0f + expf(-gf));
    return f32_to_bf16_bits(silu * uf);
}

// Eight bf16 pairs packed in two uint4s -> eight bf16 results.
__device__ __forceinline__ uint4 swiglu_vec8(uint4 g, uint4 u) {
    uint32_t gw[4] = {g.x, g.y, g.z, g.w};
    uint32_t uw[4] = {u.x, u.y, u.z, u.w};
    uint32_t o[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        uint32_t lo = swiglu_one((uint16_t)(gw[k] & 0xffffu), (uint16_t)(uw[k] & 0xffffu));
        uint32_t hi = swiglu_one((uint16_t)(gw[k] >> 16), (uint16_t)(uw[k] >> 16));
        o[k] = lo | (hi << 16);
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
}

// Separate gate and up buffers of n elements each.
extern "C" __global__ void swiglu_bf16(const uint16_t* __restrict__ gate,
                                       const uint16_t* __restrict__ up,
                                       uint16_t* __restrict__ out, u64 n) {
    const u64 tid = grid_thread();
    const u64 stride = grid_threads();
    u64 nvec = 0;
    if (aligned16(gate) && aligned16(up) && aligned16(out)) {
        nvec = n / 8;
        const uint4* vg = reinterpret_cast<const uint4*>(gate);
        const uint4* vu = reinterpret_cast<const uint4*>(up);
        uint4* vo = reinterpret_cast<uint4*>(out);
        for (u64 v = tid; v < nvec; v += stride) {
            vo[v] = swiglu_vec8(vg[v], vu[v]);
        }
    }
    for (u64 i = nvec * 8 + tid; i < n; i += stride) {
        out[i] = swiglu_one(gate[i], up[i]);
    }
}

// One buffer of `rows` rows, each [gate(cols) | up(cols)], as written by a fused
// gate_up projection; out is rows x cols.
extern "C" __global__ void swiglu_fused_bf16(const uint16_t* __restrict__ gate_up,
                                             uint16_t* __restrict__ out, u64 rows, u64 cols) {
    const u64 tid = grid_thread();
    const u64 stride = grid_threads();
    const u64 n = rows * cols;
    if (cols % 8 == 0 && aligned16(gate_up) && aligned16(out)) {
        // Every row starts 16-byte aligned, and 8-element groups never straddle
        // the gate/up boundary or a row end.
        const u64 groups_per_row = cols / 8;
        const u64 nvec = n / 8;
        const uint4* vin = reinterpret_cast<const uint4*>(gate_up);
        uint4* vo = reinterpret_cast<uint4*>(out);
        for (u64 v = tid; v < nvec; v += stride) {
            const u64 r = v / groups_per_row;
            const u64 c = v - r * groups_per_row;
            const u64 base = r * 2 * groups_per_row;
            vo[v] = swiglu_vec8(vin[base + c], vin[base + groups_per_row + c]);
        }
        return;
    }
    for (u64 i = tid; i < n; i += stride) {
        const u64 r = i / cols;
        const u64 c = i - r * cols;
        const u64 base = r * 2 * cols;
        out[i] = swiglu_one(gate_up[base + c], gate_up[base + cols + c]);
    }
}
