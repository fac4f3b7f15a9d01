// Dequantization of ggml blocks (as GGUF stores them) into bf16 or f16, two
// kernels per type (`dequant_<type>_bf16`, `dequant_<type>_f16`), and the
// fused dequantize-and-multiply of a few tokens (`gemv_<type>_t<n>`, at the end),
// compiled into their own PTX module (kernels/ptx/dequant.ptx) and loaded by
// `quant::device::DequantKernels`.
//
// For the block types each thread computes 8 consecutive outputs (grid-stride
// over n / 8 groups; a block's 32 or 256 elements are a whole number of
// groups) with one `NAME_decode8`, which decodes the sub-block's scales once,
// and writes them with one 16-byte store where the output allows. The plain
// float types (f32, f16, bf16) compute one element per thread. Products
// and sums are single f32 operations with round-to-nearest (__fmul_rn,
// __fadd_rn, __fsub_rn: never contracted into an FMA) in the order of the
// host decoder (src/quant/blocks.rs), then rounded to bf16 or f16 to nearest
// even, so the output is bit-identical to `quant::dequantize_bf16` /
// `quant::dequantize_f16`.
//
// f16 saturates: a value beyond its range (a block scale times a large code
// can reach 65504 * 127 in Q8_0) becomes +-65504, not inf, and every NaN is
// 0x7e00 (see f32_to_f16_sat_bits).
//
// Blocks are read byte by byte: block sizes (18, 22, 34, 210 ... bytes) leave
// multi-byte fields unaligned.
#include "common.cuh"

__device__ __forceinline__ float f16_at(const uint8_t* b) {
    return f16_bits_to_f32((uint16_t)(b[0] | ((uint16_t)b[1] << 8)));
}

// f32 -> f16 to nearest even, saturating: finite values beyond +-65504 and
// infinities become +-65504 (cvt's .satfinite), NaN becomes 0x7e00. Mirrors
// `quant::f32_to_f16_sat` on the host.
__device__ __forceinline__ uint16_t f32_to_f16_sat_bits(float x) {
    if (isnan(x)) {
        return (uint16_t)0x7e00u;
    }
    x = fminf(fmaxf(x, -65504.0f), 65504.0f);
    return __half_as_ushort(__float2half_rn(x));
}

// One element decoder per type, `float NAME_value(block, e)`; for the plain
// float types two kernels over it, `dequant_NAME_bf16` and `dequant_NAME_f16`
// (the block types' kernels are built on `NAME_decode8` below).
#define DEQUANT_KERNEL_OUT(NAME, QK, BYTES, OUT, CONVERT)                               \
    extern "C" __global__ void dequant_##NAME##_##OUT(const uint8_t* __restrict__ src,  \
                                                      uint16_t* __restrict__ dst, u64 n) { \
        for (u64 i = grid_thread(); i < n; i += grid_threads()) {                      \
            const uint8_t* b = src + (i / (QK)) * (BYTES);                             \
            dst[i] = CONVERT(NAME##_value(b, (unsigned)(i % (QK))));                   \
        }                                                                              \
    }

#define DEQUANT_VALUE(NAME, ...)                                                       \
    __device__ __forceinline__ float NAME##_value(const uint8_t* b, unsigned e) {      \
        float x;                                                                       \
        (void)e;                                                                       \
        __VA_ARGS__                                                                    \
        return x;                                                                      \
    }

#define DEQUANT_KERNEL(NAME, QK, BYTES, ...)                                           \
    DEQUANT_VALUE(NAME, __VA_ARGS__)                                                   \
    DEQUANT_KERNEL_OUT(NAME, QK, BYTES, bf16, f32_to_bf16_bits)                        \
    DEQUANT_KERNEL_OUT(NAME, QK, BYTES, f16, f32_to_f16_sat_bits)

DEQUANT_KERNEL(f32, 1, 4, {
    x = __uint_as_float((uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) |
                        ((uint32_t)b[3] << 24));
})

// f16 to f16 and bf16 to bf16 are copies (a NaN keeps its payload, as on
// the host); the other direction converts.
__device__ __forceinline__ uint16_t u16_at(const uint8_t* src, u64 i) {
    return (uint16_t)(src[2 * i] | ((uint16_t)src[2 * i + 1] << 8));
}

extern "C" __global__ void dequant_f16_bf16(const uint8_t* __restrict__ src,
                                            uint16_t* __restrict__ dst, u64 n) {
    for (u64 i = grid_thread(); i < n; i += grid_threads()) {
        dst[i] = f32_to_bf16_bits(f16_bits_to_f32(u16_at(src, i)));
    }
}

extern "C" __global__ void dequant_f16_f16(const uint8_t* __restrict__ src,
                                           uint16_t* __restrict__ dst, u64 n) {
    for (u64 i = grid_thread(); i < n; i += grid_threads()) {
        dst[i] = u16_at(src, i);
    }
}

extern "C" __global__ void dequant_bf16_bf16(const uint8_t* __restrict__ src,
                                             uint16_t* __restrict__ dst, u64 n) {
    for (u64 i = grid_thread(); i < n; i += grid_threads()) {
        dst[i] = u16_at(src, i);
    }
}

extern "C" __global__ void dequant_bf16_f16(const uint8_t* __restrict__ src,
                                            uint16_t* __restrict__ dst, u64 n) {
    for (u64 i = grid_thread(); i < n; i += grid_threads()) {
        dst[i] = f32_to_f16_sat_bits(bf16_bits_to_f32(u16_at(src, i)));
    }
}

// Q8_0: f16 d, 32 x i8.
DEQUANT_VALUE(q8_0, {
    x = __fmul_rn((float)(int8_t)b[2 + e], f16_at(b));
})

// Nibble of element e (0..32) of a 16-byte Q4_x/Q5_x payload: low nibbles are
// elements 0..16, high nibbles 16..32.
__device__ __forceinline__ unsigned nibble32(const uint8_t* qs, unsigned e) {
    return e < 16 ? (qs[e] & 0x0fu) : (qs[e - 16] >> 4);
}

