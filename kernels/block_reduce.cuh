// block_reduce.cuh: deterministic warp and block reductions (fixed shuffle tree, no atomics).
// Used by reduce.cu and loss.cu.  No kernels here.
//
// Every function must be called by all threads of the block (they contain __syncthreads), with
// blockDim.x a multiple of 32 and blockDim.y == blockDim.z == 1.  `scratch` is a __shared__
// array of at least 32 elements owned by the caller.  The result is valid in every thread.
#ifndef GB_BLOCK_REDUCE_CUH
#define GB_BLOCK_REDUCE_CUH

#include "common.cuh"

__device__ __forceinline__ double gb_warp_sum(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(GB_FULL_WARP_MASK, v, offset);
    }
    return v;
}

// max(a, b) in which a NaN operand wins (NumPy's np.max rule), so that one NaN logit makes its
// whole row NaN whatever thread or lane holds it.
__device__ __forceinline__ real_t gb_max_nan(real_t a, real_t b) {
    return (b > a || b != b) ? b : a;
}

__device__ __forceinline__ real_t gb_warp_max(real_t v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const real_t other = __shfl_xor_sync(GB_FULL_WARP_MASK, v, offset);
        v = gb_max_nan(v, other);
    }
    return v;
}

// Σ v over the block, accumulated in double whatever real_t is.
__device__ __forceinline__ double gb_block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = gb_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    v = gb_warp_sum(v);
    __syncthreads();  // scratch may be reused by the next call
    return v;
}

// Σ term(i) over this block's share of i ∈ [0, n) (a grid-stride loop, accumulated in double),
// then over the block with gb_block_sum.  term may also write per-element outputs (a loss's
// gradient).  Thread 0 stores the result as the block's partial sum.
template <typename Term>
__device__ __forceinline__ double gb_grid_stride_sum(long long n, double* scratch, Term term) {
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        acc += term(i);
    }
    return gb_block_sum(acc, scratch);
}

__device__ __forceinline__ real_t gb_block_max(real_t v, real_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = gb_warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : scratch[0];
    v = gb_warp_max(v);
    __syncthreads();
    return v;
}

#endif  // GB_BLOCK_REDUCE_CUH
