// Next-token choice for every output row of a pass (src/llm/gpu_sampling.rs):
// one block per row of f32 logits, one token id out per row, so only the ids
// travel back to the host.
//
// Per row: greedy (temperature <= 0) is the argmax, ties to the lowest id like
// the host's `argmax`. Otherwise the row's weights w = exp((l - max) / T) are
// held as 40-bit fixed point (integer sums do not depend on the order of the
// additions, so the same row and draw give the same token on every run); top-k
// keeps the tokens whose logit is at least the k-th largest (radix select over
// order-preserving keys, counts per 8-bit digit), top-p then keeps the largest
// logits whose mass first reaches top_p of what top-k kept (radix select with
// masses per digit instead of counts), both without a sort; ties at either
// threshold are kept. The token is then the one where the running mass of the
// kept tokens, in id order, passes uniform * their total: the host's uniform
// draw, from the request's own generator, decides the token.
//
// Every pointer parameter is a device address and every count a 64-bit
// integer, as in model.cu.
#include "common.cuh"

// One row's rule, 16 bytes, as src/llm/gpu_sampling.rs writes it.
struct RowSpec {
    float temperature;  // <= 0: greedy
    float top_p;        // >= 1: no nucleus cut
    uint32_t top_k;     // 0: no top-k cut (the host sends 0 for k >= vocab)
    float uniform;      // the draw, in [0, 1)
};

// 2^40: a weight of 1 (the row's maximum) in fixed point. A row of 2^24
// weights sums to under 2^64.
#define MASS_ONE 1099511627776.0f
#define NO_TOKEN 0xffffffffu

// A key whose unsigned order is the float order; NaN sorts below -inf.
__device__ __forceinline__ uint32_t order_key(float v) {
    if (v != v) return 0u;
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// w = exp((v - maxv) / t) in fixed point; NaN and -inf logits weigh nothing.
__device__ __forceinline__ u64 fixed_weight(float v, float maxv, float t) {
    if (!(v > -INFINITY)) return 0;
    const float w = expf((v - maxv) / t);
    return (u64)(w * MASS_ONE);
}

__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
    return v > bv || (v == bv && i < bi);
}

// Block-wide argmax (blockDim.x a multiple of 32): every thread passes its own
// candidate and gets the block's best, lowest id among equal values.
__device__ void block_argmax(float* v, uint32_t* i, float* sv, uint32_t* si) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (better(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) { sv[warp] = *v; si[warp] = *i; }
    __syncthreads();
    *v = lane < nw ? sv[lane] : -INFINITY;
    *i = lane < nw ? si[lane] : NO_TOKEN;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (better(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
}

// Block-wide exclusive prefix sum of one u64 per thread, in thread order;
// `total` gets the block's sum.
__device__ u64 block_exclusive_scan(u64 x, u64* shared32, u64* total) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    u64 incl = x;
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    __syncthreads();
    if (lane == 31) shared32[warp] = incl;
    __syncthreads();
    u64 before = 0, all = 0;
    for (int w = 0; w < nw; ++w) {
        if (w < warp) before += shared32[w];
        all += shared32[w];
    }
    *total = all;
    return before + incl - x;
}

// The key of the k-th largest logit of the row (1 <= k <= vocab): four
// passes, each fixing the next 8 bits of the key by counting per digit.
__device__ uint32_t kth_largest_key(const float* row, u64 vocab, uint32_t k, uint32_t* hist,
                                    uint32_t* state) {
    uint32_t prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const uint32_t key = order_key(row[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t above = 0;
            int b = 255;
            for (; b > 0; --b) {
                if (above + hist[b] >= remaining) break;
                above += hist[b];
            }
            state[0] = prefix | ((uint32_t)b << shift);
            state[1] = remaining - above;
        }
        __syncthreads();
        prefix = state[0];
        remaining = state[1];
        mask |= 255u << shift;
    }
    return prefix;
}

// The largest key v such that the tokens with keys in [v, ...) among those at
// or above `floor_key` weigh at least `target` (>= 1, at most their total):
// like kth_largest_key, with masses per digit instead of counts.
__device__ uint32_t nucleus_key(const float* row, u64 vocab, uint32_t floor_key, float maxv,
                                float t, u64 target, u64* hist, u64* state) {
    uint32_t prefix = 0, mask = 0;
    u64 above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float v = row[i];
            const uint32_t key = order_key(v);
            if (key >= floor_key && (key & mask) == prefix) {
                atomicAdd(&hist[(key >> shift) & 255u], fixed_weight(v, maxv, t));
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 acc = above;
            int b = 255;
            for (; b > 0; --b) {
                if (acc + hist[b] >= target) break;
                acc += hist[b];
            }
            state[0] = prefix | ((uint32_t)b << shift);
            state[1] = acc;
        }
        __syncthreads();
        prefix = (uint32_t)state[0];
        above = state[1];
        mask |= 255u << shift;
    }
    return prefix;
}

