// Cooperative groups as CUDA code usually uses them: block and warp tiles, tile shuffles,
// cg::reduce with the library's operators, a user lambda and a struct.
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>

namespace cg = cooperative_groups;

// partial[block] = sum of x over the block's grid-stride slice: tiles of 32 reduce with
// cg::reduce, their sums meet in shared memory, the first tile reduces those.
extern "C" __global__ void block_sum_tiles(const float* x, float* partial, int n) {
    __shared__ float tile_sums[32];
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<32> warp = cg::tiled_partition<32>(block);
    float sum = 0.0f;
    for (int i = blockIdx.x * block.size() + block.thread_rank(); i < n;
         i += block.size() * gridDim.x) {
        sum += x[i];
    }
    sum = cg::reduce(warp, sum, cg::plus<float>());
    if (warp.thread_rank() == 0) tile_sums[warp.meta_group_rank()] = sum;
    block.sync();
    if (warp.meta_group_rank() == 0) {
        float total = warp.thread_rank() < warp.meta_group_size() ? tile_sums[warp.thread_rank()]
                                                                  : 0.0f;
        total = cg::reduce(warp, total, cg::plus<float>());
        if (warp.thread_rank() == 0) partial[blockIdx.x] = total;
    }
}

// For tiles of TILE threads: out[4 * t + k] = tile sum by shfl_down (k = 0), tile maximum of
// an int by cg::greater (1), meta_group_rank (2), meta_group_size (3), for each thread t.
template <int TILE>
__global__ void tile_collectives(const int* x, int* out, int n) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<TILE> tile = cg::tiled_partition<TILE>(block);
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int value = t < n ? x[t] : 0;
    int sum = value;
    for (int offset = TILE / 2; offset > 0; offset /= 2) sum += tile.shfl_down(sum, offset);
    sum = tile.shfl(sum, 0);  // lane 0 holds the total: give it to every lane
    const int peak = cg::reduce(tile, t < n ? value : -2147483647 - 1, cg::greater<int>());
    if (t < n) {
        out[4 * t + 0] = sum;
        out[4 * t + 1] = peak;
        out[4 * t + 2] = (int)tile.meta_group_rank();
        out[4 * t + 3] = (int)tile.meta_group_size();
    }
}

struct ValueIndex {
    float value;
    int index;
};

// best[w] = (max of x, its lowest index) over each 32-thread tile, by a user lambda over a
// struct; ties go to the lower index.  ballot[w]: which lanes hold a positive value.
extern "C" __global__ void tile_argmax(const float* x, float* best_value, int* best_index,
                                       unsigned int* positive_lanes, int n) {
    auto block = cg::this_thread_block();
    auto warp = cg::tiled_partition<32>(block);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    ValueIndex mine = {i < n ? x[i] : -__int_as_float(0x7f800000), i < n ? i : 0x7fffffff};
    ValueIndex best = cg::reduce(warp, mine, [](ValueIndex a, ValueIndex b) {
        if (a.value != b.value) return a.value > b.value ? a : b;
        return a.index < b.index ? a : b;
    });
    const unsigned int positive = warp.ballot(i < n && x[i] > 0.0f);
    const int w = i / 32;
    if (warp.thread_rank() == 0) {
        best_value[w] = best.value;
        best_index[w] = best.index;
        positive_lanes[w] = positive;
    }
}

// A tile of 8 inside a tile of 32: xor butterfly by hand, and any/all.
extern "C" __global__ void nested_tiles(const double* x, double* tile_sum, int* flags) {
    auto warp = cg::tiled_partition<32>(cg::this_thread_block());
    auto eight = cg::tiled_partition<8>(warp);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    double v = x[i];
    for (int mask = 4; mask > 0; mask >>= 1) v += eight.shfl_xor(v, mask);
    tile_sum[i] = v;
    flags[2 * i] = eight.any(x[i] > 1.0);
    flags[2 * i + 1] = eight.all(x[i] > -1.0) + 2 * (int)eight.meta_group_rank();
    eight.sync();
}
