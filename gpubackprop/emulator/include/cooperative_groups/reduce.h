// cooperative_groups/reduce.h for the CPU emulator: cg::reduce over a thread_block_tile, and the
// operators plus, less, greater, bit_and, bit_or, bit_xor.
//
// The reduction is the butterfly a GPU runs for a tile: out = op(out, shfl_xor(out, m)) for
// m = Size/2, ..., 1, so every thread gets the result, and a float sum is added in the same order
// as on the GPU.  (Integer plus/less/greater/bit ops may run as one redux.sync instruction on
// sm_80+; their result does not depend on the order.)  Any binary operation works, including a
// user lambda over a struct.
#ifndef GBEMU_COOPERATIVE_GROUPS_REDUCE_H
#define GBEMU_COOPERATIVE_GROUPS_REDUCE_H

#include "../cooperative_groups.h"

namespace cooperative_groups {

template <class T> struct plus {
    T operator()(T a, T b) const { return a + b; }
};
template <class T> struct less {
    T operator()(T a, T b) const { return (b < a) ? b : a; }
};
template <class T> struct greater {
    T operator()(T a, T b) const { return (a < b) ? b : a; }
};
template <class T> struct bit_and {
    T operator()(T a, T b) const { return a & b; }
};
template <class T> struct bit_or {
    T operator()(T a, T b) const { return a | b; }
};
template <class T> struct bit_xor {
    T operator()(T a, T b) const { return a ^ b; }
};

template <unsigned int Size, class Parent, class T, class Op>
static inline auto reduce(const thread_block_tile<Size, Parent>& tile, T&& value, Op&& op)
    -> decltype(op(value, value)) {
    auto out = value;
    for (int mask = (int)Size >> 1; mask > 0; mask >>= 1) out = op(out, tile.shfl_xor(out, mask));
    return out;
}

// cg::reduce over a whole block is not CUDA's (only tiles and coalesced groups): say so here.
template <class T, class Op> static inline void reduce(const thread_block&, T&&, Op&&) {
    static_assert(details::always_false<T>::value,
                  "cooperative_groups::reduce takes a thread_block_tile (tiled_partition<N>), "
                  "not a thread_block");
}

}  // namespace cooperative_groups

#endif  // GBEMU_COOPERATIVE_GROUPS_REDUCE_H
