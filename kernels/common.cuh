// Shared helpers for the element-wise kernels: bit-level bf16 conversions and
// the grid-stride split of a range into an unaligned head, a vectorised body
// and a scalar tail.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned long long u64;

// Round-to-nearest-even f32 -> bf16 on the bit pattern. NaN stays NaN (quiet bit
// set, sign and high payload kept), +-Inf stays +-Inf, subnormals round like any
// other value, and overflow past the largest finite bf16 carries into Inf.
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
    uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((x >> 16) | 0x0040u);
    }
    uint32_t lsb = (x >> 16) & 1u;
    return (uint16_t)((x + 0x7fffu + lsb) >> 16);
}

// bf16 -> f32 is exact: bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) {
    return __uint_as_float(((uint32_t)b) << 16);
}

// f16 -> f32 is exact for every value, subnormals included.
__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}

// Index of this thread in the grid and the grid's size, as 64-bit values so
// that ranges over 2^32 elements work.
__device__ __forceinline__ u64 grid_thread() {
    return (u64)blockIdx.x * (u64)blockDim.x + (u64)threadIdx.x;
}

__device__ __forceinline__ u64 grid_threads() {
    return (u64)gridDim.x * (u64)blockDim.x;
}

// Elements before `p` (an array of `elem`-byte elements) reaches a 16-byte
// boundary, capped at n.
__device__ __forceinline__ u64 head_to_align16(const void* p, u64 elem, u64 n) {
    u64 mis = ((u64)p & 15u) / elem;
    u64 head = mis == 0 ? 0 : (16u / elem) - mis;
    return head < n ? head : n;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((u64)p & 15u) == 0;
}

__device__ __forceinline__ bool aligned8(const void* p) {
    return ((u64)p & 7u) == 0;
}
