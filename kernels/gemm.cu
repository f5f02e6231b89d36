// gemm.cu: the dense layer's three matrix products, all operands row-major and read in place.
//
//   dense_forward          Y = f(X Wᵀ + b)   X (M,K), W (N,K), b (N,) → Y (M,N) [and Z = X Wᵀ + b]
//   dense_backward_data    dX = δ W           δ (M,N), W (N,K) → dX (M,K)
//   dense_backward_weight  dW = δᵀ X          δ (M,N), X (M,K) → dW (N,K)
//
// Versions (the library uses the tiled ones until a GPU measurement, bench/gemm_sweep.py, says
// otherwise; the naive ones are kept to validate the others):
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
//   *_act     dense_backward_weight_act / dense_backward_data_act, and their forms
//             dense_backward_weight_act_warptiled / dense_backward_data_act_warptiled and
//             dense_backward_weight_act_splitk / dense_backward_data_act_splitk: the backward
//             GEMMs taking ∂L/∂y and the saved y or z, forming δ = ∂L/∂y ⊙ f' as they load it;
//             the weight one also gives the bias gradient (the library's dense backward: 2
//             launches, 3 when a GEMM is split, see below).
//   *_splitk  dense_forward_splitk / dense_backward_data_splitk / dense_backward_weight_splitk:
//             the tiled version over one slice of the inner dimension per blockIdx.z into a
//             partial buffer, then gemm_splitk_reduce adds the slices in a fixed order and
//             applies the epilogue (deterministic; for outputs with few tiles and a long inner
//             dimension, see gemm_plan in gpubackprop/backends).  The backward's split
//             partials (the *_act_splitk kernels) are added by one
//             gemm_splitk_reduce_backward for dW, db and dX together.
//   *_warptiled  dense_forward_warptiled / dense_backward_data_warptiled /
//             dense_backward_weight_warptiled, same parameters and results: adds a warp level
//             to the tiled design.  The WT_BM×WT_BN block tile is cut into WT_WM×WT_WN warp
//             tiles, each thread holds WT_WMITER×WT_WNITER small WT_TM×WT_TN register tiles
//             placed so that a warp's 16-byte shared-memory reads are conflict-free broadcasts;
//             same staging and loads as the tiled version (WT_BK-deep slices), plus 16-byte
//             stores where the output allows them.  See the section comment below.
//
// The epilogue of dense_forward adds the bias and applies the activation (activations.cuh),
// and writes Z only when the activation's derivative needs z (write_z).
#include "common.cuh"
#include "activations.cuh"

// Which versions this compile holds.  A plain compile of the file holds all three; the loader
// compiles only the version a backend launches (GEMM_TILED=1 GEMM_WARPTILED=0 GEMM_NAIVE=0, say),
// which makes NVRTC and the emulator's g++ build two to three times faster and lets the tile
// sweep time a configuration after seconds instead of a quarter of a minute.
#ifndef GEMM_TILED
#define GEMM_TILED 1
#endif
#ifndef GEMM_WARPTILED
#define GEMM_WARPTILED 1
#endif
#ifndef GEMM_NAIVE
#define GEMM_NAIVE 1
#endif

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

// Launch with blockDim.x == GEMM_THREADS (the launcher reads the same defines).
#define GEMM_THREADS_N (TILE_N / MICRO_N)
#define GEMM_THREADS ((TILE_M / MICRO_M) * GEMM_THREADS_N)

// Row length of a shared-memory slice laid out [p][r]: +4 padding so that the transposed stores
// of INNER-layout tiles hit distinct banks while rows stay 16-byte aligned for the vector reads.
__host__ __device__ constexpr int gemm_smem_stride(int tile_rows) { return tile_rows + 4; }

static_assert(TILE_K % 4 == 0 && MICRO_M % 4 == 0 && MICRO_N % 4 == 0,
              "TILE_K, MICRO_M and MICRO_N must be multiples of 4");
static_assert(TILE_M % MICRO_M == 0 && TILE_N % MICRO_N == 0, "micro-tile must divide the tile");

// How element (r, p) of an operand (r along the output, p along the inner dimension) is stored.
#define LAYOUT_INNER 0  // a[r * ld + p]: rows along the inner dimension are contiguous
#define LAYOUT_OUTER 1  // a[p * ld + r]

// Four consecutive elements at a 16-byte-aligned address (shared memory by construction,
// global memory when the launcher's vec flag says so): one float4 or two double2 loads.
__device__ __forceinline__ void gb_ld4_aligned(const real_t* src, real_t v[4]) {
    if (sizeof(real_t) == 4) {
        const float4 t = *reinterpret_cast<const float4*>(src);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
        const double2 t0 = reinterpret_cast<const double2*>(src)[0];
        const double2 t1 = reinterpret_cast<const double2*>(src)[1];
        v[0] = t0.x; v[1] = t0.y; v[2] = t1.x; v[3] = t1.y;
    }
}

