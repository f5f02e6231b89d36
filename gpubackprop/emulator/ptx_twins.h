// ptx_twins.h: the emulator bodies of the PTX instructions that kernels/ptx_twins.cuh wraps.
//
// kernels/ptx_twins.cuh holds one small device function per PTX instruction the tensor-core
// kernels use; on a GPU its body is the inline asm, here (GPUBACKPROP_EMULATOR) it calls the
// function of the same meaning below, written from the PTX ISA:
//
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32   mma_bf16_m16n8k16
//   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32    mma_tf32_m16n8k8
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16      ldmatrix_x4
//   cp.async.cg.shared.global (16 bytes, zero fill)        cp_async
//   cp.async.commit_group / cp.async.wait_group N          cp_async_commit / cp_async_wait
//   cvt.rn.bf16x2.f32                                     cvt_bf16x2
//
// Warp-collective instructions (mma, ldmatrix) run like the shuffles of cuda_emu_runtime.h:
// every lane publishes a copy of its operand registers (or its row address) for its warp, the
// warp meets at a barrier (all 32 lanes must exist and arrive: the .aligned forms require the
// whole warp), then every lane reads what it needs from the others and computes its own
// destination registers.  The copies alternate between two buffers (WarpExchange), so one
// barrier per instruction is enough.
// Fragment layouts follow the ISA's tables ("Matrix Fragments for mma.m16n8k16 with floating
// point type", "... mma.m16n8k8 ... .tf32", "ldmatrix"), with
// groupID = lane >> 2 and threadID_in_group = lane % 4.
//
// Arithmetic: bf16 × bf16 and tf32 × tf32 products are exact in fp32 (8- and 11-bit
// significands), so each output is c + Σ_k a_k b_k summed in fp32 in k order.  The tensor core
// reads only the 19 tf32 bits of a .tf32 register (the low 13 mantissa bits are ignored), as
// does this twin; the kernels round to tf32 beforehand (gb_round_tf32, to nearest even).
//
// cp.async: a copy reads its source when it is issued and lands in shared memory only when a
// cp.async.wait_group retires its group.  Until then the destination holds the byte
// uninitialised shared memory holds (0xFF, NaN; the guard-check run's 0x7F), so a plain load
// that reads it too early sees that value, and ldmatrix stops the launch if it reads a byte that
// a copy of any thread of the block has not landed yet.  Landing checks that nobody wrote the
// destination while the copy was in flight.
#ifndef GBEMU_PTX_TWINS_H
#define GBEMU_PTX_TWINS_H

