// Attention of the Qwen2/Llama forward pass over its KV cache
// (src/llm/attention/): the cache write (bias + RoPE + store), a tiled
// online-softmax prefill kernel on tensor cores, and a split-KV kernel whose
// partial results a small kernel combines.
//
// Cache layout, per layer: [seq][kv_head][max_len][head_dim], elements of
// `ckind`: 0 bf16, 1 f16, 2 f32. Outputs and biases are 16-bit of `kind`
// (0 bf16, 1 f16), the model's weight dtype. q, k and v come out of the
// projections as f32.
//
// The tokens of a pass are packed: token t belongs to sequence seq[t] at
// position pos[t], and attends to keys 0..=pos[t] of that sequence's cache
// (its own included, written by attention_cache_write before).
//
// Every pointer parameter is a device address and every count a 64-bit
// integer; the only other parameters are f32 scalars.
#include <cuda_bf16.h>
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

#define CACHE_F32 2

__device__ __forceinline__ float load_h(uint16_t v, u64 kind) {
    return kind ? f16_bits_to_f32(v) : bf16_bits_to_f32(v);
}

__device__ __forceinline__ uint16_t to_h(float x, u64 kind) {
    return kind ? __half_as_ushort(__float2half_rn(x)) : f32_to_bf16_bits(x);
}

// Writes x as the 16-bit pair (hi, lo = x - hi) of the split GEMM inputs;
// with lo null (one 16-bit GEMM input) only hi.
__device__ __forceinline__ void store_out(float x, uint16_t* hi, uint16_t* lo, u64 i, u64 kind) {
    const uint16_t h = to_h(x, kind);
    hi[i] = h;
    if (lo) lo[i] = to_h(x - load_h(h, kind), kind);
}

__device__ __forceinline__ float load_cache(const void* c, u64 i, u64 ckind) {
    return ckind == CACHE_F32 ? static_cast<const float*>(c)[i]
                              : load_h(static_cast<const uint16_t*>(c)[i], ckind);
}

__device__ __forceinline__ void store_cache(void* c, u64 i, float x, u64 ckind) {
    if (ckind == CACHE_F32) {
        static_cast<float*>(c)[i] = x;
    } else {
        static_cast<uint16_t*>(c)[i] = to_h(x, ckind);
    }
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// For each token t (one block): adds the q/k/v biases (pointers may be 0),
// rotates q and k by RoPE at position pos[t] (neox style: the two halves of a
// head are the pairs; with `interleaved`, GPT-J style: neighbours are the
// pairs, as llama.cpp stores llama q/k rows), writes k and v into the cache of
// sequence seq[t] at pos[t]. q stays f32 in place.
extern "C" __global__ void attention_cache_write(
    float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const uint16_t* __restrict__ bq, const uint16_t* __restrict__ bk,
    const uint16_t* __restrict__ bv, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, const uint32_t* __restrict__ seq,
    const uint32_t* __restrict__ pos, void* __restrict__ k_cache, void* __restrict__ v_cache,
    u64 tokens, u64 heads, u64 kv_heads, u64 head_dim, u64 max_len, u64 kind, u64 ckind,
    u64 interleaved) {
    const u64 half = head_dim / 2;
    for (u64 t = blockIdx.x; t < tokens; t += gridDim.x) {
        const u64 p = pos[t], s = seq[t];
        const float* c = cos_t + p * half;
        const float* sn = sin_t + p * half;
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
            store_cache(k_cache, base + ia, a * c[j] - b * sn[j], ckind);
            store_cache(k_cache, base + ib, b * c[j] + a * sn[j], ckind);
            store_cache(v_cache, base + ia, va, ckind);
            store_cache(v_cache, base + ib, vb, ckind);
        }
    }
}

// ---------------------------------------------------------------------------
// Prefill: tiled online softmax on tensor cores (WMMA m16n16k16, 16-bit
// inputs, f32 accumulation), for a 16-bit cache and head_dim 64 or 128.
//
// A block takes one work item (`items[2i]` = first token, `items[2i+1]` =
// token count, all of one sequence, packed consecutively) and one chunk of
// `gh` q heads of one KV group (grid.y = kv_head * chunks + chunk). Its
// PF_ROWS query rows are (token, head) pairs, row = token * gh + head, so the
// heads of a group share each K/V tile. Each of the PF_WARPS warps owns 16
// rows: its Q fragments and O accumulators live in registers, its scores,
// probabilities and the per-row broadcast tile in its own shared memory.
// Row r attends to key j when j <= pos of r's token.
namespace pf {
constexpr int WARPS = 4;
constexpr int ROWS = 16 * WARPS;
constexpr int BK = 32;        // keys per tile
constexpr int S_LD = BK + 4;  // f32 score row stride (padded against bank conflicts)
constexpr int P_LD = BK + 8;  // 16-bit probability row stride
}  // namespace pf