// Four consecutive elements src[0..3]; the first `valid` exist, the rest read as 0.
__device__ __forceinline__ void gb_load4(const real_t* __restrict__ src, int valid, int vec,
                                         real_t v[4]) {
    if (vec && valid >= 4) {
        gb_ld4_aligned(src, v);
    } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = q < valid ? src[q] : (real_t)0;
    }
}

// A TILE_R × TILE_P slice (TILE_P along the inner dimension) is cut in chunks of 4 elements
// contiguous in memory; thread t of THREADS owns chunks t, t + THREADS, ...  Shared by both
// versions: (TILE_K, GEMM_THREADS) for the tiled one, (WT_BK, WT_THREADS) for the warp-tiled one.
template <int TILE_R, int TILE_P, int THREADS>
struct GemmChunks {
    static const int total = TILE_R * TILE_P / 4;
    static const int per_thread = (total + THREADS - 1) / THREADS;
};

// Global → registers: the slice starting at (r0, p0) of an operand with `rows` × `inner`
// logical elements.
// With ACT the operand is δ = a ⊙ f'(act.saved), formed here (act.saved read at a's offsets).
struct GemmAct {
    const real_t* saved;
    int code;
    real_t alpha;
};

// act_backward kept out of line for the warp-tiled version (Shape::ACT_OUT_OF_LINE): inlined
// into each element a thread loads it doubles that version's compile time, for a few
// instructions per loaded element beside WT_ROWS·WT_COLS multiply-adds.
__device__ __noinline__ real_t gemm_act_backward_call(int code, real_t dout, real_t saved,
                                                      real_t alpha) {
    return act_backward(code, dout, saved, alpha);
}

template <int LAYOUT, int TILE_R, int TILE_P, int THREADS, bool ACT = false,
          bool ACT_OUT_OF_LINE = false>
__device__ __forceinline__ void gemm_fetch(const real_t* __restrict__ a, long long ld, int rows,
                                           int inner, int r0, int p0, int vec,
                                           real_t regs[][4], GemmAct act = GemmAct{}) {
    typedef GemmChunks<TILE_R, TILE_P, THREADS> Chunks;
#pragma unroll
    for (int s = 0; s < Chunks::per_thread; ++s) {
        const int c = threadIdx.x + s * THREADS;
        if (c >= Chunks::total) break;
        int r, p, valid;
        long long offset;
        if (LAYOUT == LAYOUT_INNER) {  // 4 consecutive p of one row r
            r = c / (TILE_P / 4);
            p = (c % (TILE_P / 4)) * 4;
            valid = r0 + r < rows ? inner - (p0 + p) : 0;
            offset = (long long)(r0 + r) * ld + (p0 + p);
        } else {  // 4 consecutive r of one inner index p
            p = c / (TILE_R / 4);
            r = (c % (TILE_R / 4)) * 4;
            valid = p0 + p < inner ? rows - (r0 + r) : 0;
            offset = (long long)(p0 + p) * ld + (r0 + r);
        }
        gb_load4(valid > 0 ? a + offset : a, valid, vec, regs[s]);
        if (ACT) {  // δ = ∂L/∂y ⊙ f'(saved), exactly as the elementwise backward computes it
            real_t saved[4];
            gb_load4(valid > 0 ? act.saved + offset : act.saved, valid, vec, saved);
#pragma unroll
            for (int q = 0; q < 4; ++q)
                regs[s][q] = ACT_OUT_OF_LINE
                                 ? gemm_act_backward_call(act.code, regs[s][q], saved[q], act.alpha)
                                 : act_backward(act.code, regs[s][q], saved[q], act.alpha);
        }
    }
}

// Registers → shared memory laid out [p][r] (r contiguous, row stride TILE_R + 4) whatever the
// global layout: an INNER operand is transposed here, so that the multiply reads 16 bytes.
template <int LAYOUT, int TILE_R, int TILE_P, int THREADS>
__device__ __forceinline__ void gemm_stash(real_t* smem, real_t regs[][4]) {
    typedef GemmChunks<TILE_R, TILE_P, THREADS> Chunks;
    const int stride = gemm_smem_stride(TILE_R);
#pragma unroll
    for (int s = 0; s < Chunks::per_thread; ++s) {
        const int c = threadIdx.x + s * THREADS;
        if (c >= Chunks::total) break;
        if (LAYOUT == LAYOUT_INNER) {
            const int r = c / (TILE_P / 4), p = (c % (TILE_P / 4)) * 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) smem[(p + q) * stride + r] = regs[s][q];
        } else {
            const int p = c / (TILE_R / 4), r = (c % (TILE_R / 4)) * 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) smem[p * stride + r + q] = regs[s][q];
        }
    }
}

