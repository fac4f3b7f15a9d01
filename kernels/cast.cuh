// Casts of checkpoint dtypes to bf16, the compute dtype.
//
// Each kernel peels the elements before the source reaches a 16-byte boundary,
// then (when the destination is suitably aligned at that point too) converts
// the body with 16-byte loads, then converts the remaining tail one element at
// a time. Every loop is grid-stride, so any grid size covers any n.
#pragma once

#include "common.cuh"

// f16 -> bf16, 8 elements (16 bytes in, 16 bytes out) per vector step.
extern "C" __global__ void cast_f16_to_bf16(const uint16_t* __restrict__ src,
                                            uint16_t* __restrict__ dst, u64 n) {
    const u64 tid = grid_thread();
    const u64 stride = grid_threads();
    u64 head = head_to_align16(src, 2, n);
    u64 nvec = 0;
    if (aligned16(dst + head)) {
        nvec = (n - head) / 8;
    } else {
        head = n;
    }
    for (u64 i = tid; i < head; i += stride) {
        dst[i] = f32_to_bf16_bits(f16_bits_to_f32(src[i]));
    }
    const uint4* vsrc = reinterpret_cast<const uint4*>(src + head);
    uint4* vdst = reinterpret_cast<uint4*>(dst + head);
    for (u64 v = tid; v < nvec; v += stride) {
        uint4 in = vsrc[v];
        uint32_t w[4] = {in.x, in.y, in.z, in.w};
        uint32_t o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            uint32_t lo = f32_to_bf16_bits(f16_bits_to_f32((uint16_t)(w[k] & 0xffffu)));
            uint32_t hi = f32_to_bf16_bits(f16_bits_to_f32((uint16_t)(w[k] >> 16)));
            o[k] = lo | (hi << 16);
        }
        vdst[v] = make_uint4(o[0], o[1], o[2], o[3]);
    }
    for (u64 i = head + nvec * 8 + tid; i < n; i += stride) {
        dst[i] = f32_to_bf16_bits(f16_bits_to_f32(src[i]));
    }
}

// f32 -> bf16, 4 elements (16 bytes in, 8 bytes out) per vector step.
extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ src,
                                            uint16_t* __restrict__ dst, u64 n) {
    const u64 tid = grid_thread();
    const u64 stride = grid_threads();
    u64 head = head_to_align16(src, 4, n);
    u64 nvec = 0;
    if (aligned8(dst + head)) {
        nvec = (n - head) / 4;
    } else {
        head = n;
    }
    for (u64 i = tid; i < head; i += stride) {
        dst[i] = f32_to_bf16_bits(src[i]);
    }
    const float4* vsrc = reinterpret_cast<const float4*>(src + head);
    uint2* vdst = reinterpret_cast<uint2*>(dst + head);
    for (u64 v = tid; v < nvec; v += stride) {
        float4 in = vsrc[v];
        uint32_t lo = (uint32_t)f32_to_bf16_bits(in.x) | ((uint32_t)f32_to_bf16_bits(in.y) << 16);
        uint32_t hi = (uint32_t)f32_to_bf16_bits(in.z) | ((uint32_t)f32_to_bf16_bits(in.w) << 16);
        vdst[v] = make_uint2(lo, hi);
    }
    for (u64 i = head + nvec * 4 + tid; i < n; i += stride) {
        dst[i] = f32_to_bf16_bits(src[i]);
    }
}