namespace gbemu {
namespace ptx {

// ---- number formats ---------------------------------------------------------------------

static inline float bits_to_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static inline uint32_t float_to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return bits;
}

// fp32 → bf16, round to nearest even (cvt.rn.bf16.f32); a NaN stays a (quiet) NaN.
static inline uint16_t bf16_rne(float value) {
    uint32_t bits = float_to_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_value(uint16_t half) { return bits_to_float((uint32_t)half << 16); }

// What the tensor core reads from a .tf32 register: sign, exponent, 10 mantissa bits.
static inline float tf32_value(uint32_t bits) { return bits_to_float(bits & 0xffffe000u); }

// cvt.rn.bf16x2.f32 d, hi, lo: lo in bits 0-15, hi in bits 16-31.
static inline uint32_t cvt_bf16x2(float lo, float hi) {
    return (uint32_t)bf16_rne(lo) | ((uint32_t)bf16_rne(hi) << 16);
}

// ---- shared memory and the per-block state of cp.async ---------------------------------

struct Copy {
    unsigned char* dst;
    unsigned char data[16];
    int bytes;
    int group;  // -1 until cp.async.commit_group
};

struct ThreadCopies {
    std::vector<Copy> copies;
    int committed = 0;  // groups committed so far
};

// What the lanes of a warp publish for a warp-collective instruction: up to 8 words per lane,
// in two generations used alternately, so that one barrier per instruction suffices: a lane
// can write generation g again only at the instruction after next, which it reaches only after
// every lane has arrived at the next one, that is after every lane has finished reading g.
struct WarpExchange {
    uint32_t words[2][32][8];
};

struct BlockState {
    unsigned long long serial = ~0ull;
    std::vector<ThreadCopies> threads;
    std::vector<WarpExchange> exchange;      // per warp
    std::vector<unsigned char> generation;  // per thread: the generation it publishes next
    // Copies in flight per 4-byte word of the static section and of the dynamic region.
    std::vector<unsigned short> pending_static, pending_dynamic;
    // ... and of each static __shared__ variable outside the section (outside_shared()).
    std::vector<std::vector<unsigned short>> pending_outside;
    unsigned char fill = 0xFF;
};
static BlockState block_state;

static inline size_t dynamic_bytes() {
    return g.dynamic_shared_storage.size() - (size_t)(g.dynamic_shared -
                                                      g.dynamic_shared_storage.data());
}

// The state of the running block (reset when a new block starts).
static BlockState& state() {
    BlockState& s = block_state;
    if (s.serial != g.block_serial) {
        s.serial = g.block_serial;
        s.threads.assign((size_t)g.nthreads, ThreadCopies());
        s.exchange.resize(g.warps.size());
        s.generation.assign((size_t)g.nthreads, 0);
        const size_t static_bytes = (size_t)(__stop_gbemu_shared - __start_gbemu_shared);
        s.pending_static.assign(static_bytes / 4 + 1, 0);
        s.pending_dynamic.assign(dynamic_bytes() / 4 + 1, 0);
        s.pending_outside.clear();
        s.fill = (unsigned char)g.shared_fill;
    }
    return s;
}

// The in-flight counter of the shared-memory word holding `p`, or null when `p` is not in
// shared memory (static __shared__ variables or the launch's dynamic shared memory).
static unsigned short* pending_word(const void* p) {
    const unsigned char* byte = static_cast<const unsigned char*>(p);
    BlockState& s = state();
    if (+__start_gbemu_shared != +__stop_gbemu_shared && byte >= __start_gbemu_shared &&
        byte < __stop_gbemu_shared) {
        return &s.pending_static[(size_t)(byte - __start_gbemu_shared) / 4];
    }
    if (g.dynamic_shared && byte >= g.dynamic_shared && byte < g.dynamic_shared + dynamic_bytes()) {
        return &s.pending_dynamic[(size_t)(byte - g.dynamic_shared) / 4];
    }
    // A template's static __shared__ variable (g++ keeps it out of the section).
    const std::vector<OutsideShared>& outside = outside_shared();
    for (size_t i = 0; i < outside.size(); ++i) {
        const OutsideShared& v = outside[i];
        if (byte >= v.begin && byte < v.begin + v.bytes) {
            if (s.pending_outside.size() < outside.size()) s.pending_outside.resize(outside.size());
            std::vector<unsigned short>& words = s.pending_outside[i];
            if (words.empty()) words.assign(v.bytes / 4 + 1, 0);
            return &words[(size_t)(byte - v.begin) / 4];
        }
    }
    return nullptr;
}

static inline int thread_index() {
    const Fiber& f = current_fiber();
    return (int)(f.tid.x + blockDim.x * (f.tid.y + blockDim.y * f.tid.z));
}

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: src_size bytes are copied,
// the rest of the cp_size bytes are zero-filled.
static void cp_async(void* dst, const void* src, int cp_size, int src_size, const char* what) {
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
        trap("%s: cp-size %d is not 4, 8 or 16 bytes", what, cp_size);
    }
    if (src_size < 0 || src_size > cp_size) {
        trap("%s: src-size %d is outside [0, cp-size %d]", what, src_size, cp_size);
    }
    if (((uintptr_t)dst % (uintptr_t)cp_size) != 0 ||
        (src_size > 0 && ((uintptr_t)src % (uintptr_t)cp_size) != 0)) {
        trap("%s: misaligned address (shared %p, global %p): both must be multiples of the "
             "cp-size %d; on a GPU: misaligned address error",
             what, dst, src, cp_size);
    }
    if (!pending_word(dst) || !pending_word((unsigned char*)dst + cp_size - 1)) {
        trap("%s: destination %p is not in shared memory", what, dst);
    }
    BlockState& s = state();
    Copy copy;
    copy.dst = static_cast<unsigned char*>(dst);
    memset(copy.data, 0, sizeof(copy.data));
    if (src_size > 0) memcpy(copy.data, src, (size_t)src_size);
    copy.bytes = cp_size;
    copy.group = -1;
    // Until it lands, the destination reads as uninitialised shared memory.
    memset(dst, s.fill, (size_t)cp_size);
    for (int word = 0; word < cp_size; word += 4) ++*pending_word(copy.dst + word);
    s.threads[(size_t)thread_index()].copies.push_back(copy);
}

static void cp_async_commit() {
    ThreadCopies& mine = state().threads[(size_t)thread_index()];
    for (Copy& copy : mine.copies) {
        if (copy.group < 0) copy.group = mine.committed;
    }
    ++mine.committed;
}

// cp.async.wait_group n: every committed group but the n most recent has landed.
static void cp_async_wait(int most_recent_pending, const char* what) {
    BlockState& s = state();
    ThreadCopies& mine = s.threads[(size_t)thread_index()];
    const int retire_below = mine.committed - most_recent_pending;
    size_t kept = 0;
    for (size_t i = 0; i < mine.copies.size(); ++i) {
        Copy& copy = mine.copies[i];
        if (copy.group < 0 || copy.group >= retire_below) {
            mine.copies[kept++] = copy;
            continue;
        }
        for (int byte = 0; byte < copy.bytes; ++byte) {
            if (copy.dst[byte] != s.fill) {
                trap("%s: shared memory at %p was written while a cp.async to it was in "
                     "flight (a race on a GPU)",
                     what, (void*)(copy.dst + byte));
            }
        }
        memcpy(copy.dst, copy.data, (size_t)copy.bytes);
        for (int word = 0; word < copy.bytes; word += 4) --*pending_word(copy.dst + word);
    }
    mine.copies.resize(kept);
}

// ---- warp-collective instructions -------------------------------------------------------

// Publish `count` words for the lanes of this warp and wait for all 32 (the .aligned forms
// need the whole warp); returns the 32 lanes' words, valid until this lane's next-but-one
// collective instruction.
static const uint32_t (*publish(const uint32_t* mine, int count, const char* what))[8] {
    Fiber& f = current_fiber();
    Warp& w = g.warps[f.warp];
    if (w.exist != 0xffffffffu) {
        trap("%s needs all 32 lanes of a warp; warp %d of this block has only %d threads",
             what, f.warp, __builtin_popcount(w.exist));
    }
    BlockState& s = state();
    unsigned char& generation = s.generation[(size_t)thread_index()];
    uint32_t(*words)[8] = s.exchange[(size_t)f.warp].words[generation];
    generation ^= 1;
    memcpy(words[f.lane], mine, sizeof(uint32_t) * (size_t)count);
    warp_barrier(0xffffffffu, what);
    return words;
}

// D (16×8) = A (16×K) · B (K×8) + C, from the fragments of the 32 lanes.  ELEMENTS_PER_REG
// is 2 for bf16 (two per .b32 register, the lower index in the low half), 1 for tf32.  Lane l
// (group g = l/4, thread t = l%4) computes D rows g and g + 8, columns 2t and 2t + 1: it reads
// those rows of A from the four lanes of group g and those columns of B from the lanes of
// groups 2t and 2t + 1, placed by the ISA's fragment tables.
template <int K, int ELEMENTS_PER_REG>
static void mma_m16n8(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                      const char* what) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const uint32_t(*lanes)[8] = publish(mine, 6, what);
    const int lane = current_fiber().lane;
    const int group = lane >> 2, in_group = lane & 3;
    float A[2][K], B[K][2];  // A rows group, group + 8; B columns 2 in_group, 2 in_group + 1
    for (int source_thread = 0; source_thread < 4; ++source_thread) {
        const uint32_t* other = lanes[4 * group + source_thread];  // a[0..3], b[0..1]
        for (int r = 0; r < 4; ++r) {
            const uint32_t word = other[r];
            const int half = r & 1;  // row group + 8 (r & 1)
            if (ELEMENTS_PER_REG == 2) {  // bf16: a_{2r}, a_{2r+1}
                const int col = 2 * source_thread + 8 * (r >> 1);
                A[half][col] = bf16_value((uint16_t)(word & 0xffffu));
                A[half][col + 1] = bf16_value((uint16_t)(word >> 16));
            } else {  // tf32: a_r
                A[half][source_thread + 4 * (r >> 1)] = tf32_value(word);
            }
        }
    }
    for (int column = 0; column < 2; ++column) {
        const int source_group = 2 * in_group + column;  // B column n lives in group n
        for (int source_thread = 0; source_thread < 4; ++source_thread) {
            const uint32_t* other = lanes[4 * source_group + source_thread];
            for (int r = 0; r < 2; ++r) {
                const uint32_t word = other[4 + r];
                if (ELEMENTS_PER_REG == 2) {  // b_{2r}, b_{2r+1}: k = 2 thread + 8 r (+1)
                    const int k = 2 * source_thread + 8 * r;
                    B[k][column] = bf16_value((uint16_t)(word & 0xffffu));
                    B[k + 1][column] = bf16_value((uint16_t)(word >> 16));
                } else {  // b_r: k = thread + 4 r
                    B[source_thread + 4 * r][column] = tf32_value(word);
                }
            }
        }
    }
    float out[4];
    for (int i = 0; i < 4; ++i) {  // c_i: row group + 8 (i / 2), column 2 in_group + i % 2
        float sum = c[i];
        for (int k = 0; k < K; ++k) sum += A[i >> 1][k] * B[k][i & 1];  // exact products
        out[i] = sum;
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

static void mma_bf16_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                              const float c[4]) {
    mma_m16n8<16, 2>(d, a, b, c, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
}

static void mma_tf32_m16n8k8(float d[4], const uint32_t a[4], const uint32_t b[2],
                             const float c[4]) {
    mma_m16n8<8, 1>(d, a, b, c, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
}

// A row address of ldmatrix: 16-byte aligned, in shared memory, with no copy in flight on the
// `bytes` bytes this lane reads at `offset`.
static void check_ldmatrix_read(const unsigned char* row, int source_lane, int offset, int bytes,
                                const char* what) {
    if (((uintptr_t)row & 15u) != 0) {
        trap("%s: lane %d gives row address %p, which is not 16-byte aligned; on a GPU: "
             "misaligned address error",
             what, source_lane, (const void*)row);
    }
    unsigned short* pending = pending_word(row + offset);
    if (!pending) {
        trap("%s: lane %d gives row address %p, which is not in shared memory", what,
             source_lane, (const void*)row);
    }
    if (*pending != 0 || (bytes > 4 && *pending_word(row + offset + bytes - 1) != 0)) {
        trap("%s reads shared memory at %p before the cp.async that writes it has landed "
             "(cp.async.wait_group, then a barrier, must come first)",
             what, (const void*)(row + offset));
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the 8 row addresses
// (16 bytes each) of matrix i; r[i] of lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 of
// matrix i, or with .trans, element l/4 of rows 2(l%4) and 2(l%4)+1 (the lower one in the low
// half).
template <bool TRANS>
static void ldmatrix_x4(uint32_t r[4], const void* row_address) {
    const char* what = TRANS ? "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"
                             : "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
    uint32_t mine[2];
    memcpy(mine, &row_address, sizeof(row_address));
    const uint32_t(*lanes)[8] = publish(mine, 2, what);
    auto row_of = [&](int source) {
        const unsigned char* row;
        memcpy(&row, lanes[source], sizeof(row));
        return row;
    };
    const int lane = current_fiber().lane;
    uint32_t out[4];
    for (int i = 0; i < 4; ++i) {
        if (!TRANS) {
            const int source = 8 * i + lane / 4;
            const unsigned char* row = row_of(source);
            check_ldmatrix_read(row, source, 4 * (lane % 4), 4, what);
            memcpy(&out[i], row + 4 * (lane % 4), 4);
        } else {
            uint16_t halves[2];
            for (int j = 0; j < 2; ++j) {
                const int source = 8 * i + 2 * (lane % 4) + j;
                const unsigned char* row = row_of(source);
                check_ldmatrix_read(row, source, 2 * (lane / 4), 2, what);
                memcpy(&halves[j], row + 2 * (lane / 4), 2);
            }
            out[i] = (uint32_t)halves[0] | ((uint32_t)halves[1] << 16);
        }
    }
    for (int i = 0; i < 4; ++i) r[i] = out[i];
}

}  // namespace ptx
}  // namespace gbemu

#endif  // GBEMU_PTX_TWINS_H
