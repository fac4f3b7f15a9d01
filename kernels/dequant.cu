// Dequantization of ggml blocks (as GGUF stores them) into bf16 or f16, two
// kernels per type (`dequant_<type>_bf16`, `dequant_<type>_f16`), compiled into
// their own PTX module (kernels/ptx/dequant.ptx) and loaded by
// `quant::device::DequantKernels`.
//
// Each thread computes one output element (grid-stride over n = blocks *
// elements per block) from its block's scales and its packed value. Products
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

// One element decoder per type, `float NAME_value(block, e)`, and two kernels
// over it: `dequant_NAME_bf16` and `dequant_NAME_f16`.
#define DEQUANT_KERNEL_OUT(NAME, QK, BYTES, OUT, CONVERT)                               \
    extern "C" __global__ void dequant_##NAME##_##OUT(const uint8_t* __restrict__ src,  \
                                                      uint16_t* __restrict__ dst, u64 n) { \
        for (u64 i = grid_thread(); i < n; i += grid_threads()) {                      \
            const uint8_t* b = src + (i / (QK)) * (BYTES);                             \
            dst[i] = CONVERT(NAME##_value(b, (unsigned)(i % (QK))));                   \
        }                                                                              \
    }

#define DEQUANT_KERNEL(NAME, QK, BYTES, ...)                                           \
    __device__ __forceinline__ float NAME##_value(const uint8_t* b, unsigned e) {      \
        float x;                                                                       \
        (void)e;                                                                       \
        __VA_ARGS__                                                                    \
        return x;                                                                      \
    }                                                                                  \
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
DEQUANT_KERNEL(q8_0, 32, 34, {
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
DEQUANT_KERNEL(q4_0, 32, 18, {
    x = __fmul_rn(f16_at(b), (float)((int)nibble32(b + 2, e) - 8));
})

// Q4_1: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m.
DEQUANT_KERNEL(q4_1, 32, 20, {
    x = __fadd_rn(__fmul_rn(f16_at(b), (float)nibble32(b + 4, e)), f16_at(b + 2));
})

// Q5_0: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles; x = d * (q - 16).
DEQUANT_KERNEL(q5_0, 32, 22, {
    int q = (int)(nibble32(b + 6, e) | (high_bit32(b + 2, e) << 4));
    x = __fmul_rn(f16_at(b), (float)(q - 16));
})

// Q5_1: f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles; x = d * q + m.
DEQUANT_KERNEL(q5_1, 32, 24, {
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
DEQUANT_KERNEL(q4_k, 256, 144, { x = k_value(b, e, k_nibble(b + 16, e)); })

// Q5_K: as Q4_K with 32 bytes of fifth bits before the nibbles: bit j of byte
// l is element l of sub-block j.
DEQUANT_KERNEL(q5_k, 256, 176, {
    unsigned q = k_nibble(b + 48, e) | (((b[16 + e % 32] >> (e / 32)) & 1u) << 4);
    x = k_value(b, e, q);
})

// Q6_K: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed scales,
// f16 d; x = (d * scale) * (q - 32).
DEQUANT_KERNEL(q6_k, 256, 210, {
    unsigned half = e / 128, r = e % 128;
    unsigned low = r < 64 ? (b[half * 64 + r] & 0x0fu) : (b[half * 64 + r - 64] >> 4);
    unsigned high = (b[128 + half * 32 + r % 32] >> (2 * (r / 32))) & 3u;
    float ds = __fmul_rn(f16_at(b + 208), (float)(int8_t)b[192 + e / 16]);
    x = __fmul_rn(ds, (float)((int)(low | (high << 4)) - 32));
})

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
// (checked on the host).
#define DEQUANT_GATHER(NAME, QK, BYTES)                                                \
    extern "C" __global__ void gather_##NAME##_f32(const uint8_t* __restrict__ src,    \
                                                   const uint32_t* __restrict__ ids,   \
                                                   float* __restrict__ dst, u64 tokens, \
                                                   u64 hidden, u64 out_f16) {          \
        const u64 n = tokens * hidden;                                                 \
        const u64 row_bytes = hidden / (QK) * (BYTES);                                 \
        for (u64 i = grid_thread(); i < n; i += grid_threads()) {                      \
            const u64 t = i / hidden, c = i % hidden;                                  \
            const uint8_t* b = src + (u64)ids[t] * row_bytes + (c / (QK)) * (BYTES);   \
            const float x = NAME##_value(b, (unsigned)(c % (QK)));                     \
            dst[i] = out_f16 ? f16_bits_to_f32(f32_to_f16_sat_bits(x))                 \
                             : bf16_bits_to_f32(f32_to_bf16_bits(x));                  \
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
