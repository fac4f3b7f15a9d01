// The kernels of the Qwen2/Llama forward pass (src/llm/gpu.rs): embedding
// gather, RMSNorm, SwiGLU (attention and the KV cache are kernels/attention.cu).
// The residual stream is f32. GEMM inputs are written as hi = h(x) and, in precision exact,
// lo = h(x - hi), whose products with a weight add up to x's with about twice
// the mantissa bits of one (16 instead of 8 for bf16): bf16 rounding of activations is what moves
// logits (and their argmax) away from an f32 reference. Precision fast passes
// a null lo and runs one GEMM on hi.
//
// Every pointer parameter is a device address and every count a 64-bit
// integer; the only other parameters are f32 scalars (eps, scale).
#include "common.cuh"

// 16-bit values are bf16 (kind 0) or f16 (kind 1): the dtype of the model's
// weights, which the GEMM inputs and the KV cache share.
__device__ __forceinline__ float load_h(uint16_t v, u64 kind) {
    return kind ? f16_bits_to_f32(v) : bf16_bits_to_f32(v);
}

__device__ __forceinline__ uint16_t to_h(float x, u64 kind) {
    return kind ? __half_as_ushort(__float2half_rn(x)) : f32_to_bf16_bits(x);
}

// Writes x as the pair (hi, lo) described above. A null lo (precision
// `fast`) keeps hi alone: x rounded to 16 bits, one GEMM.
__device__ __forceinline__ void store_split(float x, uint16_t* hi, uint16_t* lo, u64 i, u64 kind) {
    const uint16_t h = to_h(x, kind);
    hi[i] = h;
    if (lo) lo[i] = to_h(x - load_h(h, kind), kind);
}

