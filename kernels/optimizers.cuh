// optimizers.cuh: the optimizer updates and gradient scaling, one elementwise device function
// per kernel (see elementwise.cuh for how a GB_ELEMENTWISE signature becomes a kernel).
// No kernels here.
//
// Hyper-parameters arrive as double and are rounded to real_t where they meet an element, as
// torch.optim does for a float32 tensor; bias corrections are computed in double on the host.
#ifndef GB_OPTIMIZERS_CUH
#define GB_OPTIMIZERS_CUH

#include "common.cuh"

#ifndef GB_ELEMENTWISE
#define GB_ELEMENTWISE __device__ __forceinline__ void
#endif

// x *= factor (gradient clipping); factor is rounded to real_t first, as NumPy's x *= T(factor).
GB_ELEMENTWISE gb_scale_element(const double factor, real_t& x) { x = x * (real_t)factor; }

// torch.optim.SGD without momentum: g = ∇ + λθ; θ −= η g.
GB_ELEMENTWISE gb_sgd_plain_element(const real_t grad, const double lr, const double weight_decay,
                                    real_t& param) {
    real_t g = grad;
    if (weight_decay != 0.0) g = grad + (real_t)weight_decay * param;
    param = param - (real_t)lr * g;
}

// torch.optim.SGD with momentum μ, dampening τ: b = g (first step) or μb + (1 − τ)g;
// g = g + μb (Nesterov) or b; θ −= η g.
GB_ELEMENTWISE gb_sgd_momentum_element(const real_t grad, const double lr, const double momentum,
                                       const double dampening, const int nesterov,
                                       const double weight_decay, const int first_step,
                                       real_t& param, real_t& momentum_buf) {
    real_t g = grad;
    if (weight_decay != 0.0) g = grad + (real_t)weight_decay * param;
    const real_t b =
        first_step ? g : (real_t)momentum * momentum_buf + (real_t)(1.0 - dampening) * g;
    momentum_buf = b;
    if (nesterov)
        g = g + (real_t)momentum * b;
    else
        g = b;
    param = param - (real_t)lr * g;
}

// torch.optim.Adam / AdamW (decoupled): θ ← θ(1 − ηλ) or g = ∇ + λθ;
// m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
// θ ← θ − (η / bc₁) · m / (√v / √bc₂ + ε), bc = 1 − βᵗ (passed precomputed in double).
GB_ELEMENTWISE gb_adam_element(const real_t grad, const double lr, const double beta1,
                               const double beta2, const double eps, const double weight_decay,
                               const int decoupled, const double bias_correction1,
                               const double bias_correction2_sqrt, real_t& param,
                               real_t& exp_avg, real_t& exp_avg_sq) {
    real_t p = param;
    real_t g = grad;
    if (weight_decay != 0.0) {
        if (decoupled)
            p = p * (real_t)(1.0 - lr * weight_decay);
        else
            g = g + (real_t)weight_decay * p;
    }
    const real_t m = exp_avg * (real_t)beta1 + (real_t)(1.0 - beta1) * g;
    const real_t v = exp_avg_sq * (real_t)beta2 + (real_t)(1.0 - beta2) * g * g;
    exp_avg = m;
    exp_avg_sq = v;
    const real_t denom = sqrt(v) / (real_t)bias_correction2_sqrt + (real_t)eps;
    param = p - (real_t)(lr / bias_correction1) * m / denom;
}

#endif  // GB_OPTIMIZERS_CUH