// The main loop both versions share: acc[i][j] = Σ_p A(row(i), p) B(col(j), p) over the
// block's tile.  Shape-deep slices are staged in shared memory laid out [p][r], double-buffered:
// the next slice is fetched into registers while the current one is multiplied, one barrier per
// slice.  Shape supplies the block tile (BM, BN, BK), the thread count, the accumulator extents
// (ROWS, COLS) and where in a slice row the thread's rows and columns lie: row i (a multiple of
// 4) starts at row_base() + row_offset(i), columns likewise — the only difference between the
// tiled and the warp-tiled version.
// With ACT_A the A operand is δ = a ⊙ f'(act.saved) (gemm_fetch); with ROW_SUMS and
// want_sums, row_sums[i] += Σ_p A(row(i), p) as well (a bias gradient, summed in p order).
template <int LAYOUT_A, int LAYOUT_B, class Shape, bool ACT_A = false, bool ROW_SUMS = false>
__device__ __forceinline__ void gemm_mainloop(const real_t* __restrict__ a, long long lda,
                                              int vec_a, const real_t* __restrict__ b,
                                              long long ldb, int vec_b, int rows, int cols,
                                              int inner, real_t acc[Shape::ROWS][Shape::COLS],
                                              GemmAct act = GemmAct{},
                                              real_t* row_sums = nullptr,
                                              bool want_sums = false) {
    constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK, THREADS = Shape::THREADS;
    constexpr int STRIDE_A = gemm_smem_stride(BM), STRIDE_B = gemm_smem_stride(BN);
    __shared__ __align__(16) real_t smem_a[2][BK * STRIDE_A];
    __shared__ __align__(16) real_t smem_b[2][BK * STRIDE_B];
    const int r0 = blockIdx.x * BM, c0 = blockIdx.y * BN;

#pragma unroll
    for (int i = 0; i < Shape::ROWS; ++i)
#pragma unroll
        for (int j = 0; j < Shape::COLS; ++j) acc[i][j] = (real_t)0;

    real_t regs_a[GemmChunks<BM, BK, THREADS>::per_thread][4];
    real_t regs_b[GemmChunks<BN, BK, THREADS>::per_thread][4];
    gemm_fetch<LAYOUT_A, BM, BK, THREADS, ACT_A, Shape::ACT_OUT_OF_LINE>(a, lda, rows, inner, r0,
                                                                          0, vec_a, regs_a, act);
    gemm_fetch<LAYOUT_B, BN, BK, THREADS>(b, ldb, cols, inner, c0, 0, vec_b, regs_b);
    gemm_stash<LAYOUT_A, BM, BK, THREADS>(smem_a[0], regs_a);
    gemm_stash<LAYOUT_B, BN, BK, THREADS>(smem_b[0], regs_b);
    __syncthreads();

    int buffer = 0;
    for (int p0 = 0; p0 < inner; p0 += BK) {
        const bool more = p0 + BK < inner;
        if (more) {  // in flight while this slice is multiplied
            gemm_fetch<LAYOUT_A, BM, BK, THREADS, ACT_A, Shape::ACT_OUT_OF_LINE>(
                a, lda, rows, inner, r0, p0 + BK, vec_a, regs_a, act);
            gemm_fetch<LAYOUT_B, BN, BK, THREADS>(b, ldb, cols, inner, c0, p0 + BK, vec_b, regs_b);
        }
        const real_t* sa = smem_a[buffer] + Shape::row_base();
        const real_t* sb = smem_b[buffer] + Shape::col_base();
#pragma unroll
        for (int p = 0; p < BK; ++p) {
            real_t fa[Shape::ROWS], fb[Shape::COLS];
#pragma unroll
            for (int i = 0; i < Shape::ROWS; i += 4)
                gb_ld4_aligned(sa + p * STRIDE_A + Shape::row_offset(i), fa + i);
#pragma unroll
            for (int j = 0; j < Shape::COLS; j += 4)
                gb_ld4_aligned(sb + p * STRIDE_B + Shape::col_offset(j), fb + j);
            if (ROW_SUMS && want_sums) {
#pragma unroll
                for (int i = 0; i < Shape::ROWS; ++i) row_sums[i] += fa[i];
            }
#pragma unroll
            for (int i = 0; i < Shape::ROWS; ++i)
#pragma unroll
                for (int j = 0; j < Shape::COLS; ++j) acc[i][j] += fa[i] * fb[j];
        }
        if (more) {  // the other buffer was last read before the previous barrier
            gemm_stash<LAYOUT_A, BM, BK, THREADS>(smem_a[buffer ^ 1], regs_a);
            gemm_stash<LAYOUT_B, BN, BK, THREADS>(smem_b[buffer ^ 1], regs_b);
        }
        __syncthreads();
        buffer ^= 1;
    }
}

// The tiled version: thread (ty, tx) holds rows row(i) = (i/4)·(TILE_M/(MICRO_M/4)) + ty·4 + i%4
// of the block tile, columns likewise with tx, so 16-byte shared reads are conflict-free.
struct TiledShape {
    static constexpr int BM = TILE_M, BN = TILE_N, BK = TILE_K, THREADS = GEMM_THREADS;
    static constexpr int ROWS = MICRO_M, COLS = MICRO_N;
    static constexpr bool ACT_OUT_OF_LINE = false;
    __device__ static int row_base() { return (threadIdx.x / GEMM_THREADS_N) * 4; }
    __device__ static int col_base() { return (threadIdx.x % GEMM_THREADS_N) * 4; }
    __device__ static int row_offset(int i) { return (i / 4) * (TILE_M / (MICRO_M / 4)); }
    __device__ static int col_offset(int j) { return (j / 4) * (TILE_N / (MICRO_N / 4)); }
};