// Fifth bit of element e from a little-endian u32 of high bits.
__device__ __forceinline__ unsigned high_bit32(const uint8_t* qh, unsigned e) {
    return (qh[e / 8] >> (e % 8)) & 1u;
}

// Q4_0: f16 d, 16 bytes of nibbles; x = d * (q - 8).
DEQUANT_VALUE(q4_0, {
    x = __fmul_rn(f16_at(b), (float)((int)nibble32(b + 2, e) - 8));
})

// Q4_1: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m.
DEQUANT_VALUE(q4_1, {
    x = __fadd_rn(__fmul_rn(f16_at(b), (float)nibble32(b + 4, e)), f16_at(b + 2));
})

// Q5_0: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles; x = d * (q - 16).
DEQUANT_VALUE(q5_0, {
    int q = (int)(nibble32(b + 6, e) | (high_bit32(b + 2, e) << 4));
    x = __fmul_rn(f16_at(b), (float)(q - 16));
})

// Q5_1: f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles; x = d * q + m.
DEQUANT_VALUE(q5_1, {
    unsigned q = nibble32(b + 8, e) | (high_bit32(b + 4, e) << 4);
    x = __fadd_rn(__fmul_rn(f16_at(b), (float)q), f16_at(b + 2));
})

// Six-bit scale and min of sub-block j (0..8) from the 12 scale bytes of a
// Q4_K/Q5_K block.
__device__ __forceinline__ void scale_min_k4(unsigned j, const uint8_t* s, unsigned* sc,
                                             unsigned* m) {
    if (j < 4) {
        *sc = s[j] & 63u;
        *m = s[j + 4] & 63u;
    } else {
        *sc = (s[j + 4] & 0x0fu) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Element e (0..256) of a K block: x = (d * sc) * q - dmin * m. The nibble
// of element e sits in byte (e / 64) * 32 + e % 32 of qs, low for even
// sub-blocks and high for odd ones.
__device__ __forceinline__ float k_value(const uint8_t* b, unsigned e, unsigned q) {
    unsigned sc, m;
    scale_min_k4(e / 32, b + 4, &sc, &m);
    float dl = __fmul_rn(f16_at(b), (float)sc);
    float ml = __fmul_rn(f16_at(b + 2), (float)m);
    return __fsub_rn(__fmul_rn(dl, (float)q), ml);
}

__device__ __forceinline__ unsigned k_nibble(const uint8_t* qs, unsigned e) {
    unsigned j = e / 32;
    return (qs[(j / 2) * 32 + e % 32] >> (4 * (j % 2))) & 0x0fu;
}

// Q4_K: f16 d, f16 dmin, 12 scale bytes, 128 bytes of nibbles.
DEQUANT_VALUE(q4_k, { x = k_value(b, e, k_nibble(b + 16, e)); })

// Q5_K: as Q4_K with 32 bytes of fifth bits before the nibbles: bit j of byte
// l is element l of sub-block j.
DEQUANT_VALUE(q5_k, {
    unsigned q = k_nibble(b + 48, e) | (((b[16 + e % 32] >> (e / 32)) & 1u) << 4);
    x = k_value(b, e, q);
})

// Q6_K: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed scales,
// f16 d; x = (d * scale) * (q - 32).
DEQUANT_VALUE(q6_k, {
    unsigned half = e / 128, r = e % 128;
    unsigned low = r < 64 ? (b[half * 64 + r] & 0x0fu) : (b[half * 64 + r - 64] >> 4);
    unsigned high = (b[128 + half * 32 + r % 32] >> (2 * (r / 32))) & 3u;
    float ds = __fmul_rn(f16_at(b + 208), (float)(int8_t)b[192 + e / 16]);
    x = __fmul_rn(ds, (float)((int)(low | (high << 4)) - 32));
})

// Eight consecutive elements e0..e0+8 of one block (e0 a multiple of 8), one
// decoder per block type, `NAME_decode8(block, e0, out)`: the sub-block's
// scale and min are decoded once and the packed values read with as few
// loads as the address's alignment allows. Every output is bit-identical to
// `NAME_value(block, e0 + i)` (the same f32 results: the integer codes are
// converted exactly, and a multiply-add is fused only where its product is
// exact).

// The 4 bytes at p as a little-endian u32, with the widest loads p's
// alignment allows.
__device__ __forceinline__ uint32_t load_u32(const uint8_t* p) {
    const u64 a = (u64)p;
    if ((a & 3u) == 0) {
        return *reinterpret_cast<const uint32_t*>(p);
    }
    if ((a & 1u) == 0) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
        return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
    }
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

// The 8 bytes at p as two little-endian u32 (bytes 0..4, 4..8).
__device__ __forceinline__ uint2 load_u64(const uint8_t* p) {
    if (((u64)p & 7u) == 0) {
        return *reinterpret_cast<const uint2*>(p);
    }
    return make_uint2(load_u32(p), load_u32(p + 4));
}

// Byte i (0..8, a compile-time constant once unrolled) of 8 loaded bytes.
__device__ __forceinline__ unsigned byte_of(uint2 v, int i) {
    return ((i < 4 ? v.x : v.y) >> (8 * (i & 3))) & 0xffu;
}

// Exact f32 of a small integer without an int-to-float conversion (those
// issue at a fraction of the rate of float arithmetic): the float whose bits
// are 2^23's plus v is 2^23 + v, for 0 <= v < 2^23 (u2f_small) and, from
// 1.5 * 2^23, for |v| < 2^22 (i2f_small); the subtraction is exact.
__device__ __forceinline__ float u2f_small(unsigned v) {
    return __fsub_rn(__uint_as_float(0x4b000000u | v), 8388608.0f);
}

__device__ __forceinline__ float i2f_small(int v) {
    return __fsub_rn(__uint_as_float(0x4b400000u + (unsigned)v), 12582912.0f);
}

// a * q + c where the product a * q is exact in f32 (a a 16-bit float times
// a 6-bit integer or less, q an integer below 32: at most 22 significant
// bits), so one fused multiply-add equals the rounded product plus c,
// rounded: __fadd_rn(__fmul_rn(a, q), c), bit for bit, NaN and infinities
// included.
__device__ __forceinline__ float fma_exact(float a, float q, float c) {
    return __fmaf_rn(a, q, c);
}

// Q8_0: bytes 2 + e0 .. 2 + e0 + 8.
__device__ __forceinline__ void q8_0_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    const float d = f16_at(b);
    const uint2 q = load_u64(b + 2 + e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        out[i] = __fmul_rn(i2f_small((int)(int8_t)byte_of(q, i)), d);
    }
}

// The 8 nibbles of elements e0..e0+8 of a 16-byte Q4_x/Q5_x payload (see
// nibble32): low nibbles of qs[e0..] below 16, high nibbles of qs[e0-16..]
// from 16 on.
__device__ __forceinline__ uint2 nibbles8(const uint8_t* qs, unsigned e0) {
    const uint2 v = load_u64(qs + (e0 & 15u));
    const unsigned s = e0 < 16 ? 0u : 4u;
    return make_uint2((v.x >> s) & 0x0f0f0f0fu, (v.y >> s) & 0x0f0f0f0fu);
}

// Q4_0: x = d * (q - 8).
__device__ __forceinline__ void q4_0_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    const float d = f16_at(b);
    const uint2 q = nibbles8(b + 2, e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        out[i] = __fmul_rn(d, i2f_small((int)byte_of(q, i) - 8));
    }
}