template <typename T>
__device__ __forceinline__ T to_t(float x);
template <>
__device__ __forceinline__ half to_t<half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> AccFrag;

// Multiplies each row of the warp's accumulators by the value its lanes wrote
// to row r of `bc` (a 16 x 16 f32 tile, every column of row r equal). Loading
// bc as an accumulator gives each fragment element its row's value, whatever
// the (unspecified, but shared by all accumulators) element-to-position map.
template <int HD>
__device__ __forceinline__ void scale_rows(AccFrag (&o)[HD / 16], const float* bc) {
    AccFrag f;
    wmma::load_matrix_sync(f, bc, 16, wmma::mem_row_major);
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) {
#pragma unroll
        for (int e = 0; e < f.num_elements; ++e) o[j].x[e] *= f.x[e];
    }
}

// Stages the block's query rows, scaled, as T into `qs` [ROWS][HD] (zero for
// rows outside the item or the head chunk).
template <typename T, int HD>
__device__ void stage_q(T* qs, const float* __restrict__ q, u64 first, u64 ntok, u64 gh,
                        u64 nh, u64 head0, u64 heads, float scale) {
    for (u64 i = threadIdx.x; i < (u64)pf::ROWS * HD; i += blockDim.x) {
        const u64 r = i / HD, d = i % HD, tok = r / gh, hh = r % gh;
        float x = 0.0f;
        if (tok < ntok && hh < nh) x = q[((first + tok) * heads + head0 + hh) * HD + d] * scale;
        qs[i] = to_t<T>(x);
    }
}

// Copies keys k0..k0+BK of one sequence and KV head into ks/vs [BK][HD]
// (16-byte vectors; rows at or past nkeys are zero, so that masked
// probabilities never meet uninitialised cache rows).
template <typename T, int HD>
__device__ void load_kv_tile(T* ks, T* vs, const uint16_t* __restrict__ kc,
                             const uint16_t* __restrict__ vc, u64 row0, u64 k0, u64 nkeys) {
    constexpr int VEC = HD / 8;
    for (int i = threadIdx.x; i < pf::BK * VEC; i += blockDim.x) {
        const u64 key = k0 + i / VEC;
        uint4 kx = make_uint4(0, 0, 0, 0), vx = make_uint4(0, 0, 0, 0);
        if (key < nkeys) {
            const u64 off = (row0 + key) * HD + (u64)(i % VEC) * 8;
            kx = *reinterpret_cast<const uint4*>(kc + off);
            vx = *reinterpret_cast<const uint4*>(vc + off);
        }
        reinterpret_cast<uint4*>(ks)[i] = kx;
        reinterpret_cast<uint4*>(vs)[i] = vx;
    }
}