// The output row and column of accumulator acc[i][j] of the tiled version (its TiledShape).
__device__ __forceinline__ int gemm_row(int i) {
    return blockIdx.x * TILE_M + TiledShape::row_offset(i) + TiledShape::row_base() + i % 4;
}

__device__ __forceinline__ int gemm_col(int j) {
    return blockIdx.y * TILE_N + TiledShape::col_offset(j) + TiledShape::col_base() + j % 4;
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

#if GEMM_TILED
// Y = f(X Wᵀ + b); Z = X Wᵀ + b when write_z.  grid (⌈M/TILE_M⌉, ⌈N/TILE_N⌉), block GEMM_THREADS.
// bias is read only when has_bias, z written only when write_z (else any valid pointer).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_forward(const real_t* __restrict__ x, const real_t* __restrict__ w,
              const real_t* __restrict__ bias, real_t* __restrict__ y, real_t* __restrict__ z,
              int M, int N, int K, int has_bias, int write_z, int act_code, real_t alpha,
              int vec_x, int vec_w) {
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_INNER, TiledShape>(x, K, vec_x, w, K, vec_w, M, N, K, acc);
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
    gemm_mainloop<LAYOUT_INNER, LAYOUT_OUTER, TiledShape>(delta, N, vec_delta, w, K, vec_w, M, K, N, acc);
    gemm_store(dx, M, K, acc);
}

// dW (N,K) = δᵀ (N,M) · X (M,K).  grid (⌈N/TILE_M⌉, ⌈K/TILE_N⌉).  M = 0 gives zeros.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_weight(const real_t* __restrict__ delta, const real_t* __restrict__ x,
                      real_t* __restrict__ dw, int M, int N, int K, int vec_delta, int vec_x) {
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_OUTER, LAYOUT_OUTER, TiledShape>(delta, N, vec_delta, x, K, vec_x, N, K, M, acc);
    gemm_store(dw, N, K, acc);
}

// ---- the backward GEMMs with δ formed on load (tiled version) ---------------------------------
//
// δ = ∂L/∂y ⊙ f'(saved) is computed as each slice of ∂L/∂y is fetched (gemm_fetch's ACT), so
// a layer's backward needs no elementwise pass, and the bias gradient Σ_m δ comes out of the
// dW GEMM: its A operand is δᵀ, whose row sums the blocks of column tile 0 accumulate as they
// multiply (in the inner dimension's order: deterministic).  A dense backward is then two
// launches.  vec_delta is 1 only when ∂L/∂y and saved both allow 16-byte loads.

// dW (N,K) = δᵀ X and, with has_bias, db (N) = Σ_m δ.  grid (⌈N/TILE_M⌉, ⌈K/TILE_N⌉), K ≥ 1.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_weight_act(const real_t* __restrict__ dout, const real_t* __restrict__ saved,
                          const real_t* __restrict__ x, real_t* __restrict__ dw,
                          real_t* __restrict__ db, int M, int N, int K, int act_code,
                          real_t alpha, int has_bias, int vec_delta, int vec_x) {
    real_t acc[MICRO_M][MICRO_N];
    real_t sums[MICRO_M];
#pragma unroll
    for (int i = 0; i < MICRO_M; ++i) sums[i] = (real_t)0;
    const bool want_sums = has_bias && blockIdx.y == 0;
    gemm_mainloop<LAYOUT_OUTER, LAYOUT_OUTER, TiledShape, true, true>(
        dout, N, vec_delta, x, K, vec_x, N, K, M, acc, GemmAct{saved, act_code, alpha}, sums,
        want_sums);
    gemm_store(dw, N, K, acc);
    if (want_sums && TiledShape::col_base() == 0) {  // one thread per row of the tile
#pragma unroll
        for (int i = 0; i < MICRO_M; ++i) {
            const int r = gemm_row(i);
            if (r < N) db[r] = sums[i];
        }
    }
}

// dX (M,K) = δ (M,N) · W (N,K).  grid (⌈M/TILE_M⌉, ⌈K/TILE_N⌉).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_data_act(const real_t* __restrict__ dout, const real_t* __restrict__ saved,
                        const real_t* __restrict__ w, real_t* __restrict__ dx, int M, int N,
                        int K, int act_code, real_t alpha, int vec_delta, int vec_w) {
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_OUTER, TiledShape, true>(
        dout, N, vec_delta, w, K, vec_w, M, K, N, acc, GemmAct{saved, act_code, alpha});
    gemm_store(dx, M, K, acc);
}

// ---- deterministic split-K (tiled version) ----------------------------------------------------
//
// When the output has too few block tiles to fill the GPU and the inner dimension is long, the
// inner dimension is cut into gridDim.z slices of `chunk` (a multiple of 4, so that 16-byte
// loads stay aligned): block (x, y, s) computes its tile's partial product over slice s into
// partial[s] (rows × cols), and gemm_splitk_reduce adds the slices in the fixed order
// s = 0, 1, ... and applies the epilogue.  No atomics: the same shapes give the same bits.
// The operand pointers are advanced to the slice's first inner index (by p for an operand whose
// inner index is contiguous, by p·ld for one whose rows are).