// Q4_1: x = d * q + m.
__device__ __forceinline__ void q4_1_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    const float d = f16_at(b), m = f16_at(b + 2);
    const uint2 q = nibbles8(b + 4, e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        out[i] = fma_exact(d, u2f_small(byte_of(q, i)), m);
    }
}

// Q5_0: x = d * (q - 16), the fifth bits of e0..e0+8 in byte e0 / 8 of qh.
__device__ __forceinline__ void q5_0_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    const float d = f16_at(b);
    const unsigned h = b[2 + e0 / 8];
    const uint2 q = nibbles8(b + 6, e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int v = (int)(byte_of(q, i) | (((h >> i) & 1u) << 4));
        out[i] = __fmul_rn(d, i2f_small(v - 16));
    }
}

// Q5_1: x = d * q + m.
__device__ __forceinline__ void q5_1_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    const float d = f16_at(b), m = f16_at(b + 2);
    const unsigned h = b[4 + e0 / 8];
    const uint2 q = nibbles8(b + 8, e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const unsigned v = byte_of(q, i) | (((h >> i) & 1u) << 4);
        out[i] = fma_exact(d, u2f_small(v), m);
    }
}

// The nibbles of elements e0..e0+8 of a K block's qs (see k_nibble).
__device__ __forceinline__ uint2 k_nibbles8(const uint8_t* qs, unsigned e0) {
    const unsigned j = e0 / 32;
    const uint2 v = load_u64(qs + (j / 2) * 32 + e0 % 32);
    const unsigned s = 4 * (j % 2);
    return make_uint2((v.x >> s) & 0x0f0f0f0fu, (v.y >> s) & 0x0f0f0f0fu);
}

// Sub-block scale and min of a Q4_K/Q5_K block for elements from e0, as
// k_value computes them: dl = d * sc, ml = dmin * m.
__device__ __forceinline__ void k_scales(const uint8_t* b, unsigned e0, float* dl, float* ml) {
    unsigned sc, m;
    scale_min_k4(e0 / 32, b + 4, &sc, &m);
    *dl = __fmul_rn(f16_at(b), u2f_small(sc));
    *ml = __fmul_rn(f16_at(b + 2), u2f_small(m));
}

// Q4_K: x = dl * q - ml.
__device__ __forceinline__ void q4_k_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    float dl, ml;
    k_scales(b, e0, &dl, &ml);
    const uint2 q = k_nibbles8(b + 16, e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        out[i] = fma_exact(dl, u2f_small(byte_of(q, i)), -ml);
    }
}

// Q5_K: the fifth bit of element e is bit e / 32 of qh[e % 32].
__device__ __forceinline__ void q5_k_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    float dl, ml;
    k_scales(b, e0, &dl, &ml);
    const uint2 q = k_nibbles8(b + 48, e0);
    const uint2 h = load_u64(b + 16 + e0 % 32);
    const unsigned j = e0 / 32;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const unsigned v = byte_of(q, i) | (((byte_of(h, i) >> j) & 1u) << 4);
        out[i] = fma_exact(dl, u2f_small(v), -ml);
    }
}

// Q6_K: elements e0..e0+8 share one half (e / 128), one 32-quarter of it and
// one signed scale (e / 16).
__device__ __forceinline__ void q6_k_decode8(const uint8_t* b, unsigned e0, float out[8]) {
    const unsigned half = e0 / 128, r = e0 % 128;
    const uint2 lo = load_u64(b + half * 64 + r % 64);
    const unsigned ls = r < 64 ? 0u : 4u;
    const uint2 hi = load_u64(b + 128 + half * 32 + r % 32);
    const unsigned hs = 2 * (r / 32);
    const float ds = __fmul_rn(f16_at(b + 208), i2f_small((int8_t)b[192 + e0 / 16]));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const unsigned low = (byte_of(lo, i) >> ls) & 0x0fu;
        const unsigned high = (byte_of(hi, i) >> hs) & 3u;
        out[i] = __fmul_rn(ds, i2f_small((int)(low | (high << 4)) - 32));
    }
}

