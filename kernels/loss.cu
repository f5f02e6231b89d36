// loss.cu: each loss's value and gradient in one pass (formulas as in numpy_backend.py).
//
//   softmax_xent_labels_forward_backward  one block per row, integer labels (int64)
//   softmax_xent_probs_forward_backward   one block per row, target probabilities (N, C)
//       row_loss[i] = lse(z_i)·Σ_j p_ij − Σ_j p_ij z_ij,   grad = (softmax(z)·Σp − p)/N,
//       lse = m + log Σ e^(z−m), m = max z (no overflow); a label outside [0, C) gives NaN.
//   mse_forward_backward            grad = grad_scale·(ŷ − y),  partials of Σ (ŷ − y)²
//   bce_with_logits_forward_backward grad = scale·(σ(z) − y), partials of
//                                    Σ max(z,0) − z y + log1p(e^(−|z|))
//   bce_forward_backward            grad = scale·(p − y)/max(p(1 − p), 1e−12), partials of
//                                    Σ −(y max(log p, −100) + (1 − y) max(log(1 − p), −100))
//
// The elementwise losses write one partial sum per block (grid-stride, deterministic); the
// launcher finishes with reduce.cu's sum_finalize (scale = 1/n for "mean", 1 for "sum"), and the
// softmax rows with sum_partial + sum_finalize (scale 1/N).  Versions: one each, all used.
#include "common.cuh"
#include "activations.cuh"
#include "block_reduce.cuh"

#ifndef LOSS_THREADS
#define LOSS_THREADS 256
#endif

// Shared by both softmax kernels.  labels or probs is used (the other is never read).
// blockDim.x a multiple of 32; grid (N).  The scratch arrays (32 each) are the kernel's
// __shared__ memory.
__device__ __forceinline__ void softmax_xent_row(const real_t* __restrict__ logits,
                                                 const long long* __restrict__ labels,
                                                 const real_t* __restrict__ probs, int use_labels,
                                                 int N, int C, real_t* __restrict__ grad,
                                                 real_t* __restrict__ row_loss,
                                                 real_t* scratch_max, double* scratch_sum) {
    const long long row = blockIdx.x;
    const real_t* z = logits + row * C;
    const real_t* p = use_labels ? (const real_t*)0 : probs + row * C;
    real_t* g = grad + row * C;

    real_t m = z[0];
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = gb_max_nan(m, z[j]);
    m = gb_block_max(m, scratch_max);

    double sum_e = 0.0, mass = 0.0, dot = 0.0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        sum_e += (double)exp(z[j] - m);
        if (!use_labels) {
            mass += (double)p[j];
            dot += (double)p[j] * (double)z[j];
        }
    }
    sum_e = gb_block_sum(sum_e, scratch_sum);
    long long label = -1;
    if (use_labels) {
        label = labels[row];
        mass = 1.0;
        dot = (label >= 0 && label < C) ? (double)z[label] : nan("");
    } else {
        mass = gb_block_sum(mass, scratch_sum);
        dot = gb_block_sum(dot, scratch_sum);
    }
    const double lse = (double)m + log(sum_e);
    if (threadIdx.x == 0) row_loss[row] = (real_t)(lse * mass - dot);

    const real_t inv_sum = (real_t)(1.0 / sum_e);
    const real_t inv_n = (real_t)(1.0 / (double)N);
    const real_t rmass = (real_t)mass;
    const bool bad_label = use_labels && !(label >= 0 && label < C);
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        const real_t softmax = exp(z[j] - m) * inv_sum;
        real_t target;
        if (use_labels) target = j == label ? (real_t)1 : (real_t)0;
        else target = p[j];
        g[j] = bad_label ? (real_t)nan("") : (softmax * rmass - target) * inv_n;
    }
}

// grid (N), block (power of two ≥ 32).
extern "C" __global__ void softmax_xent_labels_forward_backward(
    const real_t* __restrict__ logits, const long long* __restrict__ labels, int N, int C,
    real_t* __restrict__ grad, real_t* __restrict__ row_loss) {
    __shared__ real_t scratch_max[32];
    __shared__ double scratch_sum[32];
    softmax_xent_row(logits, labels, logits, 1, N, C, grad, row_loss, scratch_max, scratch_sum);
}

extern "C" __global__ void softmax_xent_probs_forward_backward(
    const real_t* __restrict__ logits, const real_t* __restrict__ probs, int N, int C,
    real_t* __restrict__ grad, real_t* __restrict__ row_loss) {
    __shared__ real_t scratch_max[32];
    __shared__ double scratch_sum[32];
    softmax_xent_row(logits, (const long long*)0, probs, 0, N, C, grad, row_loss, scratch_max,
                     scratch_sum);
}

// Elementwise losses: grid (B), block (LOSS_THREADS), partials has B elements.
// `scale` is 1/n for reduction "mean" and 1 for "sum" (MSE's grad_scale is 2·scale); it scales
// the gradient only (the loss is scaled in sum_finalize).

extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
mse_forward_backward(const real_t* __restrict__ pred, const real_t* __restrict__ target,
                     long long n, real_t grad_scale, real_t* __restrict__ grad,
                     real_t* __restrict__ partials) {
    __shared__ double scratch[32];
    const double total = gb_grid_stride_sum(n, scratch, [&](long long i) {
        const real_t diff = pred[i] - target[i];
        grad[i] = grad_scale * diff;
        return (double)diff * (double)diff;
    });
    if (threadIdx.x == 0) partials[blockIdx.x] = (real_t)total;
}

extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
bce_with_logits_forward_backward(const real_t* __restrict__ logits,
                                 const real_t* __restrict__ target, long long n, real_t scale,
                                 real_t* __restrict__ grad, real_t* __restrict__ partials) {
    __shared__ double scratch[32];
    const double total = gb_grid_stride_sum(n, scratch, [&](long long i) {
        const real_t z = logits[i], y = target[i];
        const real_t positive = z < (real_t)0 ? (real_t)0 : z;  // max(z, 0), NaN stays NaN
        const double loss = (double)(positive - z * y + log1p(exp(-fabs(z))));
        grad[i] = (gb_sigmoid(z) - y) * scale;
        return loss;
    });
    if (threadIdx.x == 0) partials[blockIdx.x] = (real_t)total;
}

extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
bce_forward_backward(const real_t* __restrict__ probs, const real_t* __restrict__ target,
                     long long n, real_t scale, real_t* __restrict__ grad,
                     real_t* __restrict__ partials) {
    __shared__ double scratch[32];
    const real_t one = (real_t)1, floor_log = (real_t)-100;
    const double total = gb_grid_stride_sum(n, scratch, [&](long long i) {
        const real_t p = probs[i], y = target[i];
        real_t log_p = log(p), log_1mp = log(one - p);
        // torch clamps log at −100; a NaN stays NaN (as torch.clamp and np.maximum keep it)
        log_p = log_p < floor_log ? floor_log : log_p;
        log_1mp = log_1mp < floor_log ? floor_log : log_1mp;
        const double loss = -(double)(y * log_p + (one - y) * log_1mp);
        real_t denom = p * (one - p);
        denom = denom < (real_t)1e-12 ? (real_t)1e-12 : denom;
        grad[i] = (p - y) / denom * scale;
        return loss;
    });
    if (threadIdx.x == 0) partials[blockIdx.x] = (real_t)total;
}
