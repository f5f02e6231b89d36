// gemm.cu: the dense layer's three matrix products, all operands row-major and read in place.
//
//   dense_forward          Y = f(X Wᵀ + b)   X (M,K), W (N,K), b (N,) → Y (M,N) [and Z = X Wᵀ + b]
//   dense_backward_data    dX = δ W           δ (M,N), W (N,K) → dX (M,K)
//   dense_backward_weight  dW = δᵀ X          δ (M,N), X (M,K) → dW (N,K)
//
// Versions (the library uses the tiled ones; the naive ones are kept to validate them):
//   *_naive   one thread per output element, a plain loop over the inner dimension; obviously
//             correct, slow.
//   (tiled)   dense_forward / dense_backward_data / dense_backward_weight: TILE_M×TILE_N block
//             tile, TILE_K-deep slices staged in shared memory (double-buffered, the next slice
//             prefetched into registers while the current one is multiplied, one barrier per
//             slice), a MICRO_M×MICRO_N register tile per thread split into 4×4 quarters so
//             that shared-memory reads are 16-byte and bank-conflict free, 16-byte global loads
//             where the launcher found the operand 16-byte aligned with a leading dimension
//             that is a multiple of 4 (flags vec_*), guarded scalar loads elsewhere.  Any
//             M, N, K ≥ 0 (edges zero-filled; K = 0 gives Y = f(b)).
//
// The epilogue of dense_forward adds the bias and applies the activation (activations.cuh),
// and writes Z only when the activation's derivative needs z (write_z).
#include "common.cuh"
#include "activations.cuh"

#ifndef TILE_M
#define TILE_M 128
#endif
#ifndef TILE_N
#define TILE_N 128
#endif
#ifndef TILE_K
#define TILE_K 8
#endif
#ifndef MICRO_M
#define MICRO_M 8
#endif
#ifndef MICRO_N
#define MICRO_N 8
#endif
#ifndef NAIVE_BLOCK
#define NAIVE_BLOCK 16
#endif

// Launch with blockDim.x == GEMM_THREADS (the launcher reads the same defines).
#define GEMM_THREADS_N (TILE_N / MICRO_N)
#define GEMM_THREADS ((TILE_M / MICRO_M) * GEMM_THREADS_N)
// +4 padding: the transposed stores of INNER-layout tiles hit distinct banks, rows stay 16-byte
// aligned for the vector reads.
#define SMEM_STRIDE_A (TILE_M + 4)
#define SMEM_STRIDE_B (TILE_N + 4)

static_assert(TILE_K % 4 == 0 && MICRO_M % 4 == 0 && MICRO_N % 4 == 0,
              "TILE_K, MICRO_M and MICRO_N must be multiples of 4");
static_assert(TILE_M % MICRO_M == 0 && TILE_N % MICRO_N == 0, "micro-tile must divide the tile");

// How element (r, p) of an operand (r along the output, p along the inner dimension) is stored.
#define LAYOUT_INNER 0  // a[r * ld + p]: rows along the inner dimension are contiguous
#define LAYOUT_OUTER 1  // a[p * ld + r]

// Four consecutive elements src[0..3]; the first `valid` exist, the rest read as 0.
__device__ __forceinline__ void gb_load4(const real_t* __restrict__ src, int valid, int vec,
                                         real_t v[4]) {
    if (vec && valid >= 4) {
        if (sizeof(real_t) == 4) {
            const float4 t = *reinterpret_cast<const float4*>(src);
            v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        } else {
            const double2 t0 = reinterpret_cast<const double2*>(src)[0];
            const double2 t1 = reinterpret_cast<const double2*>(src)[1];
            v[0] = t0.x; v[1] = t0.y; v[2] = t1.x; v[3] = t1.y;
        }
    } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = q < valid ? src[q] : (real_t)0;
    }
}

