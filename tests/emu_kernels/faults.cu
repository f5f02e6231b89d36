// Kernels that do what a GPU stops with an error, for tests/test_emulator.py: each must raise
// EmuLaunchError naming the fault, never take the Python process down.  The faulting thread is
// block (1,0,0) thread (3,0,0) where the test launches two blocks.
#define FAULTING_THREAD (blockIdx.x == 1 && threadIdx.x == 3)

// A 16-byte load at x + offset: misaligned unless offset is a multiple of 4.
extern "C" __global__ void misaligned_load(const float* __restrict__ x, float* __restrict__ out,
                                           int offset) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float4 v = reinterpret_cast<const float4*>(x + (FAULTING_THREAD ? offset : 0))[0];
    out[i] = v.x + v.y + v.z + v.w;
}

// A 16-byte store at out + offset.
extern "C" __global__ void misaligned_store(float* out, int offset) {
    if (FAULTING_THREAD) reinterpret_cast<float4*>(out + offset)[0] = make_float4(1, 2, 3, 4);
}

// 16-byte double2 and 8-byte float2 loads at x + offset.
extern "C" __global__ void misaligned_double2(const double* __restrict__ x, double* out,
                                              int offset) {
    const double2 v = *reinterpret_cast<const double2*>(x + offset);
    out[threadIdx.x] = v.x + v.y;
}
extern "C" __global__ void misaligned_float2(const float* __restrict__ x, float* out, int offset) {
    const float2 v = reinterpret_cast<const float2*>(x + offset)[0];
    out[threadIdx.x] = v.x + v.y;
}

// A write at out[offset], offset chosen so that the address is `target` (far beyond the 64 KiB
// guard zones, wherever the launcher placed the guarded copy of out).
extern "C" __global__ void far_write(float* out, long long target) {
    const long long offset = (target - (long long)out) / (long long)sizeof(float);
    if (FAULTING_THREAD) out[offset] = 1.0f;
}

// A read through a pointer made from an integer (0: a null pointer).
extern "C" __global__ void pointer_read(float* out, long long address) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = FAULTING_THREAD ? *reinterpret_cast<const float*>(address) : 0.0f;
}

// Integer division of each element by `divisor`.
extern "C" __global__ void integer_divide(int* values, int divisor) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    values[i] = values[i] / (FAULTING_THREAD ? divisor : 1);
}

// Recursion `depth` deep with ~512 bytes of locals per level.
__device__ __noinline__ int deep(int depth) {
    volatile int pad[128];
    pad[depth % 128] = depth;
    if (depth == 0) return 0;
    return deep(depth - 1) + pad[depth % 128];  // not a tail call: the frame stays live
}
extern "C" __global__ void recursion(long long* out, int depth) {
    out[threadIdx.x] = deep(depth);
}

// A local array of `GB_BIG_LOCAL` bytes (more than the fiber stack).
#ifndef GB_BIG_LOCAL
#define GB_BIG_LOCAL (1 << 20)
#endif
extern "C" __global__ void big_local_array(int* out, int index) {
    volatile char big[GB_BIG_LOCAL];
    big[index] = 1;
    big[0] = 2;
    out[threadIdx.x] = big[index] + big[0];
}
