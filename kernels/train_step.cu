// train_step.cu: what a training step keeps on the device, so that no kernel argument changes
// from one step to the next (a CUDA graph freezes the arguments its kernels were captured with)
// and nothing has to be read back to the host inside a step.
//
//   clip_coefficient      ‖g‖ = √(Σ partials), c = max_norm / (‖g‖ + 1e−6)           (one block)
//   clip_scale            g ← g · c where c < 1 (torch.nn.utils.clip_grad_norm_)    (grid-stride)
//   sgd_update, adam_update  torch.optim.SGD / Adam / AdamW over a flat buffer: the whole
//                         optimizer step in one launch.  Each thread takes t = (steps taken) + 1
//                         and lr from the step scalars, each block computes the bias
//                         corrections 1 − β₁ᵗ and √(1 − β₂ᵗ) itself; the last block to finish
//                         stores t and them back (the "last block" ticket below), so the next
//                         launch sees the step counted.  Optionally g ← g · c first (c from
//                         clip_coefficient, as clip_scale does, so clipping costs no launch of
//                         its own) and a bf16 copy of the new θ (the operands of the bf16
//                         GEMMs, written here instead of once per GEMM)           (grid-stride)
//
// The step scalars are a double[STEP_SCALARS] array per optimizer (gpubackprop/optim.py):
//   [STEP_T] steps taken, [STEP_LR] learning rate (the host writes it when a schedule changes
//   it, between steps), [STEP_BIAS1] 1 − β₁ᵗ, [STEP_BIAS2_SQRT] √(1 − β₂ᵗ) of the last step,
//   [STEP_BLOCKS_DONE] the blocks of the running update launch that have finished (0 between
//   launches; a counter in the buffer the launch already has, so the arguments stay the same).
// Versions: one each; the library uses all of them.
#include "common.cuh"
#include "block_reduce.cuh"

#define STEP_T 0
#define STEP_LR 1
#define STEP_BIAS1 2
#define STEP_BIAS2_SQRT 3
#define STEP_BLOCKS_DONE 4

#ifndef REDUCE_THREADS
#define REDUCE_THREADS 256
#endif

// grid (1), block (REDUCE_THREADS).  partials: the per-block Σ g² of reduce.cu's
// sum_squares_partial over every gradient segment.  Writes the total norm (norm[0], the dtype
// of the gradients, as torch returns it) and the clip coefficient c (coefficient[0], double).
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
clip_coefficient(const real_t* __restrict__ partials, int count, double max_norm,
                 real_t* __restrict__ norm, double* __restrict__ coefficient) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += (double)partials[i];
    acc = gb_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        const double total = sqrt(acc);
        norm[0] = (real_t)total;
        coefficient[0] = max_norm / (total + 1e-6);
    }
}

// g ← g · (real_t)c when c < 1, else g unchanged (the clip only shrinks).
extern "C" __global__ void clip_scale(real_t* __restrict__ grad, long long n,
                                     const double* __restrict__ coefficient) {
    const double c = coefficient[0];
    if (!(c < 1.0)) return;
    const real_t factor = (real_t)c;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        grad[i] = grad[i] * factor;
    }
}

// The optimizer updates with their step-dependent scalars read from device memory; the update
// of one element is optimizers.cuh's device function, as in the elementwise kernels.
#include "optimizers.cuh"
// gb_cvt_bf16x2: the rounding of gemm_mma.cu's to_bf16, for the bf16 copy of θ.
#include "ptx_twins.cuh"

__device__ __forceinline__ float gb_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double gb_mul_rn(double a, double b) { return __dmul_rn(a, b); }

// The gradient an update uses: g · factor when clipping is on (written back, so that the
// gradient after the step is the clipped one, as after clip_scale), else g.  __fmul_rn /
// __dmul_rn: the product is rounded on its own, never contracted into an FMA with what the
// update does next, so g is bitwise clip_scale's.
__device__ __forceinline__ real_t gb_clipped_grad(real_t* grad, long long i, int clip,
                                                  real_t factor) {
    real_t g = grad[i];
    if (clip) {
        g = gb_mul_rn(g, factor);
        grad[i] = g;
    }
    return g;
}

// The clip factor (real_t)c and whether to apply it: clip_scale's rule (only when c < 1).
__device__ __forceinline__ int gb_clip_active(const double* clip, int use_clip, real_t* factor) {
    if (!use_clip) return 0;
    const double c = clip[0];
    *factor = (real_t)c;
    return c < 1.0;
}

// θ's bf16 bits (round to nearest even, as to_bf16), for the bf16 GEMMs' weight operand.
__device__ __forceinline__ void gb_store_bf16(void* out, long long i, real_t value) {
    ((gb_bf16*)out)[i] = (gb_bf16)(gb_cvt_bf16x2((float)value, 0.0f) & 0xffffu);
}

// The step this launch takes: t = scalars[STEP_T] + 1 (exact: t is a small integer).
__device__ __forceinline__ double gb_step_number(const double* scalars) {
    return scalars[STEP_T] + 1.0;
}

