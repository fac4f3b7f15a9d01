// The kernels of the Qwen2/Llama forward pass (src/models/gpu.rs): embedding
// gather, RMSNorm, bias + RoPE + KV-cache write, causal attention against the
// KV cache, SwiGLU. The residual stream and attention math are f32; the KV
// cache is 16-bit. GEMM inputs are written as hi = h(x) and, in precision exact,
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

// Block-wide maximum, like block_sum.
__device__ float block_max(float v, float* shared32) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    const int nw = blockDim.x / 32;
    float t = lane < nw ? shared32[lane] : __int_as_float(0xff800000u);
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
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

// For each token t (one block): adds the q/k/v biases (pointers may be 0),
// rotates q and k by RoPE at position pos[t] (neox style: the two halves of a
// head are the pairs; with `interleaved`, GPT-J style: neighbours are the pairs,
// as llama.cpp stores llama q/k rows), writes k and v into the f32 KV cache of sequence
// seq[t] at pos[t]. q stays f32 in place. Cache layout: [seq][kv_head][max_len][head_dim].
extern "C" __global__ void bias_rope_cache(float* __restrict__ q, const float* __restrict__ k,
                                           const float* __restrict__ v,
                                           const uint16_t* __restrict__ bq,
                                           const uint16_t* __restrict__ bk,
                                           const uint16_t* __restrict__ bv,
                                           const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t,
                                           const uint32_t* __restrict__ seq,
                                           const uint32_t* __restrict__ pos,
                                           float* __restrict__ k_cache,
                                           float* __restrict__ v_cache, u64 tokens,
                                           u64 heads, u64 kv_heads, u64 head_dim, u64 max_len,
                                           u64 kind, u64 interleaved) {
    const u64 half = head_dim / 2;
    for (u64 t = blockIdx.x; t < tokens; t += gridDim.x) {
        const u64 p = pos[t], s = seq[t];
        const float* c = cos_t + p * half;
        const float* sn = sin_t + p * half;
        // q: heads * half rotation pairs.
        for (u64 i = threadIdx.x; i < heads * half; i += blockDim.x) {
            const u64 h = i / half, j = i % half;
            const u64 ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
            float* qh = q + t * heads * head_dim + h * head_dim;
            float a = qh[ia], b = qh[ib];
            if (bq) {
                a += load_h(bq[h * head_dim + ia], kind);
                b += load_h(bq[h * head_dim + ib], kind);
            }
            qh[ia] = a * c[j] - b * sn[j];
            qh[ib] = b * c[j] + a * sn[j];
        }
        for (u64 i = threadIdx.x; i < kv_heads * half; i += blockDim.x) {
            const u64 g = i / half, j = i % half;
            const u64 ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
            const float* kh = k + t * kv_heads * head_dim + g * head_dim;
            const float* vh = v + t * kv_heads * head_dim + g * head_dim;
            float a = kh[ia], b = kh[ib];
            float va = vh[ia], vb = vh[ib];
            if (bk) {
                a += load_h(bk[g * head_dim + ia], kind);
                b += load_h(bk[g * head_dim + ib], kind);
            }
            if (bv) {
                va += load_h(bv[g * head_dim + ia], kind);
                vb += load_h(bv[g * head_dim + ib], kind);
            }
            const u64 base = ((s * kv_heads + g) * max_len + p) * head_dim;
            k_cache[base + ia] = a * c[j] - b * sn[j];
            k_cache[base + ib] = b * c[j] + a * sn[j];
            v_cache[base + ia] = va;
            v_cache[base + ib] = vb;
        }
    }
}

// Causal attention of one (token, head) per block over keys 0..=pos[token] of
// its sequence's cache: scores in shared memory (dynamic, max_len floats),
// f32 softmax, output split into 16-bit (hi, lo) [tokens, heads * head_dim].
// blockDim.x is a multiple of 32; head_dim <= 512.
extern "C" __global__ void attention_causal(const float* __restrict__ q,
                                            const float* __restrict__ k_cache,
                                            const float* __restrict__ v_cache,
                                            const uint32_t* __restrict__ seq,
                                            const uint32_t* __restrict__ pos,
                                            uint16_t* __restrict__ out_hi,
                                            uint16_t* __restrict__ out_lo, u64 tokens, u64 heads,
                                            u64 kv_heads, u64 head_dim, u64 max_len,
                                            float scale, u64 kind) {
    extern __shared__ float scores[];
    __shared__ float qs[512];
    __shared__ float red[32];
    const u64 t = blockIdx.y;
    const u64 h = blockIdx.x;
    if (t >= tokens || h >= heads) return;
    const u64 g = h / (heads / kv_heads);
    const u64 len = (u64)pos[t] + 1;
    const u64 s = seq[t];
    const float* kb = k_cache + (s * kv_heads + g) * max_len * head_dim;
    const float* vb = v_cache + (s * kv_heads + g) * max_len * head_dim;
    const float* qh = q + t * heads * head_dim + h * head_dim;
    for (u64 i = threadIdx.x; i < head_dim; i += blockDim.x) qs[i] = qh[i] * scale;
    __syncthreads();
    // One warp per key: lanes split the head dimension.
    const u64 warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    for (u64 j = warp; j < len; j += nwarps) {
        const float* kr = kb + j * head_dim;
        float d = 0.0f;
        for (u64 i = lane; i < head_dim; i += 32) d += qs[i] * kr[i];
        for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (lane == 0) scores[j] = d;
    }
    __syncthreads();
    float m = __int_as_float(0xff800000u);
    for (u64 j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m, red);
    float sum = 0.0f;
    for (u64 j = threadIdx.x; j < len; j += blockDim.x) {
        const float e = expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, red);
    __syncthreads();
    const float inv = 1.0f / sum;
    for (u64 i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.0f;
        for (u64 j = 0; j < len; ++j) acc += scores[j] * vb[j * head_dim + i];
        store_split(acc * inv, out_hi, out_lo, t * heads * head_dim + h * head_dim + i, kind);
    }
}