// Eight converted outputs (as four pairs) at p = dst + 8 * group: one 16-byte
// store when dst is 16-byte aligned (mis, dst's address mod 16, is then 0 for
// every group), four 4-byte stores when it is 4-byte aligned, else eight
// 2-byte stores.
__device__ __forceinline__ void store8(uint16_t* p, const uint32_t w[4], unsigned mis) {
    if (mis == 0) {
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else if ((mis & 3u) == 0) {
        uint32_t* q = reinterpret_cast<uint32_t*>(p);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            q[k] = w[k];
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            p[2 * k] = (uint16_t)(w[k] & 0xffffu);
            p[2 * k + 1] = (uint16_t)(w[k] >> 16);
        }
    }
}

// `dequant_NAME_bf16` / `dequant_NAME_f16` of a block type: group g is
// elements 8g..8g+8, in block g / (QK / 8).
#define DEQUANT_KERNEL8_OUT(NAME, QK, BYTES, OUT, CONVERT)                              \
    extern "C" __global__ void dequant_##NAME##_##OUT(const uint8_t* __restrict__ src,  \
                                                      uint16_t* __restrict__ dst, u64 n) { \
        const u64 groups = n / 8;                                                      \
        const unsigned mis = (unsigned)((u64)dst & 15u);                               \
        for (u64 g = grid_thread(); g < groups; g += grid_threads()) {                 \
            float v[8];                                                                \
            NAME##_decode8(src + (g / ((QK) / 8)) * (BYTES),                           \
                           (unsigned)(g % ((QK) / 8)) * 8u, v);                        \
            uint32_t w[4];                                                             \
            _Pragma("unroll") for (int k = 0; k < 4; ++k) {                            \
                w[k] = (uint32_t)CONVERT(v[2 * k]) |                                   \
                       ((uint32_t)CONVERT(v[2 * k + 1]) << 16);                        \
            }                                                                          \
            store8(dst + 8 * g, w, mis);                                               \
        }                                                                              \
    }

#define DEQUANT_KERNEL8(NAME, QK, BYTES)                                               \
    DEQUANT_KERNEL8_OUT(NAME, QK, BYTES, bf16, f32_to_bf16_bits)                       \
    DEQUANT_KERNEL8_OUT(NAME, QK, BYTES, f16, f32_to_f16_sat_bits)

DEQUANT_KERNEL8(q8_0, 32, 34)
DEQUANT_KERNEL8(q4_0, 32, 18)
DEQUANT_KERNEL8(q4_1, 32, 20)
DEQUANT_KERNEL8(q5_0, 32, 22)
DEQUANT_KERNEL8(q5_1, 32, 24)
DEQUANT_KERNEL8(q4_k, 256, 144)
DEQUANT_KERNEL8(q5_k, 256, 176)
DEQUANT_KERNEL8(q6_k, 256, 210)

// FP8 weights as safetensors checkpoints store them: a [rows, cols] matrix of
// E4M3 (float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN) or E5M2 (the
// top byte of an f16) codes, and one f32/bf16/f16 scale per tile_rows x
// tile_cols tile (128x128 blocks, one row, or the whole matrix), row-major
// over the tile grid. x = fp8 * scale, one f32 product, then bf16 to nearest
// even with one canonical NaN (0x7fc0), or f16 saturating with one canonical
// NaN (0x7e00): a NaN's payload after a multiply differs between the host and
// the device, so neither keeps it. Bit-identical to
// `quant::fp8::dequantize_bf16` / `quant::fp8::dequantize_f16`.
__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    uint32_t e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15u && m == 7u) {
        return __uint_as_float(sign | 0x7fc00000u);
    }
    if (e == 0u) {
        // Subnormal: m * 2^-9, exact.
        return __uint_as_float(__float_as_uint((float)m * 0.001953125f) | sign);
    }
    return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

__device__ __forceinline__ float fp8_scale_at(const uint8_t* s, u64 i, unsigned dtype) {
    if (dtype == 0u) {
        const uint8_t* b = s + 4 * i;
        return __uint_as_float((uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) |
                               ((uint32_t)b[3] << 24));
    }
    uint16_t h = (uint16_t)(s[2 * i] | ((uint16_t)s[2 * i + 1] << 8));
    return dtype == 1u ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

// One FP8 weight into bf16 (OUT_F16 false) or f16 (true, saturating). flags:
// bits 0..8 the format (0 E4M3, 1 E5M2), bits 8..16 the scale dtype (0 f32,
// 1 bf16, 2 f16). Rows stride over blockIdx.y, columns over the x dimension of
// the grid; every size is below 2^32 (checked on the host).
template <bool OUT_F16>
__device__ __forceinline__ void dequant_fp8(const uint8_t* __restrict__ src,
                                            const uint8_t* __restrict__ scale,
                                            uint16_t* __restrict__ dst, u64 rows, u64 cols,
                                            u64 tile_rows, u64 tile_cols, u64 flags) {
    const unsigned format = (unsigned)(flags & 0xffu);
    const unsigned sdt = (unsigned)((flags >> 8) & 0xffu);
    const unsigned nc = (unsigned)cols, tr = (unsigned)tile_rows, tc = (unsigned)tile_cols;
    const u64 grid_cols = (cols + tile_cols - 1) / tile_cols;
    for (unsigned r = blockIdx.y; r < (unsigned)rows; r += gridDim.y) {
        const u64 row = (u64)r * cols;
        const u64 srow = (u64)(r / tr) * grid_cols;
        for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < nc;
             c += gridDim.x * blockDim.x) {
            uint8_t q = src[row + c];
            float w = format == 0u ? e4m3_to_f32(q) : f16_bits_to_f32((uint16_t)q << 8);
            float x = __fmul_rn(w, fp8_scale_at(scale, srow + c / tc, sdt));
            if (OUT_F16) {
                dst[row + c] = f32_to_f16_sat_bits(x);
            } else {
                dst[row + c] = isnan(x) ? (uint16_t)0x7fc0u : f32_to_bf16_bits(x);
            }
        }
    }
}

