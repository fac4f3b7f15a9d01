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
// for rows x cols f32 elements. Separate gate and up matrices have stride ==
// cols; the output of one GEMM over the fused [gate | up] weight is read with
// up = gate + cols and stride == 2 * cols.
extern "C" __global__ void swiglu_split(const float* __restrict__ gate,
                                        const float* __restrict__ up, uint16_t* __restrict__ hi,
                                        uint16_t* __restrict__ lo, u64 rows, u64 cols,
                                        u64 stride, u64 kind) {
    const u64 n = rows * cols;
    for (u64 i = grid_thread(); i < n; i += grid_threads()) {
        const u64 r = i / cols;
        const u64 src = r * stride + (i - r * cols);
        const float g = gate[src];
        // expf, not __expf: the fast intrinsic loses accuracy for large |x|.
        store_split(g / (1.0f + expf(-g)) * up[src], hi, lo, i, kind);
    }
}
