// activations.cuh: the activation functions and their derivatives, written once for the GPU.
//
// Serves the GEMM epilogue (gemm.cu: dense_forward) and the elementwise kernels of
// elementwise.cuh (gb_activation_forward, gb_activation_backward).
// The formulas mirror activation_value / activation_derivative in numpy_backend.py.
// No kernels here.
//
// Codes follow base.ACTIVATIONS (base.ACTIVATION_CODES); keep them in sync.
// What act_derivative receives as `saved` follows base.SAVES_OUTPUT: y = f(z) for relu,
// sigmoid and tanh; z for leaky_relu, gelu, gelu_tanh and silu; identity ignores it.
//
// NaN and ±Inf (docs/derivation.md, "NaN and infinity"): forward propagates NaN through every
// activation, so every comparison below is written so that a NaN operand takes the branch that
// returns it (`z < 0 ? 0 : z`, never `z > 0 ? z : 0`).  act_backward follows PyTorch: ReLU and
// LeakyReLU select the gradient (relu: 0 where y <= 0, else dout, so a NaN y passes dout on;
// leaky: dout where z > 0, else α·dout), the smooth activations multiply dout·f'(saved) in IEEE
// arithmetic (∞·0 = NaN).
#ifndef GB_ACTIVATIONS_CUH
#define GB_ACTIVATIONS_CUH

#include "common.cuh"

#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_LEAKY_RELU 2
#define ACT_SIGMOID 3
#define ACT_TANH 4
#define ACT_GELU 5
#define ACT_GELU_TANH 6
#define ACT_SILU 7

#define GB_INV_SQRT_2 0.70710678118654752440
#define GB_INV_SQRT_2PI 0.39894228040143267794
#define GB_SQRT_2_OVER_PI 0.79788456080286535588
#define GB_GELU_TANH_C 0.044715

// σ(z) = 1 / (1 + e^(−z)) through e^(−|z|), so that no exp overflows for large |z|.
__device__ __forceinline__ real_t gb_sigmoid(real_t z) {
    const real_t one = (real_t)1;
    const real_t e = exp(-fabs(z));
    return z >= (real_t)0 ? one / (one + e) : e / (one + e);
}

// y = f(z).
__device__ __forceinline__ real_t act_forward(int code, real_t z, real_t alpha) {
    const real_t half = (real_t)0.5, one = (real_t)1;
    switch (code) {
        case ACT_RELU:  // NaN stays NaN
            return z < (real_t)0 ? (real_t)0 : z;
        case ACT_LEAKY_RELU:
            return z > (real_t)0 ? z : z * alpha;
        case ACT_SIGMOID:
            return gb_sigmoid(z);
        case ACT_TANH:
            return tanh(z);
        case ACT_GELU:  // z Φ(z), Φ(z) = ½(1 + erf(z/√2))
            return half * z * (one + erf(z * (real_t)GB_INV_SQRT_2));
        case ACT_GELU_TANH: {  // ½ z (1 + tanh(√(2/π)(z + 0.044715 z³)))
            const real_t u = (real_t)GB_SQRT_2_OVER_PI * (z + (real_t)GB_GELU_TANH_C * z * z * z);
            return half * z * (one + tanh(u));
        }
        case ACT_SILU:  // z σ(z)
            return z * gb_sigmoid(z);
        default:  // ACT_IDENTITY
            return z;
    }
}

// f'(z), from y for relu/sigmoid/tanh and from z for the others (see the header comment).
__device__ __forceinline__ real_t act_derivative(int code, real_t saved, real_t alpha) {
    const real_t half = (real_t)0.5, one = (real_t)1;
    switch (code) {
        case ACT_RELU:  // [z > 0] = [y > 0]
            return saved > (real_t)0 ? one : (real_t)0;
        case ACT_SIGMOID:  // σ' = y(1 − y)
            return saved * (one - saved);
        case ACT_TANH:  // tanh' = 1 − y²
            return one - saved * saved;
        case ACT_LEAKY_RELU:
            return saved > (real_t)0 ? one : alpha;
        case ACT_GELU: {  // Φ(z) + z φ(z)
            const real_t z = saved;
            const real_t cdf = half * (one + erf(z * (real_t)GB_INV_SQRT_2));
            return cdf + z * (real_t)GB_INV_SQRT_2PI * exp(-half * z * z);
        }
        case ACT_GELU_TANH: {  // ½(1 + t) + ½ z (1 − t²) u',  u = √(2/π)(z + c z³)
            const real_t z = saved;
            const real_t c = (real_t)GB_GELU_TANH_C;
            const real_t t = tanh((real_t)GB_SQRT_2_OVER_PI * (z + c * z * z * z));
            const real_t du = (real_t)GB_SQRT_2_OVER_PI * (one + (real_t)3 * c * z * z);
            return half * (one + t) + half * z * (one - t * t) * du;
        }
        case ACT_SILU: {  // σ(z)(1 + z(1 − σ(z)))
            const real_t s = gb_sigmoid(saved);
            return s * (one + saved * (one - s));
        }
        default:  // ACT_IDENTITY
            return one;
    }
}

// ∂L/∂z = ∂L/∂y ⊙ f'(z) for one element, with PyTorch's choices at NaN and ±Inf (see the header).
__device__ __forceinline__ real_t act_backward(int code, real_t dout, real_t saved, real_t alpha) {
    switch (code) {
        case ACT_RELU:  // torch threshold_backward: 0 where y <= 0, else dout
            return saved <= (real_t)0 ? (real_t)0 : dout;
        case ACT_LEAKY_RELU:  // torch leaky_relu_backward: dout where z > 0, else α·dout
            return saved > (real_t)0 ? dout : dout * alpha;
        default:
            return dout * act_derivative(code, saved, alpha);
    }
}

#endif  // GB_ACTIVATIONS_CUH