extern "C" __global__ void dequant_fp8_bf16(const uint8_t* __restrict__ src,
                                            const uint8_t* __restrict__ scale,
                                            uint16_t* __restrict__ dst, u64 rows, u64 cols,
                                            u64 tile_rows, u64 tile_cols, u64 flags) {
    dequant_fp8<false>(src, scale, dst, rows, cols, tile_rows, tile_cols, flags);
}

extern "C" __global__ void dequant_fp8_f16(const uint8_t* __restrict__ src,
                                           const uint8_t* __restrict__ scale,
                                           uint16_t* __restrict__ dst, u64 rows, u64 cols,
                                           u64 tile_rows, u64 tile_cols, u64 flags) {
    dequant_fp8<true>(src, scale, dst, rows, cols, tile_rows, tile_cols, flags);
}

// Rows of a [rows, hidden] matrix of ggml blocks gathered by token id into
// f32: dst[t * hidden + c] = element c of row ids[t], rounded to bf16
// (out_f16 == 0) or f16 (saturating) as the kernels above round, then
// widened. The embedding lookup of a tied quantized model, whose matrix
// stays on the device as its blocks for the output GEMM: the same values as
// a lookup in the dequantized 16-bit matrix. hidden is a multiple of QK
// (checked on the host), so a group of 8 outputs never crosses a row.
__device__ __forceinline__ void store8_f32(float* p, const float v[8], bool vec) {
    if (vec) {
        float4* q = reinterpret_cast<float4*>(p);
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            p[k] = v[k];
        }
    }
}

#define DEQUANT_GATHER(NAME, QK, BYTES)                                                \
    extern "C" __global__ void gather_##NAME##_f32(const uint8_t* __restrict__ src,    \
                                                   const uint32_t* __restrict__ ids,   \
                                                   float* __restrict__ dst, u64 tokens, \
                                                   u64 hidden, u64 out_f16) {          \
        const u64 per_row = hidden / 8, groups = tokens * per_row;                     \
        const u64 row_bytes = hidden / (QK) * (BYTES);                                 \
        const bool vec = aligned16(dst);                                               \
        for (u64 g = grid_thread(); g < groups; g += grid_threads()) {                 \
            const u64 t = g / per_row, c = (g % per_row) * 8;                          \
            const uint8_t* b = src + (u64)ids[t] * row_bytes + (c / (QK)) * (BYTES);   \
            float v[8];                                                                \
            NAME##_decode8(b, (unsigned)(c % (QK)), v);                                \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                            \
                v[k] = out_f16 ? f16_bits_to_f32(f32_to_f16_sat_bits(v[k]))            \
                               : bf16_bits_to_f32(f32_to_bf16_bits(v[k]));             \
            }                                                                          \
            store8_f32(dst + 8 * g, v, vec);                                           \
        }                                                                              \
    }

DEQUANT_GATHER(q8_0, 32, 34)
DEQUANT_GATHER(q4_0, 32, 18)
DEQUANT_GATHER(q4_1, 32, 20)
DEQUANT_GATHER(q5_0, 32, 22)
DEQUANT_GATHER(q5_1, 32, 24)
DEQUANT_GATHER(q4_k, 256, 144)
DEQUANT_GATHER(q5_k, 256, 176)
DEQUANT_GATHER(q6_k, 256, 210)

// Fused dequantization and product for a few tokens (decode):
// y[b * ldy + r] (+)= sum_k W[r, k] * x[b, k] for b < t (t <= 8) and
// r < rows, W a [rows, k] matrix of ggml blocks (row r at w + r * row_bytes,
// k a multiple of QK, checked on the host). Each weight is the decoded value
// rounded to the model dtype (bf16, or f16 saturating) as the dequantization
// kernels above write it, so the product uses the weights the dequantize +
// GEMM path multiplies. x is [t, k] 16-bit of the model dtype, x_hi plus
// x_lo when x_lo is not null (summed in f32). Products accumulate in f32.
//
// flags: bit 0 the model dtype (0 bf16, 1 f16), of x, of the weights'
// rounding and of a 16-bit y; bit 1 y is 16-bit (else f32); bit 2 y
// accumulates (beta = 1, f32 y only; else beta = 0 and y is not read).
//
// One warp per output row (rows stride over the grid's warps, GEMV_WARPS to
// a block); its lanes keep one accumulator per token, summed with shuffles
// at the row's end, and lane b writes token b's output. Weights are decoded
// with the dequantization kernels' decoders (or, for Q4_K, the same
// arithmetic on wider loads) and rounded as they round. Two ways through
// a row:
// - Direct (every type but Q4_K): lanes stride over the row's 8-element
//   chunks with one decode8 each, straight from global memory.
// - Staged (Q4_K): the warp reads its row in spans of whole blocks, up to
//   2 KiB: each lane loads 4 of the span's 16-byte granules into registers
//   with independent loads (the granules cut by the span's ends byte by
//   byte, so nothing outside the span is read), the warp stores them to its
//   shared tile, issues the next span's loads and only then multiplies this
//   one, so a span's DRAM latency hides behind the previous span's
//   arithmetic; with the tile 16-byte aligned each lane takes 16 weights
//   of one block at a time (span_product_q4_k), else one decode8 chunk.
// One entry point per token count (`gemv_NAME_t1`, `_t2`, `_t4`, `_t8`: the
// least that covers t), so the loops over tokens are unrolled and one
// token neither issues eight tokens' instructions nor pays their
// registers; the model dtype is a branch outside the loops.
#define GEMV_F16 1u
#define GEMV_Y16 2u
#define GEMV_ACCUMULATE 4u