// The bias corrections of step t, 1 − β₁ᵗ and √(1 − β₂ᵗ), in double as torch.optim.Adam
// computes them: by thread 0 of each block, shared with the others through ``shared`` (two
// double pows per thread would cost a GPU of slow double arithmetic more than the update's own
// memory traffic).  Every thread calls it (it holds a barrier).
__device__ __forceinline__ void gb_bias_corrections(double beta1, double beta2, double t,
                                                    double* shared, double* bias1,
                                                    double* bias2_sqrt) {
    if (threadIdx.x == 0) {
        shared[0] = 1.0 - pow(beta1, t);
        shared[1] = sqrt(1.0 - pow(beta2, t));
    }
    __syncthreads();
    *bias1 = shared[0];
    *bias2_sqrt = shared[1];
}

// Counts the step: the last block of the launch to finish stores t and the bias corrections
// into the step scalars.  Called by every thread after its elements, with advance (a launch
// argument) the same for the whole grid.  The ticket pattern: each block, once all its threads
// have read the scalars (the barrier), takes a ticket from the counter in scalars
// [STEP_BLOCKS_DONE]; the block that draws gridDim.x − 1 is the last, so every other block has
// read t before it is overwritten, and it resets the counter for the next launch.  The fence
// before the ticket orders this block's reads before it; the one after the last ticket orders
// the stores after every other block's ticket.  A double counter (atomicAdd on double: sm_60+)
// counts exactly to 2^53 blocks.
__device__ __forceinline__ void gb_finish_step(double* scalars, int advance, double t,
                                               double bias1, double bias2_sqrt) {
    if (!advance) return;
    __syncthreads();
    if (threadIdx.x != 0) return;
    __threadfence();
    const double ticket = atomicAdd(&scalars[STEP_BLOCKS_DONE], 1.0);
    if (ticket != (double)(gridDim.x - 1)) return;
    __threadfence();
    scalars[STEP_T] = t;
    scalars[STEP_BIAS1] = bias1;
    scalars[STEP_BIAS2_SQRT] = bias2_sqrt;
    scalars[STEP_BLOCKS_DONE] = 0.0;
}

// torch.optim.SGD over n elements; lr = scalars[STEP_LR], first step when t = 1; advance: count
// the step in scalars (bias corrections 1: SGD has none, 1 − 0ᵗ), which the last of several
// launches of one step does (optim.py updates parameters outside a flat buffer one by one).
// momentum_buf is unused (may alias param) when use_momentum is 0.  clip: the clip coefficient
// (clip_coefficient's, may alias scalars when use_clip is 0).  param_bf16: gb_bf16[n] receiving
// bf16(θ) when write_bf16 is 1 (void* so that param may stand in for it when 0).
// grid: any (the loop strides over it), block: 1-D.  n may be 0: the step is still counted.
extern "C" __global__ void sgd_update(real_t* __restrict__ param, real_t* __restrict__ grad,
                                      real_t* momentum_buf, void* param_bf16, long long n,
                                      double* scalars, const double* clip, double momentum,
                                      double dampening, int nesterov, double weight_decay,
                                      int use_momentum, int use_clip, int write_bf16,
                                      int advance) {
    const double t = gb_step_number(scalars);
    const double lr = scalars[STEP_LR];
    const int first_step = t == 1.0;
    real_t factor = (real_t)1;
    const int clip_on = gb_clip_active(clip, use_clip, &factor);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const real_t g = gb_clipped_grad(grad, i, clip_on, factor);
        if (use_momentum) {
            gb_sgd_momentum_element(g, lr, momentum, dampening, nesterov, weight_decay,
                                    first_step, param[i], momentum_buf[i]);
        } else {
            gb_sgd_plain_element(g, lr, weight_decay, param[i]);
        }
        if (write_bf16) gb_store_bf16(param_bf16, i, param[i]);
    }
    gb_finish_step(scalars, advance, t, 1.0, 1.0);
}

// torch.optim.Adam / AdamW over n elements; lr from scalars, the bias corrections of step t
// computed once per block; clip, param_bf16, advance and the launch as in sgd_update.
extern "C" __global__ void adam_update(real_t* __restrict__ param, real_t* __restrict__ grad,
                                       real_t* __restrict__ exp_avg,
                                       real_t* __restrict__ exp_avg_sq, void* param_bf16,
                                       long long n, double* scalars, const double* clip,
                                       double beta1, double beta2, double eps,
                                       double weight_decay, int decoupled, int use_clip,
                                       int write_bf16, int advance) {
    __shared__ double corrections[2];
    const double t = gb_step_number(scalars);
    const double lr = scalars[STEP_LR];
    double bias1, bias2_sqrt;
    gb_bias_corrections(beta1, beta2, t, corrections, &bias1, &bias2_sqrt);
    real_t factor = (real_t)1;
    const int clip_on = gb_clip_active(clip, use_clip, &factor);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const real_t g = gb_clipped_grad(grad, i, clip_on, factor);
        gb_adam_element(g, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2_sqrt,
                        param[i], exp_avg[i], exp_avg_sq[i]);
        if (write_bf16) gb_store_bf16(param_bf16, i, param[i]);
    }
    gb_finish_step(scalars, advance, t, bias1, bias2_sqrt);
}
