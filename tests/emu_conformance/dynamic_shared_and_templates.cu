// Dynamic shared memory declared the usual way (`extern __shared__ T name[];`, at file and at
// function scope) and templated kernels, launched by name expression as CuPy launches them.
#include <cuda_runtime.h>  // as many kernels begin (the built-ins need no include)

extern __shared__ float file_scope_tile[];  // one buffer for every kernel, sized by the launch

// out[start + t] = in[start + (blockDim.x - 1 - t)] within each block (0 past the end of in).
extern "C" __global__ void reverse_each_block(const float* in, float* out, int n) {
    const int start = blockIdx.x * blockDim.x;
    const int i = start + threadIdx.x;
    file_scope_tile[threadIdx.x] = i < n ? in[i] : 0.0f;
    __syncthreads();
    if (i < n) out[i] = file_scope_tile[blockDim.x - 1 - threadIdx.x];
}

// partial[b] = sum of x over the grid-stride slice of block b: the classic shared-memory tree.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) block_sum(const T* x, T* partial, int n) {
    extern __shared__ __align__(sizeof(T)) unsigned char shared_bytes[];
    T* shared = reinterpret_cast<T*>(shared_bytes);
    T sum = 0;
    for (int i = blockIdx.x * BLOCK + threadIdx.x; i < n; i += BLOCK * gridDim.x) sum += x[i];
    shared[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = BLOCK / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
}

namespace demo {
// out[i] = VALUE * i + offset, a template in a namespace with a non-type parameter.
template <int VALUE>
__global__ void affine_fill(int* out, int offset, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = VALUE * i + offset;
}
}  // namespace demo

// The shared row buffer holds `cols` values: its size comes from the launch (cols * 4 bytes).
extern "C" __global__ void row_softmax(const float* x, float* y, int cols) {
    extern __shared__ float row[];
    const float* in = x + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = in[c];
    __syncthreads();
    if (threadIdx.x == 0) {
        float peak = row[0];
        for (int c = 1; c < cols; ++c) peak = fmaxf(peak, row[c]);
        float total = 0.0f;
        for (int c = 0; c < cols; ++c) {
            row[c] = expf(row[c] - peak);
            total += row[c];
        }
        for (int c = 0; c < cols; ++c) row[c] /= total;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) y[(size_t)blockIdx.x * cols + c] = row[c];
}