// Block-wide sum of one value per thread (blockDim.x a multiple of 32, <= 1024);
// every thread gets the total.
__device__ float block_sum(float v, float* shared32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    const int nw = blockDim.x / 32;
    float t = lane < nw ? shared32[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// x[t, :] = f32(embed[ids[t], :]) for t < tokens; one block per token.
extern "C" __global__ void embed_gather(const uint16_t* __restrict__ embed,
                                        const uint32_t* __restrict__ ids, float* __restrict__ x,
                                        u64 tokens, u64 hidden, u64 kind) {
    for (u64 t = blockIdx.x; t < tokens; t += gridDim.x) {
        const uint16_t* row = embed + (u64)ids[t] * hidden;
        for (u64 i = threadIdx.x; i < hidden; i += blockDim.x) {
            x[t * hidden + i] = load_h(row[i], kind);
        }
    }
}

// (hi, lo)[r, :] = split(x[rows[r], :] / sqrt(mean(x^2) + eps) * w) for
// r < n_rows; one block per row. rows == 0 means the identity.
extern "C" __global__ void rms_norm_split(const float* __restrict__ x,
                                          const uint16_t* __restrict__ w,
                                          const uint32_t* __restrict__ rows,
                                          uint16_t* __restrict__ hi, uint16_t* __restrict__ lo,
                                          u64 n_rows, u64 hidden, float eps, u64 kind) {
    __shared__ float red[32];
    for (u64 r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const u64 src = rows ? (u64)rows[r] : r;
        const float* xr = x + src * hidden;
        float ss = 0.0f;
        for (u64 i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
        const float total = block_sum(ss, red);
        const float inv = rsqrtf(total / (float)hidden + eps);
        for (u64 i = threadIdx.x; i < hidden; i += blockDim.x) {
            store_split(load_h(w[i], kind) * (xr[i] * inv), hi, lo, r * hidden + i, kind);
        }
    }
}

// (hi, lo)[r * cols + c] = split(silu(gate[r * stride + c]) * up[r * stride + c])
// for rows x cols elements. Separate gate and up matrices have stride ==
// cols; the output of one GEMM over the fused [gate | up] weight is read with
// up = gate + cols and stride == 2 * cols. Rows go along the grid's y, four
// columns a thread along x (no division per element); gate and up are f32
// (swiglu_split) or 16-bit of `kind` (swiglu_split_h: GEMM outputs in 16 bits).
// expf, not __expf: the fast intrinsic loses accuracy for large |x|.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ void load4(const float* p, float v[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}

__device__ __forceinline__ void load4(const uint16_t* p, float v[4], u64 kind) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = load_h((uint16_t)(q.x & 0xffffu), kind), v[1] = load_h((uint16_t)(q.x >> 16), kind);
    v[2] = load_h((uint16_t)(q.y & 0xffffu), kind), v[3] = load_h((uint16_t)(q.y >> 16), kind);
}

__device__ __forceinline__ uint2 pack4(const uint16_t h[4]) {
    return make_uint2((uint32_t)h[0] | ((uint32_t)h[1] << 16), (uint32_t)h[2] | ((uint32_t)h[3] << 16));
}

// Four results at out[i..i + 4] (i a multiple of 4, hi and lo 8-byte aligned).
__device__ __forceinline__ void store_split4(const float x[4], uint16_t* hi, uint16_t* lo, u64 i,
                                             u64 kind) {
    uint16_t h[4], l[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        h[k] = to_h(x[k], kind);
        l[k] = lo ? to_h(x[k] - load_h(h[k], kind), kind) : 0;
    }
    *reinterpret_cast<uint2*>(hi + i) = pack4(h);
    if (lo) *reinterpret_cast<uint2*>(lo + i) = pack4(l);
}

__device__ __forceinline__ float load1(const float* p, u64) { return *p; }
__device__ __forceinline__ float load1(const uint16_t* p, u64 kind) { return load_h(*p, kind); }
__device__ __forceinline__ void load4(const float* p, float v[4], u64) { load4(p, v); }

template <typename T>
__device__ void swiglu_rows(const T* __restrict__ gate, const T* __restrict__ up,
                            uint16_t* __restrict__ hi, uint16_t* __restrict__ lo, u64 rows,
                            u64 cols, u64 stride, u64 kind) {
    // Four at a time when every row of gate, up and out starts aligned.
    const bool vec = cols % 4 == 0 && stride % 4 == 0 && aligned16(gate) && aligned16(up) &&
                     aligned8(hi) && (!lo || aligned8(lo)) && (sizeof(T) == 4 || aligned8(gate));
    const u64 step = (u64)gridDim.x * blockDim.x;
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (u64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* g = gate + r * stride;
        const T* u = up + r * stride;
        const u64 o = r * cols;
        if (vec) {
            for (u64 c = first * 4; c < cols; c += step * 4) {
                float gv[4], uv[4], y[4];
                load4(g + c, gv, kind);
                load4(u + c, uv, kind);
#pragma unroll
                for (int k = 0; k < 4; ++k) y[k] = silu_mul(gv[k], uv[k]);
                store_split4(y, hi, lo, o + c, kind);
            }
        } else {
            for (u64 c = first; c < cols; c += step) {
                store_split(silu_mul(load1(g + c, kind), load1(u + c, kind)), hi, lo, o + c,
                            kind);
            }
        }
    }
}

extern "C" __global__ void swiglu_split(const float* __restrict__ gate,
                                        const float* __restrict__ up, uint16_t* __restrict__ hi,
                                        uint16_t* __restrict__ lo, u64 rows, u64 cols,
                                        u64 stride, u64 kind) {
    swiglu_rows(gate, up, hi, lo, rows, cols, stride, kind);
}

extern "C" __global__ void swiglu_split_h(const uint16_t* __restrict__ gate,
                                          const uint16_t* __restrict__ up,
                                          uint16_t* __restrict__ hi, uint16_t* __restrict__ lo,
                                          u64 rows, u64 cols, u64 stride, u64 kind) {
    swiglu_rows(gate, up, hi, lo, rows, cols, stride, kind);
}

// y[r * ldy + col0 + j] (+)= src[r * cols + j] for r < rows, j < cols: the
// CPU's columns of a split product, read by the SMs from page-locked host
// memory mapped into the device (so that they do not queue behind the
// streamer's copies on the copy engine); `accumulate` adds them to y (the
// residual stream), else they are written.
extern "C" __global__ void add_host_columns(const float* __restrict__ src,
                                            float* __restrict__ y, u64 rows, u64 cols, u64 ldy,
                                            u64 col0, u64 accumulate) {
    const u64 n = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cols, j = i % cols;
        float* d = y + r * ldy + col0 + j;
        const float v = src[i];
        *d = accumulate ? *d + v : v;
    }
}
