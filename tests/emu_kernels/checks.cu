// Small kernels for tests/test_emulator.py: each exercises one emulator feature or check.
#ifndef REAL_T
#define REAL_T float
#endif
typedef REAL_T real_t;

// Tiled transpose through shared memory: out (cols, rows) = in (rows, cols)ᵀ.
#define TT 8
extern "C" __global__ void transpose_tiled(const real_t* __restrict__ in, real_t* __restrict__ out,
                                           int rows, int cols) {
    __shared__ real_t tile[TT][TT + 1];
    int x = blockIdx.x * TT + threadIdx.x, y = blockIdx.y * TT + threadIdx.y;
    if (x < cols && y < rows) tile[threadIdx.y][threadIdx.x] = in[(long long)y * cols + x];
    __syncthreads();
    x = blockIdx.y * TT + threadIdx.x;
    y = blockIdx.x * TT + threadIdx.y;
    if (x < rows && y < cols) out[(long long)y * rows + x] = tile[threadIdx.x][threadIdx.y];
}

// One sum per block: a grid-stride loop, warp shuffles, then shared memory across warps.
extern "C" __global__ void warp_sum(const real_t* __restrict__ x, real_t* __restrict__ partial,
                                    long long n) {
    GB_DYNAMIC_SHARED(real_t, warp_sums);
    real_t v = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        v += x[i];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : (real_t)0;
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) partial[blockIdx.x] = v;
    }
}

// Dynamic shared memory reversal within a block, and shuffles of every flavour.
extern "C" __global__ void reverse_block(const int* __restrict__ in, int* __restrict__ out, int n) {
    GB_DYNAMIC_SHARED(int, buf);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = i < n ? in[i] : -1;
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (j < n) out[j] = buf[threadIdx.x];
}

extern "C" __global__ void shuffle_flavours(int* __restrict__ out) {
    const int lane = threadIdx.x;
    out[lane] = __shfl_sync(0xffffffffu, lane * 10, 3);
    out[32 + lane] = __shfl_up_sync(0xffffffffu, lane, 1);
    out[64 + lane] = __shfl_down_sync(0xffffffffu, lane, 2, 8);
    out[96 + lane] = __shfl_xor_sync(0xffffffffu, lane, 5);
    out[128 + lane] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
    out[160 + lane] = __syncthreads_count(lane < 7);
}

extern "C" __global__ void atomic_count(const real_t* __restrict__ x, int* counter,
                                        unsigned long long* total, long long n) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n && x[i] > 0) {
        atomicAdd(counter, 1);
        atomicAdd(total, 1ull);
    }
}

// Writes one element past the end of `out`.
extern "C" __global__ void write_past_end(real_t* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = (real_t)i;
}

// Reads one element past the end of x for the last i, through fmaxf, which ignores a NaN: the
// 0xFF guard bytes (NaN) leave the output right, the 0x7F ones (3.4e38) do not.
extern "C" __global__ void neighbour_max_past_end(const float* __restrict__ x,
                                                  float* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = fmaxf(x[i], x[i + 1]);
}

// Every thread reads its own shared slot and the one 32 places on, through fmaxf; a block of 32
// never writes slots 32..63 (NaN in the first guard-check run, which fmaxf ignores).
extern "C" __global__ void unwritten_shared_max(float* out) {
    __shared__ float slots[64];
    slots[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = fmaxf(slots[threadIdx.x], slots[threadIdx.x + 32]);
}

// Writes only the even elements of `out`.
extern "C" __global__ void write_even(real_t* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && i % 2 == 0) out[i] = (real_t)i;
}

// Half the threads return before the barrier: a hang (or worse) on a GPU.
extern "C" __global__ void divergent_barrier(real_t* out, int n) {
    const int i = threadIdx.x;
    if (i >= n) return;
    __syncthreads();
    out[i] = (real_t)i;
}

// Lanes 16..31 exit while lanes 0..15 shuffle with a full mask.
extern "C" __global__ void divergent_shuffle(real_t* out) {
    const int lane = threadIdx.x;
    if (lane >= 16) return;
    out[lane] = __shfl_down_sync(0xffffffffu, (real_t)lane, 1);
}

extern "C" __global__ void failing_assert(real_t* out, int n) {
    const int i = threadIdx.x;
    assert(i < n);
    out[i] = 1;
}

// A race: thread 0 reads its neighbour's slot without a barrier; thread order hides it.
extern "C" __global__ void racy_neighbour(int* out) {
    __shared__ int slot[64];
    slot[threadIdx.x] = (int)threadIdx.x + 1;
    out[threadIdx.x] = slot[(threadIdx.x + 63) % 64];  // missing __syncthreads()
}

// Every scalar type the launcher passes, summed into out (double).
extern "C" __global__ void scalar_types(double* out, int a, long long b, float c, double d,
                                        unsigned int e) {
    out[0] = (double)a + (double)b + (double)c + d + (double)e;
}

// A float4 path taken only when the pointer is 16-byte aligned, as gemm.cu does.
extern "C" __global__ void alignment_path(const float* __restrict__ x, int* path) {
    path[0] = ((unsigned long long)x % 16 == 0) ? 4 : 1;
    if (path[0] == 4) {
        const float4 v = *reinterpret_cast<const float4*>(x);
        path[1] = (int)(v.x + v.y + v.z + v.w);
    } else {
        path[1] = (int)(x[0] + x[1] + x[2] + x[3]);
    }
}

// Math built-ins and intrinsics, so that a missing one is a compile failure here first.
extern "C" __global__ void math_builtins(const float* __restrict__ x, float* __restrict__ y,
                                         double* __restrict__ z, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = __ldg(x + i);
    y[i] = expf(v) * 0.0f + __expf(v) * 0.0f + tanhf(v) + erff(v) * 0.0f + log1pf(fabsf(v)) * 0.0f
         + rsqrtf(1.0f + v * v) * 0.0f + fmaxf(v, 0.0f) * 0.0f + __fdividef(v, 2.0f) * 0.0f
         + fmaf(v, 0.0f, 0.0f) + max(v, -1e30f) * 0.0f + (isnan(v) ? 1.0f : 0.0f);
    const double d = v;
    z[i] = tanh(d) + exp(d) * 0.0 + erf(d) * 0.0 + (double)min(i, 3) * 0.0 + sqrt(d * d) * 0.0;
}
