// Half and bfloat16 conversions and arithmetic, written as CUDA code usually uses them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Every float -> 16-bit conversion of x[i], stored as bit patterns, and the round trips back.
extern "C" __global__ void float_to_16bit(const float* x, unsigned short* half_rn,
                                          unsigned short* half_rz, unsigned short* half_rd,
                                          unsigned short* half_ru, unsigned short* bf16_rn,
                                          unsigned short* bf16_rz, unsigned short* bf16_rd,
                                          unsigned short* bf16_ru, float* half_back,
                                          float* bf16_back, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        __half h = __float2half_rn(x[i]);
        __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
        half_rn[i] = __half_as_ushort(h);
        half_rz[i] = __half_as_ushort(__float2half_rz(x[i]));
        half_rd[i] = __half_as_ushort(__float2half_rd(x[i]));
        half_ru[i] = __half_as_ushort(__float2half_ru(x[i]));
        bf16_rn[i] = __bfloat16_as_ushort(b);
        bf16_rz[i] = __bfloat16_as_ushort(__float2bfloat16_rz(x[i]));
        bf16_rd[i] = __bfloat16_as_ushort(__float2bfloat16_rd(x[i]));
        bf16_ru[i] = __bfloat16_as_ushort(__float2bfloat16_ru(x[i]));
        half_back[i] = __half2float(h);
        bf16_back[i] = __bfloat162float(b);
    }
}

extern "C" __global__ void double_to_16bit(const double* x, __half* half_out,
                                           unsigned short* bf16_out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        half_out[i] = __double2half(x[i]);
        bf16_out[i] = __bfloat16_as_ushort(__double2bfloat16(x[i]));
    }
}

// out[5 * i + k]: a + b, a - b, a * b, a / b and fma(a, b, c), each rounded once.
extern "C" __global__ void half_arithmetic(const __half* a, const __half* b, const __half* c,
                                           __half* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[5 * i + 0] = a[i] + b[i];
        out[5 * i + 1] = a[i] - b[i];
        out[5 * i + 2] = a[i] * b[i];
        out[5 * i + 3] = a[i] / b[i];
        out[5 * i + 4] = __hfma(a[i], b[i], c[i]);
    }
}

extern "C" __global__ void bf16_arithmetic(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                           const __nv_bfloat16* c, __nv_bfloat16* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[5 * i + 0] = a[i] + b[i];
        out[5 * i + 1] = a[i] - b[i];
        out[5 * i + 2] = a[i] * b[i];
        out[5 * i + 3] = a[i] / b[i];
#if __CUDA_ARCH__ >= 800  // the bf16 fma is an sm_80 instruction (the emulator is sm_80)
        out[5 * i + 4] = __hfma(a[i], b[i], c[i]);
#else
        out[5 * i + 4] = __float2bfloat16_rn(fmaf(__bfloat162float(a[i]), __bfloat162float(b[i]),
                                                  __bfloat162float(c[i])));
#endif
    }
}

// A bf16 dot product with float accumulation and the pair types, as a tensor-core kernel's
// epilogue-free reference would write it: out[row] = sum_k float(x[row, k]) * float(w[k]).
extern "C" __global__ void bf16_dot_pairs(const __nv_bfloat162* x, const __nv_bfloat162* w,
                                          float* out, int pairs_per_row, int rows) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float sum = 0.0f;
    for (int k = 0; k < pairs_per_row; ++k) {
        float2 xv = __bfloat1622float2(x[row * pairs_per_row + k]);
        float2 wv = __bfloat1622float2(w[k]);
        sum += xv.x * wv.x + xv.y * wv.y;
    }
    out[row] = sum;
}

// 16-bit scalars by value: y[i] = x[i] * scale + offset, in the 16-bit type's arithmetic.
extern "C" __global__ void axpb_16bit(const __half* x, __half* y, __half scale, __half offset,
                                      const __nv_bfloat16* u, __nv_bfloat16* v,
                                      __nv_bfloat16 u_scale, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = x[i] * scale + offset;
        v[i] = u[i] * u_scale;
    }
}