// Y's partial products: X (M,K) · W (N,K)ᵀ over inner slice blockIdx.z.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_forward_splitk(const real_t* __restrict__ x, const real_t* __restrict__ w,
                     real_t* __restrict__ partial, int M, int N, int K, int chunk, int vec_x,
                     int vec_w) {
    const int begin = blockIdx.z * chunk;
    const int length = min(chunk, K - begin);
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_INNER, TiledShape>(x + begin, K, vec_x, w + begin, K, vec_w,
                                                          M, N, length, acc);
    gemm_store(partial + (long long)blockIdx.z * M * N, M, N, acc);
}

// dX's partial products: δ (M,N) · W (N,K) over inner (N) slice blockIdx.z.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_data_splitk(const real_t* __restrict__ delta, const real_t* __restrict__ w,
                           real_t* __restrict__ partial, int M, int N, int K, int chunk,
                           int vec_delta, int vec_w) {
    const int begin = blockIdx.z * chunk;
    const int length = min(chunk, N - begin);
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_OUTER, TiledShape>(
        delta + begin, N, vec_delta, w + (long long)begin * K, K, vec_w, M, K, length, acc);
    gemm_store(partial + (long long)blockIdx.z * M * K, M, K, acc);
}

// dW's partial products: δᵀ (N,M) · X (M,K) over inner (M, the batch) slice blockIdx.z.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_weight_splitk(const real_t* __restrict__ delta, const real_t* __restrict__ x,
                             real_t* __restrict__ partial, int M, int N, int K, int chunk,
                             int vec_delta, int vec_x) {
    const int begin = blockIdx.z * chunk;
    const int length = min(chunk, M - begin);
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_OUTER, LAYOUT_OUTER, TiledShape>(delta + (long long)begin * N, N,
                                                          vec_delta, x + (long long)begin * K, K,
                                                          vec_x, N, K, length, acc);
    gemm_store(partial + (long long)blockIdx.z * N * K, N, K, acc);
}

// out[r, c] = f(Σ_{s < splits} partial[s][r, c] + b[c]) (Z the sum when write_z), the slices
// added in order.  A grid-stride loop over the rows × cols outputs; without bias and with the
// identity (act_code 0) it is the plain sum the backward GEMMs need.
extern "C" __global__ void gemm_splitk_reduce(const real_t* __restrict__ partial, int splits,
                                              int rows, int cols,
                                              const real_t* __restrict__ bias,
                                              real_t* __restrict__ y, real_t* __restrict__ z,
                                              int has_bias, int write_z, int act_code,
                                              real_t alpha) {
    const long long total = (long long)rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        real_t sum = partial[i];
        for (int s = 1; s < splits; ++s) sum += partial[(long long)s * total + i];
        if (has_bias) sum += bias[i % cols];
        if (write_z) z[i] = sum;
        y[i] = act_forward(act_code, sum, alpha);
    }
}

// The split-K backward GEMMs with δ = ∂L/∂y ⊙ f'(saved) formed on load (as the *_act kernels):
// dW's partial products over batch slice blockIdx.z, and with has_bias the slice's bias-gradient
// partial partial_db[z][n] = Σ_{m in slice} δ[m, n] (summed in m order by the blocks of column
// tile 0); gemm_splitk_reduce_backward adds the slices in order.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_weight_act_splitk(const real_t* __restrict__ dout, const real_t* __restrict__ saved,
                                 const real_t* __restrict__ x, real_t* __restrict__ partial,
                                 real_t* __restrict__ partial_db, int M, int N, int K,
                                 int act_code, real_t alpha, int has_bias, int chunk,
                                 int vec_delta, int vec_x) {
    const int begin = blockIdx.z * chunk;
    const int length = min(chunk, M - begin);
    const long long shift = (long long)begin * N;
    real_t acc[MICRO_M][MICRO_N];
    real_t sums[MICRO_M];
#pragma unroll
    for (int i = 0; i < MICRO_M; ++i) sums[i] = (real_t)0;
    const bool want_sums = has_bias && blockIdx.y == 0;
    gemm_mainloop<LAYOUT_OUTER, LAYOUT_OUTER, TiledShape, true, true>(
        dout + shift, N, vec_delta, x + (long long)begin * K, K, vec_x, N, K, length, acc,
        GemmAct{saved + shift, act_code, alpha}, sums, want_sums);
    gemm_store(partial + (long long)blockIdx.z * N * K, N, K, acc);
    if (want_sums && TiledShape::col_base() == 0) {
#pragma unroll
        for (int i = 0; i < MICRO_M; ++i) {
            const int r = gemm_row(i);
            if (r < N) partial_db[(long long)blockIdx.z * N + r] = sums[i];
        }
    }
}