// Eight 16-bit values of the model dtype (f16 when F16, else bf16) at p
// (16-byte aligned when vec) widened to f32.
template <bool F16>
__device__ __forceinline__ void load_h8(const uint16_t* p, bool vec, float out[8]) {
    uint32_t w[4];
    if (vec) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = v.x;
        w[1] = v.y;
        w[2] = v.z;
        w[3] = v.w;
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            w[k] = (uint32_t)p[2 * k] | ((uint32_t)p[2 * k + 1] << 16);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (F16) {
            out[2 * i] = f16_bits_to_f32((uint16_t)(w[i] & 0xffffu));
            out[2 * i + 1] = f16_bits_to_f32((uint16_t)(w[i] >> 16));
        } else {
            out[2 * i] = __uint_as_float(w[i] << 16);
            out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
}

// acc[b] += dot(wv, x[b, off .. off + 8]) for b < t.
template <unsigned NT, bool F16>
__device__ __forceinline__ void gemv_chunk(const float wv[8], const uint16_t* x_hi,
                                           const uint16_t* x_lo, u64 off, u64 k, unsigned t,
                                           bool vec, float acc[8]) {
#pragma unroll
    for (unsigned b = 0; b < NT; ++b) {
        if (b < t) {
            float xv[8];
            load_h8<F16>(x_hi + b * k + off, vec, xv);
            if (x_lo) {
                float lv[8];
                load_h8<F16>(x_lo + b * k + off, vec, lv);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    xv[i] = __fadd_rn(xv[i], lv[i]);
                }
            }
            float s = acc[b];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                s = fmaf(wv[i], xv[i], s);
            }
            acc[b] = s;
        }
    }
}

// Sums each token's accumulator over the warp; lane b < t writes token b.
template <unsigned NT>
__device__ __forceinline__ void gemv_store(float acc[8], void* y, u64 r, u64 ldy, unsigned t,
                                           unsigned flags) {
    const unsigned lane = threadIdx.x % 32;
    float mine = 0.0f;
#pragma unroll
    for (unsigned b = 0; b < NT; ++b) {
        if (b < t) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
            }
            if (lane == b) {
                mine = acc[b];
            }
        }
    }
    if (lane >= t) {
        return;
    }
    const u64 i = (u64)lane * ldy + r;
    if (flags & GEMV_Y16) {
        static_cast<uint16_t*>(y)[i] = (flags & GEMV_F16) ? __half_as_ushort(__float2half_rn(mine))
                                                          : f32_to_bf16_bits(mine);
    } else {
        float* yf = static_cast<float*>(y);
        yf[i] = (flags & GEMV_ACCUMULATE) ? yf[i] + mine : mine;
    }
}

// Eight weights rounded to the model dtype and widened back, as the
// dequantization kernels round them, two to one conversion instruction: f16
// to nearest even, saturating (cvt.rn.satfinite.f16x2.f32: beyond +-65504,
// infinities included, +-65504, as f32_to_f16_sat_bits), or bf16 to nearest
// even (cvt.rn.bf16x2.f32, as f32_to_bf16_bits); only NaN payloads may
// differ, and a NaN weight makes a NaN product either way.
template <bool F16>
__device__ __forceinline__ void round_weights(float w[8]) {
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
        if (F16) {
            uint32_t r;
            asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(w[i + 1]), "f"(w[i]));
            w[i] = f16_bits_to_f32((uint16_t)(r & 0xffffu));
            w[i + 1] = f16_bits_to_f32((uint16_t)(r >> 16));
        } else {
            uint32_t r;
            asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(w[i + 1]), "f"(w[i]));
            w[i] = __uint_as_float(r << 16);
            w[i + 1] = __uint_as_float(r & 0xffff0000u);
        }
    }
}

// Warps per block of the gemv kernels (the host launches GEMV_WARPS * 32
// threads) and 16-byte granules per warp tile (4 per lane).
#define GEMV_WARPS 8u
#define GEMV_GRANULES 128u

