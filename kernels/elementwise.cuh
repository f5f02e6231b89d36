// elementwise.cuh: the bodies of the activation and add elementwise kernels, one device function
// per kernel.  No kernels here.
//
// Each GB_ELEMENTWISE function is the loop body of one elementwise kernel for element i: its
// `const` parameters are the inputs (an array element when typed real_t, else a scalar), its
// `real_t&` parameters the outputs.  gpubackprop/backends/elementwise.py turns each signature
// into a CuPy ElementwiseKernel (in_params / out_params) whose operation calls the function; the
// CPU emulator wraps the same call in a grid-stride kernel (kernels.elementwise_as_kernel_source).
// The kernel is named after the function without its `_element` suffix.
#ifndef GB_ELEMENTWISE_CUH
#define GB_ELEMENTWISE_CUH

#include "activations.cuh"

#ifndef GB_ELEMENTWISE
#define GB_ELEMENTWISE __device__ __forceinline__ void
#endif

// y = f(x).
GB_ELEMENTWISE gb_activation_forward_element(const real_t x, const int code, const double alpha,
                                             real_t& y) {
    y = act_forward(code, x, (real_t)alpha);
}

// dinp = dout ⊙ f'(saved): the standalone activation's backward and the dense layer's
// δ = ∂L/∂y ⊙ f'(z) alike.
GB_ELEMENTWISE gb_activation_backward_element(const real_t dout, const real_t saved,
                                              const int code, const double alpha, real_t& dinp) {
    dinp = act_backward(code, dout, saved, (real_t)alpha);
}

// c = a + b (a residual block's sum).
GB_ELEMENTWISE gb_add_element(const real_t a, const real_t b, real_t& c) { c = a + b; }

#endif  // GB_ELEMENTWISE_CUH