// dX's partial products with δ formed on load, over inner (N) slice blockIdx.z.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_data_act_splitk(const real_t* __restrict__ dout, const real_t* __restrict__ saved,
                               const real_t* __restrict__ w, real_t* __restrict__ partial, int M,
                               int N, int K, int act_code, real_t alpha, int chunk,
                               int vec_delta, int vec_w) {
    const int begin = blockIdx.z * chunk;
    const int length = min(chunk, N - begin);
    real_t acc[MICRO_M][MICRO_N];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_OUTER, TiledShape, true>(
        dout + begin, N, vec_delta, w + (long long)begin * K, K, vec_w, M, K, length, acc,
        GemmAct{saved + begin, act_code, alpha});
    gemm_store(partial + (long long)blockIdx.z * M * K, M, K, acc);
}

// The reduction of a split-K dense backward, one launch for all its outputs: segment q of three
// (dW, db, dX; count_q = 0 for one not split) is out_q[i] = Σ_{s < splits_q} partial_q[s][i],
// the slices added in order.  A grid-stride loop over the segments' elements one after another.
extern "C" __global__ void gemm_splitk_reduce_backward(
    const real_t* __restrict__ partial0, int splits0, long long count0, real_t* __restrict__ out0,
    const real_t* __restrict__ partial1, int splits1, long long count1, real_t* __restrict__ out1,
    const real_t* __restrict__ partial2, int splits2, long long count2,
    real_t* __restrict__ out2) {
    const long long total = count0 + count1 + count2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const real_t* partial = partial0;
        real_t* out = out0;
        int splits = splits0;
        long long count = count0, at = i;
        if (at >= count0) {
            at -= count0;
            partial = partial1, out = out1, splits = splits1, count = count1;
            if (at >= count1) {
                at -= count1;
                partial = partial2, out = out2, splits = splits2, count = count2;
            }
        }
        real_t sum = partial[at];
        for (int s = 1; s < splits; ++s) sum += partial[(long long)s * count + at];
        out[at] = sum;
    }
}

#endif  // GEMM_TILED

#if GEMM_WARPTILED
// ---- warp-tiled version ------------------------------------------------------------------------
//
// Block tile WT_BM × WT_BN, one warp per WT_WM × WT_WN warp tile.  A warp tile is WT_WMITER ×
// WT_WNITER sub-tiles of WT_WSUBM × WT_WSUBN; in each, the 32 lanes form a WT_LANES_M ×
// WT_LANES_N grid and lane (lm, ln) owns a WT_TM × WT_TN register tile made of 4 × 4 pieces
// strided by 4·WT_LANES_M rows (4·WT_LANES_N columns):
//   row(i) = warp_m·WT_WM + (i / WT_TM)·WT_WSUBM + ((i % WT_TM) / 4)·4·WT_LANES_M + lm·4 + i % 4
// (columns likewise with j, WT_TN, ln).  Each 16-byte shared-memory read of a warp then covers
// WT_LANES_M (WT_LANES_N) consecutive 16-byte words: no bank conflict, and the lanes that share
// a row (column) get it by broadcast.  The slices are staged as in the tiled version
// (gemm_fetch / gemm_stash, double-buffered, register prefetch, one barrier per slice).

#ifndef WT_BM
#define WT_BM 128
#endif
#ifndef WT_BN
#define WT_BN 128
#endif
#ifndef WT_BK
#define WT_BK 16
#endif
#ifndef WT_WM
#define WT_WM 64
#endif
#ifndef WT_WN
#define WT_WN 64
#endif
#ifndef WT_WNITER
#define WT_WNITER 4
#endif
#ifndef WT_TM
#define WT_TM 8
#endif
#ifndef WT_TN
#define WT_TN 4
#endif

// Launch with blockDim.x == WT_THREADS (the launcher derives it the same way).
#define WT_WARPS_N (WT_BN / WT_WN)
#define WT_THREADS ((WT_BM / WT_WM) * WT_WARPS_N * 32)
#define WT_WMITER ((WT_WM * WT_WN) / (32 * WT_TM * WT_TN * WT_WNITER))
#define WT_WSUBM (WT_WM / WT_WMITER)
#define WT_WSUBN (WT_WN / WT_WNITER)
#define WT_LANES_M (WT_WSUBM / WT_TM)
#define WT_LANES_N (WT_WSUBN / WT_TN)

static_assert(WT_BK % 4 == 0 && WT_TM % 4 == 0 && WT_TN % 4 == 0,
              "WT_BK, WT_TM and WT_TN must be multiples of 4");
static_assert(WT_BM % WT_WM == 0 && WT_BN % WT_WN == 0, "the warp tile must divide the block tile");
static_assert(WT_THREADS <= 1024, "at most 1024 threads (32 warps) per block");
static_assert((WT_WM * WT_WN) % (32 * WT_TM * WT_TN * WT_WNITER) == 0 && WT_WMITER >= 1,
              "a warp tile must hold a whole number of 32·WT_TM·WT_TN·WT_WNITER sub-tile rows");
static_assert(WT_WM % WT_WMITER == 0 && WT_WN % WT_WNITER == 0,
              "WT_WMITER and WT_WNITER must divide the warp tile");
