// reduce.cu: deterministic reductions (fixed order, no atomics; the same launch configuration,
// chosen from the sizes alone, gives the same bits on every run).
//
//   sum_squares_partial  partials[b] = Σ x² over block b's grid-stride share   (pass 1 of Σx²)
//   sum_partial          partials[b] = Σ x  over block b's grid-stride share   (pass 1 of Σx)
//   sum_finalize         out[0] = scale · Σ partials, one block               (pass 2 of both)
//   column_sum           out[c, j] = Σ_{rows of chunk c} x[r, j]              (db = Σ_rows δ)
//
// Versions: one each; the library uses all of them.  Sums accumulate in double whatever real_t
// is.  Block reductions use the shuffle tree of block_reduce.cuh (blockDim.x a multiple of 32).
#include "common.cuh"
#include "block_reduce.cuh"

#ifndef REDUCE_THREADS
#define REDUCE_THREADS 256
#endif
#ifndef COLUMN_SUM_COLS
#define COLUMN_SUM_COLS 32
#endif
#ifndef COLUMN_SUM_ROWS
#define COLUMN_SUM_ROWS 8
#endif

// Block b's share of Σ x[i] (or Σ x[i]² with SQUARE) into partials[b].
template <bool SQUARE>
__device__ __forceinline__ void gb_partial_sum(const real_t* __restrict__ x, long long n,
                                               real_t* __restrict__ partials) {
    __shared__ double scratch[32];
    const double total = gb_grid_stride_sum(n, scratch, [&](long long i) {
        const double v = (double)x[i];
        return SQUARE ? v * v : v;
    });
    if (threadIdx.x == 0) partials[blockIdx.x] = (real_t)total;
}

// grid (B), block (REDUCE_THREADS); partials has B elements.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
sum_squares_partial(const real_t* __restrict__ x, long long n, real_t* __restrict__ partials) {
    gb_partial_sum<true>(x, n, partials);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
sum_partial(const real_t* __restrict__ x, long long n, real_t* __restrict__ partials) {
    gb_partial_sum<false>(x, n, partials);
}

// grid (1), block (REDUCE_THREADS): out[0] = scale · Σ partials[0..count).
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
sum_finalize(const real_t* __restrict__ partials, int count, double scale,
             real_t* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += (double)partials[i];
    acc = gb_block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = (real_t)(acc * scale);
}

// x (rows, cols) → out (gridDim.y, cols): chunk c = blockIdx.y sums rows
// [c·rows_per_chunk, (c+1)·rows_per_chunk).  grid (⌈cols/COLUMN_SUM_COLS⌉, chunks),
// block (COLUMN_SUM_COLS, COLUMN_SUM_ROWS).  rows = 0 writes zeros.
extern "C" __global__ void __launch_bounds__(COLUMN_SUM_COLS * COLUMN_SUM_ROWS)
column_sum(const real_t* __restrict__ x, int rows, int cols, int rows_per_chunk,
           real_t* __restrict__ out) {
    __shared__ double partial[COLUMN_SUM_ROWS][COLUMN_SUM_COLS];
    const int col = blockIdx.x * COLUMN_SUM_COLS + threadIdx.x;
    const long long first = (long long)blockIdx.y * rows_per_chunk;
    long long last = first + rows_per_chunk;
    if (last > rows) last = rows;
    double acc = 0.0;
    if (col < cols) {
        for (long long r = first + threadIdx.y; r < last; r += COLUMN_SUM_ROWS) {
            acc += (double)x[r * cols + col];
        }
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        double total = 0.0;
        for (int k = 0; k < COLUMN_SUM_ROWS; ++k) total += partial[k][threadIdx.x];
        out[(long long)blockIdx.y * cols + col] = (real_t)total;
    }
}