// The 16 bytes of the granule at g, those outside [lo, hi) read as 0.
__device__ __forceinline__ uint4 granule_part(u64 g, u64 lo, u64 hi) {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        if (g + i >= lo && g + i < hi) {
            w[i / 4] |= (uint32_t)(*reinterpret_cast<const uint8_t*>(g + i)) << (8 * (i % 4));
        }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Lane's granules (lane + 32 u, u < 4) of the span [lo, hi), counted from
// lo rounded down to 16 bytes: whole granules with one 16-byte load each,
// the two cut by the ends byte by byte, the rest zero.
__device__ __forceinline__ void span_load(u64 lo, u64 hi, unsigned lane, uint4 v[4]) {
    const u64 a0 = lo & ~(u64)15;
#pragma unroll
    for (unsigned u = 0; u < 4; ++u) {
        const u64 g = a0 + 16 * (u64)(lane + 32u * u);
        if (g >= lo && g + 16 <= hi) {
            v[u] = __ldg(reinterpret_cast<const uint4*>(g));
        } else if (g < hi) {
            v[u] = granule_part(g, lo, hi);
        } else {
            v[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// The row and first block of a span of a warp's work, and its block count.
struct GemvSpan {
    u64 row, block, blocks;
};

// The span after s: the next blocks of the row, else the first of the
// warp's next row (row >= rows when there is none).
__device__ __forceinline__ GemvSpan next_span(GemvSpan s, u64 per_row, u64 per_span,
                                              u64 row_step) {
    GemvSpan n = {s.row, s.block + s.blocks, 0};
    if (n.block >= per_row) {
        n.row += row_step;
        n.block = 0;
    }
    n.blocks = min(per_span, per_row - n.block);
    return n;
}

// acc[b] += the product of the span's blocks (decoded one chunk a lane at a
// time from `tile`, where the span's first block starts) with token b, for
// b < t.
template <typename D, unsigned QK, unsigned BYTES, unsigned NT, bool F16>
__device__ __forceinline__ void span_product(const uint8_t* tile, GemvSpan s,
                                             const uint16_t* x_hi, const uint16_t* x_lo,
                                             u64 k, unsigned t, bool vec, float acc[8]) {
    const unsigned chunks = (unsigned)s.blocks * (QK / 8), lane = threadIdx.x % 32;
    for (unsigned c = lane; c < chunks; c += 32) {
        float wv[8];
        D::decode8(tile + (c / (QK / 8)) * BYTES, (c % (QK / 8)) * 8u, wv);
        round_weights<F16>(wv);
        gemv_chunk<NT, F16>(wv, x_hi, x_lo, s.block * QK + (u64)c * 8, k, t, vec, acc);
    }
}

// f32 of byte u (0..4) of a word of 4-bit codes, exactly (u2f_small with
// one byte permutation: the code under 2^23's exponent byte).
__device__ __forceinline__ float code_f32(uint32_t w, unsigned u) {
    return __fsub_rn(__uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440u + u)), 8388608.0f);
}

// Sub-block scales and mins of a Q4_K/Q5_K block for sub-blocks 2g and 2g+1
// from its header (h.x: d, dmin; h.y..h.w: the 12 scale bytes), as
// k_scales computes them: dl = d * sc, ml = dmin * m.
__device__ __forceinline__ void k_pair_scales(uint4 h, unsigned g, float dl[2], float ml[2]) {
    const unsigned sh = 16u * (g & 1u);
    const uint32_t a = h.y >> sh, b = h.z >> sh, c = h.w >> sh;
    const bool low = g < 2;
    const unsigned sc0 = low ? a & 63u : (c & 15u) | ((a >> 2) & 0x30u);
    const unsigned sc1 = low ? (a >> 8) & 63u : ((c >> 8) & 15u) | ((a >> 10) & 0x30u);
    const unsigned m0 = low ? b & 63u : ((c >> 4) & 15u) | ((b >> 2) & 0x30u);
    const unsigned m1 = low ? (b >> 8) & 63u : ((c >> 12) & 15u) | ((b >> 10) & 0x30u);
    const float d = f16_bits_to_f32((uint16_t)(h.x & 0xffffu));
    const float dmin = f16_bits_to_f32((uint16_t)(h.x >> 16));
    dl[0] = __fmul_rn(d, u2f_small(sc0));
    dl[1] = __fmul_rn(d, u2f_small(sc1));
    ml[0] = __fmul_rn(dmin, u2f_small(m0));
    ml[1] = __fmul_rn(dmin, u2f_small(m1));
}

// span_product for Q4_K blocks at 16-byte aligned tile offsets: each lane
// takes 8 bytes of a block's codes at a time (16 items a block), that is 8
// elements of sub-block 2g (low nibbles) and the 8 of sub-block 2g+1 32
// elements on (high nibbles), g and the bytes fixed per lane (lane % 16),
// the header read as one 16-byte load and decoded once for both. Weights
// bit-identical to q4_k_decode8's.
template <unsigned NT, bool F16>
__device__ __forceinline__ void span_product_q4_k(const uint8_t* tile, GemvSpan s,
                                                  const uint16_t* x_hi, const uint16_t* x_lo,
                                                  u64 k, unsigned t, bool vec, float acc[8]) {
    const unsigned lane = threadIdx.x % 32, p = lane % 16, g = p / 4;
    const unsigned items = (unsigned)s.blocks * 16u;
    for (unsigned it = lane; it < items; it += 32) {
        const uint8_t* b = tile + (it / 16) * 144u;
        const uint4 h = *reinterpret_cast<const uint4*>(b);
        const uint2 q = *reinterpret_cast<const uint2*>(b + 16 + 8 * p);
        float dl[2], ml[2];
        k_pair_scales(h, g, dl, ml);
        float lo[8], hi[8];
#pragma unroll
        for (unsigned u = 0; u < 8; ++u) {
            const uint32_t w = u < 4 ? q.x : q.y;
            lo[u] = fma_exact(dl[0], code_f32(w & 0x0f0f0f0fu, u % 4), -ml[0]);
            hi[u] = fma_exact(dl[1], code_f32((w >> 4) & 0x0f0f0f0fu, u % 4), -ml[1]);
        }
        round_weights<F16>(lo);
        round_weights<F16>(hi);
        const u64 off = (s.block + it / 16) * 256 + 64 * g + 8 * (p % 4);
        gemv_chunk<NT, F16>(lo, x_hi, x_lo, off, k, t, vec, acc);
        gemv_chunk<NT, F16>(hi, x_hi, x_lo, off + 32, k, t, vec, acc);
    }
}

// span_product, through span_product_q4_k where D decodes Q4_K and the
// span's blocks are 16-byte aligned in the tile.
template <typename D, unsigned QK, unsigned BYTES, unsigned NT, bool F16>
__device__ __forceinline__ void span_product_any(const uint8_t* tile, unsigned skew, GemvSpan s,
                                                 const uint16_t* x_hi, const uint16_t* x_lo,
                                                 u64 k, unsigned t, bool vec, float acc[8]) {
    if (D::q4_k && skew == 0) {
        span_product_q4_k<NT, F16>(tile, s, x_hi, x_lo, k, t, vec, acc);
    } else {
        span_product<D, QK, BYTES, NT, F16>(tile + skew, s, x_hi, x_lo, k, t, vec, acc);
    }
}

// The staged way through the rows (see above).
template <typename D, unsigned QK, unsigned BYTES, unsigned NT>
__device__ __forceinline__ void gemv_rows(const uint8_t* __restrict__ w,
                                          const uint16_t* __restrict__ x_hi,
                                          const uint16_t* __restrict__ x_lo, void* y, u64 rows,
                                          u64 k, u64 t, u64 ldy, u64 flags) {
    __shared__ uint4 tiles[GEMV_WARPS][GEMV_GRANULES];
    const bool f16 = (flags & GEMV_F16) != 0;
    const bool vec = aligned16(x_hi) && (x_lo == nullptr || aligned16(x_lo));
    const u64 per_row = k / QK, row_bytes = per_row * BYTES;
    const u64 per_span = (GEMV_GRANULES * 16 - 15) / BYTES, row_step = (u64)gridDim.x * GEMV_WARPS;
    const unsigned lane = threadIdx.x % 32, nt = (unsigned)t;
    uint4* tile = tiles[threadIdx.x / 32];
    GemvSpan s = {(u64)blockIdx.x * GEMV_WARPS + threadIdx.x / 32, 0, min(per_span, per_row)};
    if (s.row >= rows) {
        return;
    }
    uint4 v[4];
    u64 lo = (u64)w + s.row * row_bytes;
    span_load(lo, lo + s.blocks * BYTES, lane, v);
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (;;) {
        __syncwarp();
#pragma unroll
        for (unsigned u = 0; u < 4; ++u) {
            tile[lane + 32u * u] = v[u];
        }
        __syncwarp();
        const unsigned skew = (unsigned)(lo & 15u);
        const GemvSpan n = next_span(s, per_row, per_span, row_step);
        if (n.row < rows) {
            lo = (u64)w + n.row * row_bytes + n.block * BYTES;
            span_load(lo, lo + n.blocks * BYTES, lane, v);
        }
        const uint8_t* at = reinterpret_cast<const uint8_t*>(tile);
        if (f16) {
            span_product_any<D, QK, BYTES, NT, true>(at, skew, s, x_hi, x_lo, k, nt, vec, acc);
        } else {
            span_product_any<D, QK, BYTES, NT, false>(at, skew, s, x_hi, x_lo, k, nt, vec, acc);
        }
        if (n.row != s.row) {
            gemv_store<NT>(acc, y, s.row, ldy, nt, (unsigned)flags);
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                acc[b] = 0.0f;
            }
        }
        if (n.row >= rows) {
            return;
        }
        s = n;
    }
}

// The direct way through the rows (see above).
template <typename D, unsigned QK, unsigned BYTES, unsigned NT, bool F16>
__device__ __forceinline__ void gemv_rows_direct(const uint8_t* __restrict__ w,
                                                 const uint16_t* __restrict__ x_hi,
                                                 const uint16_t* __restrict__ x_lo, void* y,
                                                 u64 rows, u64 k, u64 t, u64 ldy, u64 flags) {
    const bool vec = aligned16(x_hi) && (x_lo == nullptr || aligned16(x_lo));
    const u64 row_bytes = k / QK * BYTES, chunks = k / 8;
    const unsigned lane = threadIdx.x % 32, nt = (unsigned)t;
    for (u64 r = (u64)blockIdx.x * GEMV_WARPS + threadIdx.x / 32; r < rows;
         r += (u64)gridDim.x * GEMV_WARPS) {
        const uint8_t* wr = w + r * row_bytes;
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (u64 c = lane; c < chunks; c += 32) {
            float wv[8];
            D::decode8(wr + (c / (QK / 8)) * BYTES, (unsigned)(c % (QK / 8)) * 8u, wv);
            round_weights<F16>(wv);
            gemv_chunk<NT, F16>(wv, x_hi, x_lo, c * 8, k, nt, vec, acc);
        }
        gemv_store<NT>(acc, y, r, ldy, nt, (unsigned)flags);
    }
}

// gemv_rows for Q4_K, else gemv_rows_direct for the model dtype.
template <typename D, unsigned QK, unsigned BYTES, unsigned NT>
__device__ __forceinline__ void gemv_any(const uint8_t* __restrict__ w,
                                         const uint16_t* __restrict__ x_hi,
                                         const uint16_t* __restrict__ x_lo, void* y, u64 rows,
                                         u64 k, u64 t, u64 ldy, u64 flags) {
    if constexpr (D::q4_k) {
        gemv_rows<D, QK, BYTES, NT>(w, x_hi, x_lo, y, rows, k, t, ldy, flags);
    } else if (flags & GEMV_F16) {
        gemv_rows_direct<D, QK, BYTES, NT, true>(w, x_hi, x_lo, y, rows, k, t, ldy, flags);
    } else {
        gemv_rows_direct<D, QK, BYTES, NT, false>(w, x_hi, x_lo, y, rows, k, t, ldy, flags);
    }
}

#define GEMV_ENTRY(NAME, QK, BYTES, NT)                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                       \
        gemv_##NAME##_t##NT(const uint8_t* __restrict__ w,                             \
                            const uint16_t* __restrict__ x_hi,                         \
                            const uint16_t* __restrict__ x_lo, void* y, u64 rows, u64 k, \
                            u64 t, u64 ldy, u64 flags) {                               \
        gemv_any<NAME##_decoder, QK, BYTES, NT>(w, x_hi, x_lo, y, rows, k, t, ldy, flags); \
    }

// `gemv_NAME_tN(w, x_hi, x_lo, y, rows, k, t, ldy, flags)` for N = 1, 2,
// 4, 8, each for t <= N.
#define GEMV_KERNEL(NAME, QK, BYTES)                                                   \
    struct NAME##_decoder {                                                            \
        static constexpr bool q4_k = (QK) == 256 && (BYTES) == 144;                    \
        static __device__ __forceinline__ void decode8(const uint8_t* b, unsigned e0,   \
                                                       float out[8]) {                 \
            NAME##_decode8(b, e0, out);                                                \
        }                                                                              \
    };                                                                                 \
    GEMV_ENTRY(NAME, QK, BYTES, 1)                                                     \
    GEMV_ENTRY(NAME, QK, BYTES, 2)                                                     \
    GEMV_ENTRY(NAME, QK, BYTES, 4)                                                     \
    GEMV_ENTRY(NAME, QK, BYTES, 8)

GEMV_KERNEL(q8_0, 32, 34)
GEMV_KERNEL(q4_0, 32, 18)
GEMV_KERNEL(q4_1, 32, 20)
GEMV_KERNEL(q5_0, 32, 22)
GEMV_KERNEL(q5_1, 32, 24)
GEMV_KERNEL(q4_k, 256, 144)
GEMV_KERNEL(q5_k, 256, 176)
GEMV_KERNEL(q6_k, 256, 210)