// Four consecutive shared-memory elements, 16-byte aligned by construction.
__device__ __forceinline__ void gb_lds4(const real_t* src, real_t v[4]) {
    if (sizeof(real_t) == 4) {
        const float4 t = *reinterpret_cast<const float4*>(src);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
        const double2 t0 = reinterpret_cast<const double2*>(src)[0];
        const double2 t1 = reinterpret_cast<const double2*>(src)[1];
        v[0] = t0.x; v[1] = t0.y; v[2] = t1.x; v[3] = t1.y;
    }
}

// A TILE_R × TILE_K slice is cut in chunks of 4 elements contiguous in memory; thread t owns
// chunks t, t + GEMM_THREADS, ...
template <int TILE_R>
struct GemmChunks {
    static const int total = TILE_R * TILE_K / 4;
    static const int per_thread = (total + GEMM_THREADS - 1) / GEMM_THREADS;
};

// Global → registers: the slice starting at (r0, p0) of an operand with `rows` × `inner`
// logical elements.
template <int LAYOUT, int TILE_R>
__device__ __forceinline__ void gemm_fetch(const real_t* __restrict__ a, long long ld, int rows,
                                           int inner, int r0, int p0, int vec,
                                           real_t regs[][4]) {
#pragma unroll
    for (int s = 0; s < GemmChunks<TILE_R>::per_thread; ++s) {
        const int c = threadIdx.x + s * GEMM_THREADS;
        if (c >= GemmChunks<TILE_R>::total) break;
        int r, p, valid;
        long long offset;
        if (LAYOUT == LAYOUT_INNER) {  // 4 consecutive p of one row r
            r = c / (TILE_K / 4);
            p = (c % (TILE_K / 4)) * 4;
            valid = r0 + r < rows ? inner - (p0 + p) : 0;
            offset = (long long)(r0 + r) * ld + (p0 + p);
        } else {  // 4 consecutive r of one inner index p
            p = c / (TILE_R / 4);
            r = (c % (TILE_R / 4)) * 4;
            valid = p0 + p < inner ? rows - (r0 + r) : 0;
            offset = (long long)(p0 + p) * ld + (r0 + r);
        }
        gb_load4(valid > 0 ? a + offset : a, valid, vec, regs[s]);
    }
}

// Registers → shared memory laid out [p][r] (r contiguous) whatever the global layout.
template <int LAYOUT, int TILE_R>
__device__ __forceinline__ void gemm_stash(real_t* smem, real_t regs[][4]) {
    const int stride = TILE_R + 4;
#pragma unroll
    for (int s = 0; s < GemmChunks<TILE_R>::per_thread; ++s) {
        const int c = threadIdx.x + s * GEMM_THREADS;
        if (c >= GemmChunks<TILE_R>::total) break;
        if (LAYOUT == LAYOUT_INNER) {
            const int r = c / (TILE_K / 4), p = (c % (TILE_K / 4)) * 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) smem[(p + q) * stride + r] = regs[s][q];
        } else {
            const int p = c / (TILE_R / 4), r = (c % (TILE_R / 4)) * 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) smem[p * stride + r + q] = regs[s][q];
        }
    }
}

