// Blocks finish in no promised order: the "last block" pattern (CUDA's threadFenceReduction
// sample) finds the block that finishes last with a ticket from a counter in global memory,
// __threadfence() ordering the block's writes before its ticket.  Its planted twin assumes the
// highest blockIdx finishes last instead, which only a GPU or the emulator's shuffle mode
// (blocks in a random order) shows to be wrong.

// Block sums of x (exact for small integers), in a fixed tree order.
__device__ float block_sum(const float* x, int n, float* scratch) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    scratch[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        __syncthreads();
    }
    return scratch[0];
}

// total[0] = Σ x; tickets[b]: the order in which block b finished (0 first); count: 0 before
// the launch, and after it again (the last block resets it for the next launch).
extern "C" __global__ void sum_by_last_block(const float* x, int n, float* partials,
                                             unsigned int* count, unsigned int* tickets,
                                             float* total) {
    __shared__ float scratch[256];
    __shared__ bool is_last;
    const float sum = block_sum(x, n, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = sum;
        __threadfence();  // the partial is visible to every block before the ticket is
        const unsigned int ticket = atomicAdd(count, 1u);
        tickets[blockIdx.x] = ticket;
        is_last = ticket == gridDim.x - 1;
    }
    __syncthreads();
    if (is_last && threadIdx.x == 0) {
        __threadfence();
        const volatile float* all = partials;  // not from a cache filled before the others wrote
        float result = 0.0f;
        for (unsigned int b = 0; b < gridDim.x; ++b) result += all[b];
        total[0] = result;
        *count = 0;
    }
}

// The planted bug: the block with the highest index adds the partials, as if it finished last.
extern "C" __global__ void sum_by_highest_block(const float* x, int n, float* partials,
                                                unsigned int* count, unsigned int* tickets,
                                                float* total) {
    __shared__ float scratch[256];
    const float sum = block_sum(x, n, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = sum;
        __threadfence();
        tickets[blockIdx.x] = atomicAdd(count, 1u);
        if (blockIdx.x == gridDim.x - 1) {
            const volatile float* all = partials;
            float result = 0.0f;
            for (unsigned int b = 0; b < gridDim.x; ++b) result += all[b];
            total[0] = result;
        }
    }
}