// Online-softmax update of one tile for the lane's (row, half of the tile's
// columns): masks keys past the row's position, writes the probabilities as T
// and the rescale factor of the row into bc, updates (m, l).
template <typename T>
__device__ __forceinline__ void softmax_tile(const float* sw, T* pw, float* bc, int lane,
                                             bool row_ok, u64 my_pos, u64 k0, float& m,
                                             float& l) {
    const int r = lane >> 1, hf = lane & 1;
    const float* srow = sw + r * pf::S_LD + hf * 16;
    float sv[16];
    float mx = neg_inf();
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const u64 key = k0 + hf * 16 + i;
        sv[i] = (row_ok && key <= my_pos) ? srow[i] : neg_inf();
        mx = fmaxf(mx, sv[i]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    // A row with no key yet keeps (m, l) = (-inf, 0) and its accumulators 0.
    const float alpha = m_new == neg_inf() ? 1.0f : expf(m - m_new);
    T* prow = pw + r * pf::P_LD + hf * 16;
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const float p = sv[i] == neg_inf() ? 0.0f : expf(sv[i] - m_new);
        prow[i] = to_t<T>(p);
        sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
#pragma unroll
    for (int i = 0; i < 8; ++i) bc[r * 16 + hf * 8 + i] = alpha;
}

template <typename T, int HD>
__device__ void prefill(const float* __restrict__ q, const uint16_t* __restrict__ kc,
                        const uint16_t* __restrict__ vc, const uint32_t* __restrict__ seq,
                        const uint32_t* __restrict__ pos, const uint32_t* __restrict__ items,
                        uint16_t* __restrict__ out_hi, uint16_t* __restrict__ out_lo, u64 heads,
                        u64 kv_heads, u64 max_len, u64 gh, float scale, u64 kind) {
    // K and V tiles; before the key loop the same bytes hold the staged Q.
    constexpr int KV_ELEMS = 2 * pf::BK * HD > pf::ROWS * HD ? 2 * pf::BK * HD : pf::ROWS * HD;
    __shared__ __align__(128) T kv[KV_ELEMS];
    __shared__ __align__(128) float s_all[pf::WARPS * 16 * pf::S_LD];
    __shared__ __align__(128) T p_all[pf::WARPS * 16 * pf::P_LD];
    __shared__ __align__(128) float bc_all[pf::WARPS * 16 * 16];

    const u64 first = items[2 * blockIdx.x], ntok = items[2 * blockIdx.x + 1];
    const u64 group = heads / kv_heads, chunks = (group + gh - 1) / gh;
    const u64 g = blockIdx.y / chunks, h_lo = (blockIdx.y % chunks) * gh;
    const u64 nh = group - h_lo < gh ? group - h_lo : gh;
    const u64 head0 = g * group + h_lo;
    const u64 row0 = ((u64)seq[first] * kv_heads + g) * max_len;
    u64 nkeys = 0;
    for (u64 i = 0; i < ntok; ++i) nkeys = max(nkeys, (u64)pos[first + i] + 1);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u64 row = (u64)warp * 16 + (lane >> 1), tok = row / gh, hh = row % gh;
    const bool row_ok = tok < ntok && hh < nh;
    const u64 my_pos = row_ok ? pos[first + tok] : 0;
    // The warp's last key: tiles past it hold no key for any of its rows.
    long long warp_last = row_ok ? (long long)my_pos : -1;
    for (int o = 16; o > 0; o >>= 1)
        warp_last = max(warp_last, __shfl_xor_sync(0xffffffffu, warp_last, o));

    stage_q<T, HD>(kv, q, first, ntok, gh, nh, head0, heads, scale);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[HD / 16];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
        wmma::load_matrix_sync(qf[kk], kv + warp * 16 * HD + kk * 16, HD);
    AccFrag o[HD / 16];
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) wmma::fill_fragment(o[j], 0.0f);
    __syncthreads();

    T* ks = kv;
    T* vs = kv + pf::BK * HD;
    float* sw = s_all + warp * 16 * pf::S_LD;
    T* pw = p_all + warp * 16 * pf::P_LD;
    float* bc = bc_all + warp * 16 * 16;
    float m = neg_inf(), l = 0.0f;
    for (u64 k0 = 0; k0 < nkeys; k0 += pf::BK) {
        load_kv_tile<T, HD>(ks, vs, kc, vc, row0, k0, nkeys);
        __syncthreads();
        if ((long long)k0 <= warp_last) {
            // S = Q K^T for the tile: K [key][d] read as a column-major K^T.
#pragma unroll
            for (int n = 0; n < pf::BK / 16; ++n) {
                AccFrag sf;
                wmma::fill_fragment(sf, 0.0f);
#pragma unroll
                for (int kk = 0; kk < HD / 16; ++kk) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                    wmma::load_matrix_sync(kf, ks + n * 16 * HD + kk * 16, HD);
                    wmma::mma_sync(sf, qf[kk], kf, sf);
                }
                wmma::store_matrix_sync(sw + n * 16, sf, pf::S_LD, wmma::mem_row_major);
            }
            __syncwarp();
            softmax_tile<T>(sw, pw, bc, lane, row_ok, my_pos, k0, m, l);
            __syncwarp();
            scale_rows<HD>(o, bc);
            // O += P V.
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pfr[pf::BK / 16];
#pragma unroll
            for (int kk = 0; kk < pf::BK / 16; ++kk)
                wmma::load_matrix_sync(pfr[kk], pw + kk * 16, pf::P_LD);
#pragma unroll
            for (int j = 0; j < HD / 16; ++j) {
#pragma unroll
                for (int kk = 0; kk < pf::BK / 16; ++kk) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
                    wmma::load_matrix_sync(vf, vs + kk * 16 * HD + j * 16, HD);
                    wmma::mma_sync(o[j], pfr[kk], vf, o[j]);
                }
            }
        }
        __syncthreads();
    }

    // Normalise by l and write the rows through the warp's score tile.
    const int r = lane >> 1, hf = lane & 1;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) bc[r * 16 + hf * 8 + i] = inv;
    __syncwarp();
    scale_rows<HD>(o, bc);
    const u64 out_base = ((first + tok) * heads + head0 + hh) * HD;
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) {
        wmma::store_matrix_sync(sw, o[j], pf::S_LD, wmma::mem_row_major);
        __syncwarp();
        if (row_ok) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int c = hf * 8 + i;
                store_out(sw[r * pf::S_LD + c], out_hi, out_lo, out_base + j * 16 + c, kind);
            }
        }
        __syncwarp();
    }
}