// The kept token where the running mass in id order passes uniform * total.
// Each thread owns a contiguous range of ids; exactly one range holds it.
__device__ void draw_token(const float* row, u64 vocab, uint32_t keep_key, float maxv, float t,
                           float uniform, u64* shared32, uint32_t* out) {
    const u64 per = (vocab + blockDim.x - 1) / blockDim.x;
    const u64 lo = min((u64)threadIdx.x * per, vocab), hi = min(lo + per, vocab);
    u64 mine = 0;
    for (u64 i = lo; i < hi; ++i) {
        const float v = row[i];
        if (order_key(v) >= keep_key) mine += fixed_weight(v, maxv, t);
    }
    u64 total;
    const u64 before = block_exclusive_scan(mine, shared32, &total);
    u64 r = (u64)((double)uniform * (double)total);
    if (r >= total) r = total - 1;  // total >= 1: the maximum weighs MASS_ONE
    if (mine == 0 || r < before || r >= before + mine) return;
    u64 acc = before;
    for (u64 i = lo; i < hi; ++i) {
        const float v = row[i];
        if (order_key(v) < keep_key) continue;
        acc += fixed_weight(v, maxv, t);
        if (acc > r) {
            *out = (uint32_t)i;
            return;
        }
    }
}

// ids[r] = the token chosen for row r of logits [rows, vocab] under specs[r];
// one block (a multiple of 32 threads, at most 1024) per row.
extern "C" __global__ void sample_rows(const float* __restrict__ logits,
                                       const RowSpec* __restrict__ specs,
                                       uint32_t* __restrict__ ids, u64 rows, u64 vocab) {
    __shared__ float sv[32];
    __shared__ uint32_t si[32];
    __shared__ uint32_t hist32[256];
    __shared__ u64 hist64[256];
    __shared__ u64 state[2];
    __shared__ uint32_t state32[2];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = logits + r * vocab;
        const RowSpec spec = specs[r];
        float best = -INFINITY;
        uint32_t best_id = NO_TOKEN;
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) {
            if (row[i] > best) { best = row[i]; best_id = (uint32_t)i; }
        }
        block_argmax(&best, &best_id, sv, si);
        const uint32_t greedy = best_id == NO_TOKEN ? 0u : best_id;
        // An infinite maximum leaves no finite weights: take the argmax.
        if (!(spec.temperature > 0.0f) || !isfinite(best)) {
            if (threadIdx.x == 0) ids[r] = greedy;
            __syncthreads();
            continue;
        }
        const float t = spec.temperature;
        uint32_t keep = order_key(-INFINITY);
        if (spec.top_k > 0 && spec.top_k < vocab) {
            keep = kth_largest_key(row, vocab, spec.top_k, hist32, state32);
        }
        if (spec.top_p < 1.0f) {
            u64 mine = 0;
            for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) {
                if (order_key(row[i]) >= keep) mine += fixed_weight(row[i], best, t);
            }
            u64 total;
            block_exclusive_scan(mine, hist64, &total);
            __syncthreads();  // hist64 is reused as the mass histogram
            double want = ceil((double)fmaxf(spec.top_p, 0.0f) * (double)total);
            const u64 target = want < 1.0 ? 1 : (want > (double)total ? total : (u64)want);
            keep = nucleus_key(row, vocab, keep, best, t, target, hist64, state);
        }
        if (threadIdx.x == 0) ids[r] = greedy;  // overwritten by the drawn token
        __syncthreads();
        draw_token(row, vocab, keep, best, t, spec.uniform, hist64, &ids[r]);
        __syncthreads();
    }
}
