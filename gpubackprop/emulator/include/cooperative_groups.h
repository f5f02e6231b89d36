// cooperative_groups.h for the CPU emulator: thread blocks and warp tiles as CUDA defines them.
//
// A thread_block is the block: sync() is __syncthreads().  A thread_block_tile<N> (N a power of
// two up to 32) is N consecutive threads of the block by thread_rank, so it lies inside one
// warp: its collectives are the emulator's warp shuffles and votes over the tile's lanes (mask
// and width N), and its sync() is __syncwarp(tile mask).  So the shuffle mode, the exited-lane
// and divergent-barrier checks apply to tiles as they do to warps.  Shuffles move any trivially
// copyable type, 8 bytes at a time, as CUDA's tiles do.
//
// What needs a cooperative launch or a converged-lanes view the emulator does not have
// (this_grid(), this_multi_grid(), coalesced_threads(), binary_partition, labeled_partition) is
// refused by a static_assert naming it at the line that uses it.
#ifndef GBEMU_COOPERATIVE_GROUPS_H
#define GBEMU_COOPERATIVE_GROUPS_H

#include <cstring>
#include <type_traits>

namespace cooperative_groups {

namespace details {
static inline unsigned int block_thread_rank() {
    return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
}
static inline unsigned int block_num_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// A shuffle of any trivially copyable value, 8 bytes at a time (each piece from the same lane).
template <class T>
static inline T tile_exchange(unsigned int mask, T value, int mode, int argument, int width,
                              const char* what) {
    static_assert(std::is_trivially_copyable<T>::value,
                  "cooperative_groups shuffles move trivially copyable types only");
    if constexpr (sizeof(T) <= 8) {
        return gbemu::warp_exchange(mask, value, mode, argument, width, what);
    } else {
        unsigned char bytes[sizeof(T)];
        memcpy(bytes, &value, sizeof(T));
        for (size_t offset = 0; offset < sizeof(T); offset += 8) {
            unsigned long long piece = 0;
            const size_t count = sizeof(T) - offset < 8 ? sizeof(T) - offset : 8;
            memcpy(&piece, bytes + offset, count);
            piece = gbemu::warp_exchange(mask, piece, mode, argument, width, what);
            memcpy(bytes + offset, &piece, count);
        }
        T out;
        memcpy(&out, bytes, sizeof(T));
        return out;
    }
}

template <class T> struct always_false : std::false_type {};
}  // namespace details

class thread_block {
  public:
    static void sync() { __syncthreads(); }
    static void barrier_wait() { __syncthreads(); }
    static unsigned int thread_rank() { return details::block_thread_rank(); }
    static unsigned int size() { return details::block_num_threads(); }
    static unsigned int num_threads() { return details::block_num_threads(); }
    static dim3 group_index() { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
    static dim3 thread_index() { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
    static dim3 group_dim() { return blockDim; }
    static dim3 dim_threads() { return blockDim; }
};

static inline thread_block this_thread_block() { return thread_block(); }

template <unsigned int Size, class ParentT = void> class thread_block_tile;

// The tile itself; thread_block_tile<Size, Parent> (what tiled_partition returns) derives from
// it, so it converts to thread_block_tile<Size> as in CUDA.
template <unsigned int Size> class thread_block_tile<Size, void> {
    static_assert(Size >= 1 && Size <= 32 && (Size & (Size - 1)) == 0,
                  "thread_block_tile<Size>: Size must be a power of two from 1 to 32");

  public:
    thread_block_tile(unsigned int meta_rank, unsigned int meta_size)
        : meta_rank_(meta_rank), meta_size_(meta_size) {}

    // The tile's lanes within its warp (lane = block thread rank % 32).
    static unsigned int lane_mask() {
        const unsigned int lane = details::block_thread_rank() % 32u;
        const unsigned int ones = Size == 32 ? 0xffffffffu : ((1u << Size) - 1u);
        return ones << (lane / Size * Size);
    }
    static void sync() { gbemu::warp_barrier(lane_mask(), "thread_block_tile::sync"); }
    static unsigned int thread_rank() { return details::block_thread_rank() % Size; }
    static constexpr unsigned int size() { return Size; }
    static constexpr unsigned int num_threads() { return Size; }
    unsigned int meta_group_rank() const { return meta_rank_; }
    unsigned int meta_group_size() const { return meta_size_; }

    template <class T> T shfl(T var, int src_rank) const {
        return details::tile_exchange(lane_mask(), var, gbemu::SHFL_IDX, src_rank, (int)Size,
                                      "thread_block_tile::shfl");
    }
    template <class T> T shfl_up(T var, unsigned int delta) const {
        return details::tile_exchange(lane_mask(), var, gbemu::SHFL_UP, (int)delta, (int)Size,
                                      "thread_block_tile::shfl_up");
    }
    template <class T> T shfl_down(T var, unsigned int delta) const {
        return details::tile_exchange(lane_mask(), var, gbemu::SHFL_DOWN, (int)delta, (int)Size,
                                      "thread_block_tile::shfl_down");
    }
    template <class T> T shfl_xor(T var, unsigned int lane_mask_value) const {
        return details::tile_exchange(lane_mask(), var, gbemu::SHFL_XOR, (int)lane_mask_value,
                                      (int)Size, "thread_block_tile::shfl_xor");
    }
    unsigned int ballot(int predicate) const {
        const unsigned int mask = lane_mask();
        const unsigned int bits = gbemu::warp_vote(mask, predicate, "thread_block_tile::ballot");
        return (bits & mask) >> (details::block_thread_rank() % 32u / Size * Size);
    }
    int any(int predicate) const {
        return gbemu::warp_vote(lane_mask(), predicate, "thread_block_tile::any") != 0u;
    }
    int all(int predicate) const {
        const unsigned int mask = lane_mask();
        return gbemu::warp_vote(mask, predicate, "thread_block_tile::all") ==
               (mask & gbemu::warp_exist_mask());
    }

  private:
    unsigned int meta_rank_;
    unsigned int meta_size_;
};

template <unsigned int Size, class ParentT>
class thread_block_tile : public thread_block_tile<Size, void> {
  public:
    using thread_block_tile<Size, void>::thread_block_tile;
};

// Tiles of Size consecutive threads of the block: meta_group_rank is the tile's index in the
// block, meta_group_size the number of tiles (the last one partial if Size does not divide it).
template <unsigned int Size>
static inline thread_block_tile<Size, thread_block> tiled_partition(const thread_block&) {
    const unsigned int threads = details::block_num_threads();
    return thread_block_tile<Size, thread_block>(details::block_thread_rank() / Size,
                                                 (threads + Size - 1) / Size);
}

// A tile of a tile: Size must divide the parent's size.
template <unsigned int Size, unsigned int ParentSize, class Grandparent>
static inline thread_block_tile<Size, thread_block_tile<ParentSize, Grandparent>> tiled_partition(
    const thread_block_tile<ParentSize, Grandparent>& parent) {
    static_assert(Size <= ParentSize, "tiled_partition<Size>(tile): Size exceeds the tile's size");
    return thread_block_tile<Size, thread_block_tile<ParentSize, Grandparent>>(
        parent.thread_rank() / Size, ParentSize / Size);
}

template <class Group> static inline void sync(const Group& group) { group.sync(); }
template <class Group> static inline unsigned int thread_rank(const Group& group) {
    return group.thread_rank();
}
template <class Group> static inline unsigned int num_threads(const Group& group) {
    return group.num_threads();
}

// Refused: each needs something the emulator does not model (see the top of this file).
template <class T = void> static inline void this_grid() {
    static_assert(details::always_false<T>::value,
                  "cooperative_groups::this_grid() needs a cooperative grid launch, which the "
                  "CPU emulator does not run");
}
template <class T = void> static inline void this_multi_grid() {
    static_assert(details::always_false<T>::value,
                  "cooperative_groups::this_multi_grid() is not supported by the CPU emulator");
}
template <class T = void> static inline void coalesced_threads() {
    static_assert(details::always_false<T>::value,
                  "cooperative_groups::coalesced_threads() depends on which lanes are converged, "
                  "which the CPU emulator does not model (its lanes run one after another); use "
                  "tiled_partition<N>() of this_thread_block()");
}
template <class T = void, class... A> static inline void binary_partition(A&&...) {
    static_assert(details::always_false<T>::value,
                  "cooperative_groups::binary_partition is not supported by the CPU emulator");
}
template <class T = void, class... A> static inline void labeled_partition(A&&...) {
    static_assert(details::always_false<T>::value,
                  "cooperative_groups::labeled_partition is not supported by the CPU emulator");
}

}  // namespace cooperative_groups

#endif  // GBEMU_COOPERATIVE_GROUPS_H