#define PREFILL_ENTRY(NAME, T, HD)                                                             \
    extern "C" __global__ void __launch_bounds__(pf::WARPS * 32)                               \
        NAME(const float* __restrict__ q, const uint16_t* __restrict__ kc,                     \
             const uint16_t* __restrict__ vc, const uint32_t* __restrict__ seq,                \
             const uint32_t* __restrict__ pos, const uint32_t* __restrict__ items,             \
             uint16_t* __restrict__ out_hi, uint16_t* __restrict__ out_lo, u64 heads,          \
             u64 kv_heads, u64 max_len, u64 gh, float scale, u64 kind) {                       \
        prefill<T, HD>(q, kc, vc, seq, pos, items, out_hi, out_lo, heads, kv_heads, max_len,  \
                       gh, scale, kind);                                                       \
    }

PREFILL_ENTRY(attention_prefill_bf16_d64, __nv_bfloat16, 64)
PREFILL_ENTRY(attention_prefill_bf16_d128, __nv_bfloat16, 128)
PREFILL_ENTRY(attention_prefill_f16_d64, half, 64)
PREFILL_ENTRY(attention_prefill_f16_d128, half, 128)

// ---------------------------------------------------------------------------
// Split-KV attention on CUDA cores, any cache dtype and head_dim <= 256: the
// decode path (and every path of an f32 cache).
//
// A block takes token `tokens[i]`, one chunk of `hpb` q heads of one KV group
// (blockIdx.x = (i * kv_heads + kv_head) * chunks + chunk) and keys
// [split * chunk_len, min((split + 1) * chunk_len, pos + 1)) with split =
// blockIdx.y. Its warps take every SK_WARPS-th key; lanes split head_dim. Each
// warp keeps (m, l) per head in registers (every lane holds the same values:
// the butterfly sums are bitwise equal in all lanes) and its accumulators in
// shared memory. The block merges its warps and writes, per (i, head, split),
// head_dim unnormalised sums then m and l to `partial`.
//
// Dynamic shared memory: (hpb * head_dim * (1 + SK_WARPS) + SK_WARPS * hpb * 2) f32.
#define SK_WARPS 4
#define SK_MAX_HEADS 16
#define SK_PER_LANE 8

extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)
    attention_split(const float* __restrict__ q, const void* __restrict__ kc,
                    const void* __restrict__ vc, const uint32_t* __restrict__ seq,
                    const uint32_t* __restrict__ pos, const uint32_t* __restrict__ tokens,
                    float* __restrict__ partial, u64 heads, u64 kv_heads, u64 head_dim,
                    u64 max_len, u64 hpb, u64 chunk_len, float scale, u64 ckind) {
    extern __shared__ float sm[];
    const u64 group = heads / kv_heads, chunks = (group + hpb - 1) / hpb;
    const u64 chunk = blockIdx.x % chunks, g = (blockIdx.x / chunks) % kv_heads;
    const u64 item = blockIdx.x / chunks / kv_heads;
    const u64 t = tokens[item], len = (u64)pos[t] + 1;
    const u64 split = blockIdx.y, nsplit = gridDim.y;
    const u64 kb = split * chunk_len, ke = min(len, kb + chunk_len);
    const u64 h_lo = chunk * hpb, nh = group - h_lo < hpb ? group - h_lo : hpb;
    const u64 head0 = g * group + h_lo, hd = head_dim;
    const u64 row0 = ((u64)seq[t] * kv_heads + g) * max_len;

    float* qs = sm;
    float* acc = qs + hpb * hd;
    float* ml = acc + SK_WARPS * hpb * hd;
    for (u64 i = threadIdx.x; i < nh * hd; i += blockDim.x)
        qs[i] = q[(t * heads + head0) * hd + i] * scale;
    for (u64 i = threadIdx.x; i < SK_WARPS * hpb * hd; i += blockDim.x) acc[i] = 0.0f;
    __syncthreads();

    const u64 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* accw = acc + warp * hpb * hd;
    float m[SK_MAX_HEADS], l[SK_MAX_HEADS];
#pragma unroll
    for (int h = 0; h < SK_MAX_HEADS; ++h) {
        m[h] = neg_inf();
        l[h] = 0.0f;
    }
    for (u64 key = kb + warp; key < ke; key += SK_WARPS) {
        float kr[SK_PER_LANE], vr[SK_PER_LANE];
#pragma unroll
        for (int i = 0; i < SK_PER_LANE; ++i) {
            const u64 d = lane + 32 * i;
            kr[i] = d < hd ? load_cache(kc, (row0 + key) * hd + d, ckind) : 0.0f;
            vr[i] = d < hd ? load_cache(vc, (row0 + key) * hd + d, ckind) : 0.0f;
        }
#pragma unroll
        for (int h = 0; h < SK_MAX_HEADS; ++h) {
            if ((u64)h >= nh) break;
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < SK_PER_LANE; ++i) {
                const u64 d = lane + 32 * i;
                if (d < hd) dot += qs[h * hd + d] * kr[i];
            }
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            const float m_new = fmaxf(m[h], dot);
            const float corr = expf(m[h] - m_new);
            const float p = expf(dot - m_new);
            l[h] = l[h] * corr + p;
            m[h] = m_new;
#pragma unroll
            for (int i = 0; i < SK_PER_LANE; ++i) {
                const u64 d = lane + 32 * i;
                if (d < hd) accw[h * hd + d] = accw[h * hd + d] * corr + p * vr[i];
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < SK_MAX_HEADS; ++h) {
            if ((u64)h < nh) {
                ml[(warp * hpb + h) * 2] = m[h];
                ml[(warp * hpb + h) * 2 + 1] = l[h];
            }
        }
    }
    __syncthreads();
    for (u64 i = threadIdx.x; i < nh * hd; i += blockDim.x) {
        const u64 h = i / hd, d = i % hd;
        float mx = neg_inf();
        for (int w = 0; w < SK_WARPS; ++w) mx = fmaxf(mx, ml[(w * hpb + h) * 2]);
        float a = 0.0f, sum = 0.0f;
        for (int w = 0; w < SK_WARPS; ++w) {
            const float mw = ml[(w * hpb + h) * 2];
            if (mw == neg_inf()) continue;
            const float e = expf(mw - mx);
            a += acc[(w * hpb + h) * hd + d] * e;
            sum += ml[(w * hpb + h) * 2 + 1] * e;
        }
        float* dst = partial + ((item * heads + head0 + h) * nsplit + split) * (hd + 2);
        dst[d] = a;
        if (d == 0) {
            dst[hd] = mx;
            dst[hd + 1] = sum;
        }
    }
}

// Merges the `nsplit` partial results of each (i, head) (one block each,
// blockIdx.x = i * heads + head) into the output row of token tokens[i].
extern "C" __global__ void attention_combine(const float* __restrict__ partial,
                                             const uint32_t* __restrict__ tokens,
                                             uint16_t* __restrict__ out_hi,
                                             uint16_t* __restrict__ out_lo, u64 heads,
                                             u64 head_dim, u64 nsplit, u64 kind) {
    const u64 item = blockIdx.x / heads, h = blockIdx.x % heads, hd = head_dim;
    const u64 t = tokens[item];
    const float* src = partial + (item * heads + h) * nsplit * (hd + 2);
    float mx = neg_inf();
    for (u64 s = 0; s < nsplit; ++s) mx = fmaxf(mx, src[s * (hd + 2) + hd]);
    float sum = 0.0f;
    for (u64 s = 0; s < nsplit; ++s) {
        const float ms = src[s * (hd + 2) + hd];
        if (ms != neg_inf()) sum += src[s * (hd + 2) + hd + 1] * expf(ms - mx);
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (u64 d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (u64 s = 0; s < nsplit; ++s) {
            const float ms = src[s * (hd + 2) + hd];
            if (ms != neg_inf()) a += src[s * (hd + 2) + d] * expf(ms - mx);
        }
        store_out(a * inv, out_hi, out_lo, (t * heads + h) * hd + d, kind);
    }
}