// acc[i][j] = Σ_p A(row(i), p) B(col(j), p) over the block's tile, where the thread's rows are
// row(i) = (i/4)·(TILE_M/(MICRO_M/4)) + ty·4 + i%4 (cols likewise with tx).
template <int LAYOUT_A, int LAYOUT_B>
__device__ __forceinline__ void gemm_tile(const real_t* __restrict__ a, long long lda, int vec_a,
                                          const real_t* __restrict__ b, long long ldb, int vec_b,
                                          int rows, int cols, int inner,
                                          real_t acc[MICRO_M][MICRO_N]) {
    __shared__ __align__(16) real_t smem_a[2][TILE_K * SMEM_STRIDE_A];
    __shared__ __align__(16) real_t smem_b[2][TILE_K * SMEM_STRIDE_B];
    const int tx = threadIdx.x % GEMM_THREADS_N, ty = threadIdx.x / GEMM_THREADS_N;
    const int r0 = blockIdx.x * TILE_M, c0 = blockIdx.y * TILE_N;

#pragma unroll
    for (int i = 0; i < MICRO_M; ++i)
#pragma unroll
        for (int j = 0; j < MICRO_N; ++j) acc[i][j] = (real_t)0;

    real_t regs_a[GemmChunks<TILE_M>::per_thread][4];
    real_t regs_b[GemmChunks<TILE_N>::per_thread][4];
    gemm_fetch<LAYOUT_A, TILE_M>(a, lda, rows, inner, r0, 0, vec_a, regs_a);
    gemm_fetch<LAYOUT_B, TILE_N>(b, ldb, cols, inner, c0, 0, vec_b, regs_b);
    gemm_stash<LAYOUT_A, TILE_M>(smem_a[0], regs_a);
    gemm_stash<LAYOUT_B, TILE_N>(smem_b[0], regs_b);
    __syncthreads();

    int buffer = 0;
    for (int p0 = 0; p0 < inner; p0 += TILE_K) {
        const bool more = p0 + TILE_K < inner;
        if (more) {  // in flight while this slice is multiplied
            gemm_fetch<LAYOUT_A, TILE_M>(a, lda, rows, inner, r0, p0 + TILE_K, vec_a, regs_a);
            gemm_fetch<LAYOUT_B, TILE_N>(b, ldb, cols, inner, c0, p0 + TILE_K, vec_b, regs_b);
        }
        const real_t* sa = smem_a[buffer];
        const real_t* sb = smem_b[buffer];
#pragma unroll
        for (int p = 0; p < TILE_K; ++p) {
            real_t fa[MICRO_M], fb[MICRO_N];
#pragma unroll
            for (int g = 0; g < MICRO_M / 4; ++g)
                gb_lds4(sa + p * SMEM_STRIDE_A + g * (TILE_M / (MICRO_M / 4)) + ty * 4, fa + 4 * g);
#pragma unroll
            for (int g = 0; g < MICRO_N / 4; ++g)
                gb_lds4(sb + p * SMEM_STRIDE_B + g * (TILE_N / (MICRO_N / 4)) + tx * 4, fb + 4 * g);
#pragma unroll
            for (int i = 0; i < MICRO_M; ++i)
#pragma unroll
                for (int j = 0; j < MICRO_N; ++j) acc[i][j] += fa[i] * fb[j];
        }
        if (more) {  // the other buffer was last read before the previous barrier
            gemm_stash<LAYOUT_A, TILE_M>(smem_a[buffer ^ 1], regs_a);
            gemm_stash<LAYOUT_B, TILE_N>(smem_b[buffer ^ 1], regs_b);
        }
        __syncthreads();
        buffer ^= 1;
    }
}

__device__ __forceinline__ int gemm_row(int i) {
    return blockIdx.x * TILE_M + (i / 4) * (TILE_M / (MICRO_M / 4))
           + (threadIdx.x / GEMM_THREADS_N) * 4 + i % 4;
}

__device__ __forceinline__ int gemm_col(int j) {
    return blockIdx.y * TILE_N + (j / 4) * (TILE_N / (MICRO_N / 4))
           + (threadIdx.x % GEMM_THREADS_N) * 4 + j % 4;
}

__device__ __forceinline__ void gemm_store(real_t* __restrict__ c, int rows, int cols,
                                           real_t acc[MICRO_M][MICRO_N]) {
#pragma unroll
    for (int i = 0; i < MICRO_M; ++i) {
        const int r = gemm_row(i);
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < MICRO_N; ++j) {
            const int col = gemm_col(j);
            if (col < cols) c[(long long)r * cols + col] = acc[i][j];
        }
    }
}