static_assert(WT_WSUBM % WT_TM == 0 && WT_WSUBN % WT_TN == 0 && WT_LANES_M * WT_LANES_N == 32,
              "the 32 lanes must tile a WT_WSUBM × WT_WSUBN sub-tile with WT_TM × WT_TN tiles");

static_assert(2 * WT_BK * (gemm_smem_stride(WT_BM) + gemm_smem_stride(WT_BN)) * sizeof(real_t)
                  <= 48 * 1024,
              "at most 48 KiB of static shared memory (double-buffered slices)");

#define WT_ROWS (WT_WMITER * WT_TM)  // outputs per thread along M
#define WT_COLS (WT_WNITER * WT_TN)  // outputs per thread along N

// Block-relative row of the thread's i-th accumulator row (see the section comment): a part
// fixed by the thread, plus a compile-time offset once i is unrolled.
__device__ __forceinline__ int wt_row_offset(int i) {
    return (i / WT_TM) * WT_WSUBM + ((i % WT_TM) / 4) * (4 * WT_LANES_M) + i % 4;
}

__device__ __forceinline__ int wt_row_in_block(int i) {
    const int warp_m = (threadIdx.x / 32) / WT_WARPS_N, lane_m = (threadIdx.x % 32) / WT_LANES_N;
    return warp_m * WT_WM + lane_m * 4 + wt_row_offset(i);
}

__device__ __forceinline__ int wt_col_offset(int j) {
    return (j / WT_TN) * WT_WSUBN + ((j % WT_TN) / 4) * (4 * WT_LANES_N) + j % 4;
}

__device__ __forceinline__ int wt_col_in_block(int j) {
    const int warp_n = (threadIdx.x / 32) % WT_WARPS_N, lane_n = (threadIdx.x % 32) % WT_LANES_N;
    return warp_n * WT_WN + lane_n * 4 + wt_col_offset(j);
}

// The warp-tiled version's place in gemm_mainloop: acc[i][j] = Σ_p A(r0 + wt_row_in_block(i), p)
// B(c0 + wt_col_in_block(j), p).
struct WarpTiledShape {
    static constexpr int BM = WT_BM, BN = WT_BN, BK = WT_BK, THREADS = WT_THREADS;
    static constexpr int ROWS = WT_ROWS, COLS = WT_COLS;
    static constexpr bool ACT_OUT_OF_LINE = true;
    __device__ static int row_base() { return wt_row_in_block(0); }
    __device__ static int col_base() { return wt_col_in_block(0); }
    __device__ static int row_offset(int i) { return wt_row_offset(i); }
    __device__ static int col_offset(int j) { return wt_col_offset(j); }
};

// act_forward kept out of line: inlined into every one of a thread's WT_ROWS·WT_COLS outputs it
// quadruples the warp-tiled kernels' compile time, for an epilogue that is a small part of the
// run time.
__device__ __noinline__ real_t wt_act_forward(int code, real_t z, real_t alpha) {
    return act_forward(code, z, alpha);
}

// Four consecutive outputs dst[0..3], of which the first `valid` exist; one 16-byte store where
// `vec` (dst 16-byte aligned), scalar stores elsewhere.
__device__ __forceinline__ void gb_store4(real_t* __restrict__ dst, int valid, int vec,
                                          const real_t v[4]) {
    if (vec && valid >= 4) {
        if (sizeof(real_t) == 4) {
            *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            reinterpret_cast<double2*>(dst)[0] = make_double2(v[0], v[1]);
            reinterpret_cast<double2*>(dst)[1] = make_double2(v[2], v[3]);
        }
    } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
            if (q < valid) dst[q] = v[q];
    }
}

// 16-byte stores into a row-major (rows, cols) output are aligned when its base is and every
// row starts on a multiple of 4 elements (column groups start on multiples of 4 by construction).
__device__ __forceinline__ int wt_vec_out(const real_t* c, int cols) {
    return cols % 4 == 0 && (reinterpret_cast<unsigned long long>(c) & 15) == 0;
}

__device__ __forceinline__ void wt_store(real_t* __restrict__ c, int rows, int cols,
                                         real_t acc[WT_ROWS][WT_COLS]) {
    const int vec = wt_vec_out(c, cols);
    const int r0 = blockIdx.x * WT_BM, c0 = blockIdx.y * WT_BN;
#pragma unroll
    for (int i = 0; i < WT_ROWS; ++i) {
        const int r = r0 + wt_row_in_block(i);
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < WT_COLS; j += 4) {
            const int col = c0 + wt_col_in_block(j);
            gb_store4(c + (long long)r * cols + col, cols - col, vec, &acc[i][j]);
        }
    }
}

