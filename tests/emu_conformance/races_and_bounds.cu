// Planted bugs the emulator must catch: barriers left out, and accesses past a buffer's ends.
// Each buggy kernel has a correct twin, which must pass under the same checks.

// y[i] = x[i - 1] within a block (y[first] = x[first]), through shared memory.
extern "C" __global__ void shift_right(const float* x, float* y, int n) {
    __shared__ float tile[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = threadIdx.x > 0 ? tile[threadIdx.x - 1] : x[i];
}

// The same with the barrier removed: in thread order every left neighbour has already written
// its element, so only another order (GPUBACKPROP_EMU_SHUFFLE, or a GPU) shows the race.
extern "C" __global__ void shift_right_no_barrier(const float* x, float* y, int n) {
    __shared__ float tile[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.0f;
    if (i < n) y[i] = threadIdx.x > 0 ? tile[threadIdx.x - 1] : x[i];
}

// sums[w] = sum of the 32 values of warp w, by a tree in shared memory; each step's reads of
// other lanes' writes need __syncwarp() since Volta (lanes no longer run in lockstep).
extern "C" __global__ void warp_tree_sum(const float* x, float* sums) {
    __shared__ float partial[256];
    const int lane = threadIdx.x % 32, base = threadIdx.x - lane;
    partial[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncwarp();
    for (int offset = 16; offset > 0; offset /= 2) {
        const float other = lane < offset ? partial[base + lane + offset] : 0.0f;
        __syncwarp();
        if (lane < offset) partial[threadIdx.x] += other;
        __syncwarp();
    }
    if (lane == 0) sums[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = partial[threadIdx.x];
}

// The pre-Volta idiom: no __syncwarp(), relying on lockstep lanes (a race on any GPU since).
extern "C" __global__ void warp_tree_sum_no_syncwarp(const float* x, float* sums) {
    __shared__ float partial[256];
    const int lane = threadIdx.x % 32;
    volatile float* p = partial;
    p[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2) {
        if (lane < offset) p[threadIdx.x] += p[threadIdx.x + offset];
    }
    if (lane == 0) sums[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = p[threadIdx.x];
}

// y[i] = x[i] + x[i + 1] for i < n - 1, and y[n - 1] = x[n - 1].
extern "C" __global__ void pair_sum(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n - 1) y[i] = x[i] + x[i + 1];
    else if (i == n - 1) y[i] = x[i];
}

// Off by one: the last thread reads x[n], one past the end.
extern "C" __global__ void pair_sum_reads_past_the_end(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + (i + 1 <= n ? x[i + 1] : 0.0f);
}

// The same for integers, whose out-of-bounds value is no NaN: only the guard check sees it.
extern "C" __global__ void int_pair_sum_reads_past_the_end(const int* x, int* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + (i + 1 <= n ? x[i + 1] : 0);
}

// Off by one on the write: `<=` writes y[n], one past the end.
extern "C" __global__ void copy_writes_past_the_end(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = i < n ? x[i] : 0.0f;
}

// A negative index: y[-1] is written by thread 0.
extern "C" __global__ void copy_writes_before_the_start(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i - 1] = x[i];
}

// Dynamic shared memory sized for blockDim.x floats; the off-by-one twin writes one past it.
extern "C" __global__ void stage_in_shared(const float* x, float* y, int n, int shift) {
    extern __shared__ float staged[];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    staged[threadIdx.x + shift] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = 2.0f * staged[threadIdx.x + shift];
}