// Y = f(X Wᵀ + b); Z = X Wᵀ + b when write_z.  grid (⌈M/TILE_M⌉, ⌈N/TILE_N⌉), block GEMM_THREADS.
// bias is read only when has_bias, z written only when write_z (else any valid pointer).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_forward(const real_t* __restrict__ x, const real_t* __restrict__ w,
              const real_t* __restrict__ bias, real_t* __restrict__ y, real_t* __restrict__ z,
              int M, int N, int K, int has_bias, int write_z, int act_code, real_t alpha,
              int vec_x, int vec_w) {
    real_t acc[MICRO_M][MICRO_N];
    gemm_tile<LAYOUT_INNER, LAYOUT_INNER>(x, K, vec_x, w, K, vec_w, M, N, K, acc);
#pragma unroll
    for (int j = 0; j < MICRO_N; ++j) {
        const int col = gemm_col(j);
        const real_t b = (has_bias && col < N) ? bias[col] : (real_t)0;
#pragma unroll
        for (int i = 0; i < MICRO_M; ++i) {
            const int r = gemm_row(i);
            if (r < M && col < N) {
                const real_t pre = acc[i][j] + b;
                const long long at = (long long)r * N + col;
                if (write_z) z[at] = pre;
                y[at] = act_forward(act_code, pre, alpha);
            }
        }
    }
}

// dX (M,K) = δ (M,N) · W (N,K).  grid (⌈M/TILE_M⌉, ⌈K/TILE_N⌉).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_data(const real_t* __restrict__ delta, const real_t* __restrict__ w,
                    real_t* __restrict__ dx, int M, int N, int K, int vec_delta, int vec_w) {
    real_t acc[MICRO_M][MICRO_N];
    gemm_tile<LAYOUT_INNER, LAYOUT_OUTER>(delta, N, vec_delta, w, K, vec_w, M, K, N, acc);
    gemm_store(dx, M, K, acc);
}

// dW (N,K) = δᵀ (N,M) · X (M,K).  grid (⌈N/TILE_M⌉, ⌈K/TILE_N⌉).  M = 0 gives zeros.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_weight(const real_t* __restrict__ delta, const real_t* __restrict__ x,
                      real_t* __restrict__ dw, int M, int N, int K, int vec_delta, int vec_x) {
    real_t acc[MICRO_M][MICRO_N];
    gemm_tile<LAYOUT_OUTER, LAYOUT_OUTER>(delta, N, vec_delta, x, K, vec_x, N, K, M, acc);
    gemm_store(dw, N, K, acc);
}

// ---- naive reference versions: block (NAIVE_BLOCK, NAIVE_BLOCK), thread (x: column, y: row) --

extern "C" __global__ void dense_forward_naive(const real_t* __restrict__ x,
                                               const real_t* __restrict__ w,
                                               const real_t* __restrict__ bias,
                                               real_t* __restrict__ y, real_t* __restrict__ z,
                                               int M, int N, int K, int has_bias, int write_z,
                                               int act_code, real_t alpha) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= M || col >= N) return;
    real_t sum = has_bias ? bias[col] : (real_t)0;
    for (int k = 0; k < K; ++k) sum += x[(long long)row * K + k] * w[(long long)col * K + k];
    if (write_z) z[(long long)row * N + col] = sum;
    y[(long long)row * N + col] = act_forward(act_code, sum, alpha);
}

extern "C" __global__ void dense_backward_data_naive(const real_t* __restrict__ delta,
                                                     const real_t* __restrict__ w,
                                                     real_t* __restrict__ dx, int M, int N, int K) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;  // k
    const int row = blockIdx.y * blockDim.y + threadIdx.y;  // m
    if (row >= M || col >= K) return;
    real_t sum = (real_t)0;
    for (int n = 0; n < N; ++n) sum += delta[(long long)row * N + n] * w[(long long)n * K + col];
    dx[(long long)row * K + col] = sum;
}

extern "C" __global__ void dense_backward_weight_naive(const real_t* __restrict__ delta,
                                                       const real_t* __restrict__ x,
                                                       real_t* __restrict__ dw, int M, int N,
                                                       int K) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;  // k
    const int row = blockIdx.y * blockDim.y + threadIdx.y;  // n
    if (row >= N || col >= K) return;
    real_t sum = (real_t)0;
    for (int m = 0; m < M; ++m) sum += delta[(long long)m * N + row] * x[(long long)m * K + col];
    dw[(long long)row * K + col] = sum;
}
