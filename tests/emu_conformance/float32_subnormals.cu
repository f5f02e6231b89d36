// float32 subnormals (|x| < 2^-126) in the tails of the usual activations.  CuPy builds every
// kernel with -ftz=true: float32 subnormal inputs read as zero and subnormal results become
// zero; float64 is never flushed.

// The overflow-free form: for x < 0, exp(x) / (1 + exp(x)), whose exp(x) reaches subnormals.
extern "C" __global__ void sigmoid(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float e = expf(-fabsf(x[i]));
        y[i] = x[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    }
}

// One row per block, one thread per row: y = exp(x - max) / sum(exp(x - max)).
extern "C" __global__ void softmax_rows(const float* x, float* y, int cols) {
    const float* in = x + (size_t)blockIdx.x * cols;
    float* out = y + (size_t)blockIdx.x * cols;
    float peak = in[0];
    for (int c = 1; c < cols; ++c) peak = fmaxf(peak, in[c]);
    float total = 0.0f;
    for (int c = 0; c < cols; ++c) total += expf(in[c] - peak);
    for (int c = 0; c < cols; ++c) out[c] = expf(in[c] - peak) / total;
}

extern "C" __global__ void scale_float(const float* x, float* y, float factor, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * factor;
}

extern "C" __global__ void scale_double(const double* x, double* y, double factor, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * factor;
}