// As dense_forward, warp-tiled.  grid (⌈M/WT_BM⌉, ⌈N/WT_BN⌉), block WT_THREADS.
extern "C" __global__ void __launch_bounds__(WT_THREADS)
dense_forward_warptiled(const real_t* __restrict__ x, const real_t* __restrict__ w,
                        const real_t* __restrict__ bias, real_t* __restrict__ y,
                        real_t* __restrict__ z, int M, int N, int K, int has_bias, int write_z,
                        int act_code, real_t alpha, int vec_x, int vec_w) {
    real_t acc[WT_ROWS][WT_COLS];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_INNER, WarpTiledShape>(x, K, vec_x, w, K, vec_w, M, N, K, acc);
    const int vec = wt_vec_out(y, N) && (!write_z || wt_vec_out(z, N));
    const int r0 = blockIdx.x * WT_BM, c0 = blockIdx.y * WT_BN;
#pragma unroll
    for (int j = 0; j < WT_COLS; j += 4) {
        const int col = c0 + wt_col_in_block(j);
        real_t b[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) b[q] = (has_bias && col + q < N) ? bias[col + q] : (real_t)0;
#pragma unroll
        for (int i = 0; i < WT_ROWS; ++i) {
            const int r = r0 + wt_row_in_block(i);
            if (r >= M) continue;
            real_t pre[4], out[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                pre[q] = acc[i][j + q] + b[q];
                out[q] = wt_act_forward(act_code, pre[q], alpha);
            }
            const long long at = (long long)r * N + col;
            if (write_z) gb_store4(z + at, N - col, vec, pre);
            gb_store4(y + at, N - col, vec, out);
        }
    }
}

// As dense_backward_data, warp-tiled.  grid (⌈M/WT_BM⌉, ⌈K/WT_BN⌉).
extern "C" __global__ void __launch_bounds__(WT_THREADS)
dense_backward_data_warptiled(const real_t* __restrict__ delta, const real_t* __restrict__ w,
                              real_t* __restrict__ dx, int M, int N, int K, int vec_delta,
                              int vec_w) {
    real_t acc[WT_ROWS][WT_COLS];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_OUTER, WarpTiledShape>(delta, N, vec_delta, w, K, vec_w, M, K, N, acc);
    wt_store(dx, M, K, acc);
}

// As dense_backward_weight, warp-tiled.  grid (⌈N/WT_BM⌉, ⌈K/WT_BN⌉).  M = 0 gives zeros.
extern "C" __global__ void __launch_bounds__(WT_THREADS)
dense_backward_weight_warptiled(const real_t* __restrict__ delta, const real_t* __restrict__ x,
                                real_t* __restrict__ dw, int M, int N, int K, int vec_delta,
                                int vec_x) {
    real_t acc[WT_ROWS][WT_COLS];
    gemm_mainloop<LAYOUT_OUTER, LAYOUT_OUTER, WarpTiledShape>(delta, N, vec_delta, x, K, vec_x, N, K, M, acc);
    wt_store(dw, N, K, acc);
}

// As dense_backward_weight_act, warp-tiled: dW = δᵀ X and, with has_bias, db = Σ_m δ, δ formed
// on load; the bias sums come from the blocks of column tile 0, each row's from the thread of
// warp column 0, lane column 0 (it sees every inner index of its rows, in order).
extern "C" __global__ void __launch_bounds__(WT_THREADS)
dense_backward_weight_act_warptiled(const real_t* __restrict__ dout,
                                    const real_t* __restrict__ saved, const real_t* __restrict__ x,
                                    real_t* __restrict__ dw, real_t* __restrict__ db, int M, int N,
                                    int K, int act_code, real_t alpha, int has_bias,
                                    int vec_delta, int vec_x) {
    real_t acc[WT_ROWS][WT_COLS];
    real_t sums[WT_ROWS];
#pragma unroll
    for (int i = 0; i < WT_ROWS; ++i) sums[i] = (real_t)0;
    const bool want_sums = has_bias && blockIdx.y == 0;
    gemm_mainloop<LAYOUT_OUTER, LAYOUT_OUTER, WarpTiledShape, true, true>(
        dout, N, vec_delta, x, K, vec_x, N, K, M, acc, GemmAct{saved, act_code, alpha}, sums,
        want_sums);
    wt_store(dw, N, K, acc);
    if (want_sums && wt_col_in_block(0) == 0) {
#pragma unroll
        for (int i = 0; i < WT_ROWS; ++i) {
            const int r = blockIdx.x * WT_BM + wt_row_in_block(i);
            if (r < N) db[r] = sums[i];
        }
    }
}

// As dense_backward_data_act, warp-tiled.
extern "C" __global__ void __launch_bounds__(WT_THREADS)
dense_backward_data_act_warptiled(const real_t* __restrict__ dout,
                                  const real_t* __restrict__ saved, const real_t* __restrict__ w,
                                  real_t* __restrict__ dx, int M, int N, int K, int act_code,
                                  real_t alpha, int vec_delta, int vec_w) {
    real_t acc[WT_ROWS][WT_COLS];
    gemm_mainloop<LAYOUT_INNER, LAYOUT_OUTER, WarpTiledShape, true>(
        dout, N, vec_delta, w, K, vec_w, M, K, N, acc, GemmAct{saved, act_code, alpha});
    wt_store(dx, M, K, acc);
}

#endif  // GEMM_WARPTILED

#if GEMM_NAIVE
// ---- naive reference versions: any 2-D block (16×16 from the launcher); x: column, y: row ----

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

#endif  // GEMM_NAIVE
