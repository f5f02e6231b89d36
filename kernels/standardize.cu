// standardize.cu: the input standardisation layer (gb.Standardize), per feature (column) j:
//
//   standardize_forward   y[r, j] = (x[r, j] − mean[j]) / std[j]
//   standardize_backward  dinp[r, j] = dout[r, j] / std[j]          (∂L/∂x = ∂L/∂y / σ)
//
// Versions: one each.  Subtract, then divide (no reciprocal, no fused multiply-add), so the
// result is the correctly rounded value NumPy's (x − mean) / std gives, bit for bit.
// grid (⌈cols/STANDARDIZE_COLS⌉, row blocks), block (STANDARDIZE_COLS, STANDARDIZE_ROWS):
// a thread keeps its column's mean and std in registers and walks the rows with a stride of
// gridDim.y · STANDARDIZE_ROWS; a warp reads 32 consecutive columns of a row (coalesced).
#include "common.cuh"

#ifndef STANDARDIZE_COLS
#define STANDARDIZE_COLS 32
#endif
#ifndef STANDARDIZE_ROWS
#define STANDARDIZE_ROWS 8
#endif

extern "C" __global__ void __launch_bounds__(STANDARDIZE_COLS * STANDARDIZE_ROWS)
standardize_forward(const real_t* __restrict__ x, const real_t* __restrict__ mean,
                    const real_t* __restrict__ std, int rows, int cols,
                    real_t* __restrict__ y) {
    const int col = blockIdx.x * STANDARDIZE_COLS + threadIdx.x;
    if (col >= cols) return;
    const real_t m = mean[col];
    const real_t s = std[col];
    const long long stride = (long long)gridDim.y * STANDARDIZE_ROWS;
    for (long long r = (long long)blockIdx.y * STANDARDIZE_ROWS + threadIdx.y; r < rows;
         r += stride) {
        y[r * cols + col] = (x[r * cols + col] - m) / s;
    }
}

extern "C" __global__ void __launch_bounds__(STANDARDIZE_COLS * STANDARDIZE_ROWS)
standardize_backward(const real_t* __restrict__ dout, const real_t* __restrict__ std, int rows,
                     int cols, real_t* __restrict__ dinp) {
    const int col = blockIdx.x * STANDARDIZE_COLS + threadIdx.x;
    if (col >= cols) return;
    const real_t s = std[col];
    const long long stride = (long long)gridDim.y * STANDARDIZE_ROWS;
    for (long long r = (long long)blockIdx.y * STANDARDIZE_ROWS + threadIdx.y; r < rows;
         r += stride) {
        dinp[r * cols + col] = dout[r * cols + col] / s;
    }
}
