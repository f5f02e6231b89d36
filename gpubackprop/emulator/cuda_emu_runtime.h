// cuda_emu_runtime.h: the block/fiber scheduler behind cuda_emu.h.
//
// A launch runs the blocks of the grid one after another.  The threads of a block are fibers on
// the calling OS thread, each with its own stack; a fiber runs until it reaches a barrier, then
// switches back to the scheduler, which resumes the next runnable fiber (in thread order, or in
// a shuffled order per pass when a shuffle seed is given, to expose races between barriers).
//   __syncthreads()  releases when every thread of the block has arrived; if every live thread
//                    waits and some have exited, that is reported (a GPU would hang or misbehave).
//   warp barriers    (__syncwarp, shuffles, votes) release when every lane of the mask that
//                    exists in the block has arrived; lanes that exited are reported likewise.
// The context switch is a few instructions of x86-64 assembly (callee-saved registers + stack
// pointer); elsewhere, or with GBEMU_USE_UCONTEXT defined, POSIX ucontext (a system call per
// switch, about 10x slower).
#ifndef GBEMU_CUDA_EMU_RUNTIME_H
#define GBEMU_CUDA_EMU_RUNTIME_H

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdlib>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) && !defined(GBEMU_USE_UCONTEXT)
#define GBEMU_ASM_SWITCH 1
#else
#define GBEMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#ifndef GBEMU_STACK_SIZE
#define GBEMU_STACK_SIZE (256 * 1024)  // per fiber; untouched pages cost no memory
#endif

#if GBEMU_ASM_SWITCH
// gbemu_switch_context(save, load): push the callee-saved registers, store the stack pointer in
// *save, load `load` as the stack pointer, pop the registers saved there and return into it.
extern "C" __attribute__((visibility("hidden"))) void gbemu_switch_context(void** save,
                                                                          void* load);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl gbemu_switch_context\n"
    ".hidden gbemu_switch_context\n"
    ".type gbemu_switch_context,@function\n"
    "gbemu_switch_context:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size gbemu_switch_context, .-gbemu_switch_context\n");
#endif

// Bounds of the static __shared__ section, defined by the linker (null when there is none).
extern "C" unsigned char __start_gbemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_gbemu_shared[] __attribute__((weak, visibility("hidden")));

namespace gbemu {

enum FiberState { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE, TRAPPED };
enum ShuffleMode { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };

struct Fiber {
#if GBEMU_ASM_SWITCH
    void* sp;
#else
    ucontext_t context;
#endif
    int state;
    uint3 tid;
    int warp;
    int lane;
};

struct Warp {
    unsigned int exist;    // lanes that exist in the block
    unsigned int mask;     // participants of the barrier being gathered
    unsigned int arrived;  // lanes of `mask` that have arrived
    const char* what;      // the call that gathers them
    unsigned long long slot[32];
};

struct State {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<int> order;
    char* stacks = nullptr;
    size_t stack_count = 0;
    size_t stack_stride = 0;
    std::vector<unsigned char> dynamic_shared_storage;
    unsigned char* dynamic_shared = nullptr;
    int nthreads = 0;
    int current = 0;
    int done = 0;
    int block_arrived = 0;
    int block_kind = 0;
    unsigned int block_generation = 0;
    int block_result[2] = {0, 0};
    bool failed = false;
    char message[2048];
    void (*body)(void*) = nullptr;
    void* body_context = nullptr;
#if GBEMU_ASM_SWITCH
    void* scheduler_sp = nullptr;
#else
    ucontext_t scheduler_context;
#endif
};
static State g;

static inline unsigned char* dynamic_shared() { return g.dynamic_shared; }

static inline void yield_to_scheduler() {
    Fiber& f = g.fibers[g.current];
#if GBEMU_ASM_SWITCH
    gbemu_switch_context(&f.sp, g.scheduler_sp);
#else
    swapcontext(&f.context, &g.scheduler_context);
#endif
    // Shared memory written by other fibers is visible after this point.
    __asm__ __volatile__("" ::: "memory");
}

static inline void resume(int index) {
    g.current = index;
    Fiber& f = g.fibers[index];
    threadIdx = f.tid;
#if GBEMU_ASM_SWITCH
    gbemu_switch_context(&g.scheduler_sp, f.sp);
#else
    swapcontext(&g.scheduler_context, &f.context);
#endif
}

static void fiber_entry() {
    g.body(g.body_context);
    Fiber& f = g.fibers[g.current];
    f.state = DONE;
    ++g.done;
    yield_to_scheduler();
    __builtin_trap();  // a finished fiber is never resumed
}

static void init_fiber(int index) {
    Fiber& f = g.fibers[index];
    char* base = g.stacks + (size_t)index * g.stack_stride + (size_t)sysconf(_SC_PAGESIZE);
    size_t size = g.stack_stride - (size_t)sysconf(_SC_PAGESIZE);
#if GBEMU_ASM_SWITCH
    uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
    uintptr_t* sp = (uintptr_t*)top;
    *--sp = 0;                            // fiber_entry's (never used) return address
    *--sp = (uintptr_t)&fiber_entry;      // popped by `ret`: entered with rsp % 16 == 8
    for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = base;
    f.context.uc_stack.ss_size = size;
    f.context.uc_link = nullptr;
    makecontext(&f.context, (void (*)())fiber_entry, 0);
#endif
    f.state = RUNNABLE;
}

static inline Fiber& current_fiber() { return g.fibers[g.current]; }

// Stop the launch with a message; the calling fiber is never resumed.
[[noreturn]] static void trap_message(const char* message) {
    Fiber& f = current_fiber();
    snprintf(g.message, sizeof(g.message), "thread (%u,%u,%u): %s", f.tid.x, f.tid.y, f.tid.z,
             message);
    g.failed = true;
    f.state = TRAPPED;
    yield_to_scheduler();
    __builtin_trap();
}

[[noreturn]] __attribute__((format(printf, 1, 2))) static void trap(const char* format, ...) {
    char text[1536];
    va_list list;
    va_start(list, format);
    vsnprintf(text, sizeof(text), format, list);
    va_end(list);
    trap_message(text);
}

[[noreturn]] static void assert_fail(const char* expr, const char* file, int line) {
    trap("assertion `%s` failed at %s:%d", expr, file, line);
}

// kind: 0 plain, 1 count, 2 and, 3 or.  Returns the reduced predicate.
static int block_barrier(int kind, int pred) {
    Fiber& f = current_fiber();
    unsigned int generation = g.block_generation;
    int parity = (int)(generation & 1u);
    if (g.block_arrived == 0) {
        g.block_kind = kind;
        g.block_result[parity] = kind == 2 ? 1 : 0;
    } else if (g.block_kind != kind) {
        static const char* names[] = {"__syncthreads", "__syncthreads_count",
                                      "__syncthreads_and", "__syncthreads_or"};
        trap("%s() meets %s() at the same block barrier", names[kind], names[g.block_kind]);
    }
    if (kind == 1) g.block_result[parity] += pred;
    if (kind == 2) g.block_result[parity] &= pred;
    if (kind == 3) g.block_result[parity] |= pred;
    f.state = AT_BLOCK_BARRIER;
    if (++g.block_arrived == g.nthreads) {
        for (int i = 0; i < g.nthreads; ++i) g.fibers[i].state = RUNNABLE;
        g.block_arrived = 0;
        ++g.block_generation;
    }
    yield_to_scheduler();
    return g.block_result[parity];
}

static inline unsigned int warp_exist_mask() { return g.warps[current_fiber().warp].exist; }

static void warp_barrier(unsigned int mask, const char* what) {
    Fiber& f = current_fiber();
    Warp& w = g.warps[f.warp];
    unsigned int bit = 1u << f.lane;
    unsigned int members = mask & w.exist;  // lanes beyond a partial last warp do not exist
    if (!(members & bit)) {
        trap("%s(mask=0x%08x) is called by lane %d, which the mask leaves out", what, mask,
             f.lane);
    }
    if (w.arrived == 0) {
        w.mask = members;
        w.what = what;
    } else if (w.mask != members) {
        trap("lanes of warp %d meet at %s(mask=0x%08x) and %s(mask=0x%08x); the emulator "
             "gathers one group of lanes per warp at a time",
             f.warp, w.what, w.mask, what, members);
    }
    w.arrived |= bit;
    f.state = AT_WARP_BARRIER;
    if (w.arrived == w.mask) {
        for (int lane = 0; lane < 32; ++lane) {
            if (w.mask & (1u << lane)) g.fibers[f.warp * 32 + lane].state = RUNNABLE;
        }
        w.arrived = 0;
    }
    yield_to_scheduler();
}

template <class T>
static T warp_exchange(unsigned int mask, T value, int mode, int arg, int width,
                       const char* what) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    Fiber& f = current_fiber();
    Warp& w = g.warps[f.warp];
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        trap("%s: width %d is not a power of two in [1, 32]", what, width);
    }
    const int lane = f.lane;
    unsigned long long bits = 0;
    memcpy(&bits, &value, sizeof(T));
    w.slot[lane] = bits;
    warp_barrier(mask, what);
    const int segment = lane & ~(width - 1);
    int source = lane;
    if (mode == SHFL_IDX) {
        source = segment + (arg & (width - 1));
    } else if (mode == SHFL_UP) {
        source = (lane - segment) >= arg ? lane - arg : lane;
    } else if (mode == SHFL_DOWN) {
        source = (lane - segment) + arg < width ? lane + arg : lane;
    } else {
        source = lane ^ arg;
        if (source < segment || source >= segment + width) source = lane;
    }
    const unsigned int members = mask & w.exist;
    if (!(members & (1u << source))) {
        trap("%s: lane %d reads lane %d, which is not in the mask 0x%08x or not in the block "
             "(its value is undefined on a GPU)",
             what, lane, source, mask);
    }
    T out;
    memcpy(&out, &w.slot[source], sizeof(T));
    warp_barrier(mask, what);  // nobody republishes before every lane has read
    return out;
}

static unsigned int warp_vote(unsigned int mask, int pred, const char* what) {
    Fiber& f = current_fiber();
    Warp& w = g.warps[f.warp];
    w.slot[f.lane] = pred != 0;
    warp_barrier(mask, what);
    unsigned int members = mask & w.exist;
    unsigned int ballot = 0;
    for (int lane = 0; lane < 32; ++lane) {
        if ((members & (1u << lane)) && w.slot[lane]) ballot |= 1u << lane;
    }
    warp_barrier(mask, what);
    return ballot;
}

static unsigned int active_mask() {
    Fiber& f = current_fiber();
    unsigned int exist = g.warps[f.warp].exist, mask = 0;
    for (int lane = 0; lane < 32; ++lane) {
        if ((exist & (1u << lane)) && g.fibers[f.warp * 32 + lane].state != DONE) {
            mask |= 1u << lane;
        }
    }
    return mask;
}

static void ensure_stacks(size_t count) {
    if (count <= g.stack_count) return;
    if (g.stacks) munmap(g.stacks, g.stack_count * g.stack_stride);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    g.stack_stride = ((size_t)GBEMU_STACK_SIZE + page - 1) / page * page + page;
    void* memory = mmap(nullptr, count * g.stack_stride, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
        g.stacks = nullptr;
        g.stack_count = 0;
        return;
    }
    g.stacks = (char*)memory;
    g.stack_count = count;
    // A guard page below each stack: an overflow faults instead of corrupting a neighbour.
    for (size_t i = 0; i < count; ++i) mprotect(g.stacks + i * g.stack_stride, page, PROT_NONE);
}

static inline unsigned long long next_random(unsigned long long& state) {
    unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Every live thread is blocked: say who waits where and who is missing.
static void describe_deadlock(char* out, size_t size) {
    int at_block = 0, first_block = -1, first_done = -1, first_warp_wait = -1;
    for (int i = 0; i < g.nthreads; ++i) {
        const Fiber& f = g.fibers[i];
        if (f.state == AT_BLOCK_BARRIER && at_block++ == 0) first_block = i;
        if (f.state == DONE && first_done < 0) first_done = i;
        if (f.state == AT_WARP_BARRIER && first_warp_wait < 0) first_warp_wait = i;
    }
    auto tid = [](int i) { return g.fibers[i].tid; };
    if (first_warp_wait >= 0) {
        const Fiber& f = g.fibers[first_warp_wait];
        const Warp& w = g.warps[f.warp];
        unsigned int missing = w.mask & ~w.arrived;
        int exited = 0, at_sync = 0;
        for (int lane = 0; lane < 32; ++lane) {
            if (!(missing & (1u << lane))) continue;
            int state = g.fibers[f.warp * 32 + lane].state;
            exited += state == DONE;
            at_sync += state == AT_BLOCK_BARRIER;
        }
        snprintf(out, size,
                 "warp %d waits in %s(mask=0x%08x) for lanes 0x%08x that never arrive "
                 "(%d of them have exited, %d wait at __syncthreads()); a GPU would hang or "
                 "misbehave",
                 f.warp, w.what, w.mask, missing, exited, at_sync);
        return;
    }
    if (first_block >= 0 && first_done >= 0) {
        snprintf(out, size,
                 "__syncthreads() is not reached by every thread of the block: %d threads wait "
                 "there (first: thread (%u,%u,%u)) while %d have exited (first: thread "
                 "(%u,%u,%u)); a GPU would hang or misbehave",
                 at_block, tid(first_block).x, tid(first_block).y, tid(first_block).z, g.done,
                 tid(first_done).x, tid(first_done).y, tid(first_done).z);
        return;
    }
    snprintf(out, size, "no thread of the block can proceed (%d at __syncthreads, %d exited)",
             at_block, g.done);
}

// Runs the whole grid.  Returns 0, or 1 with a message in `error`.
static int run_grid(const long long* dims, long long shared_bytes, unsigned long long seed,
                    char* error, int error_size, void (*body)(void*), void* context) {
    const unsigned int grid_x = (unsigned int)dims[0], grid_y = (unsigned int)dims[1],
                       grid_z = (unsigned int)dims[2];
    const unsigned int block_x = (unsigned int)dims[3], block_y = (unsigned int)dims[4],
                       block_z = (unsigned int)dims[5];
    const int nthreads = (int)(block_x * block_y * block_z);
    error[0] = 0;
    g.nthreads = nthreads;
    g.fibers.resize(nthreads);
    g.order.resize(nthreads);
    const int nwarps = (nthreads + 31) / 32;
    g.warps.assign(nwarps, Warp());
    for (int w = 0; w < nwarps; ++w) {
        int lanes = nthreads - 32 * w < 32 ? nthreads - 32 * w : 32;
        g.warps[w].exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    for (int i = 0; i < nthreads; ++i) {
        Fiber& f = g.fibers[i];
        f.tid = make_uint3(i % block_x, (i / block_x) % block_y, i / (block_x * block_y));
        f.warp = i / 32;
        f.lane = i % 32;
        g.order[i] = i;
    }
    ensure_stacks((size_t)nthreads);
    if (g.stack_count < (size_t)nthreads) {
        snprintf(error, error_size, "could not map fiber stacks for %d threads", nthreads);
        return 1;
    }
    g.dynamic_shared_storage.resize((size_t)shared_bytes + 256);
    g.dynamic_shared = (unsigned char*)(((uintptr_t)g.dynamic_shared_storage.data() + 255) &
                                        ~(uintptr_t)255);
    g.body = body;
    g.body_context = context;
    g.failed = false;
    gridDim = dim3(grid_x, grid_y, grid_z);
    blockDim = dim3(block_x, block_y, block_z);
    unsigned long long random_state = seed;
    for (unsigned int bz = 0; bz < grid_z; ++bz)
        for (unsigned int by = 0; by < grid_y; ++by)
            for (unsigned int bx = 0; bx < grid_x; ++bx) {
                blockIdx = make_uint3(bx, by, bz);
                // Shared memory is uninitialised on a GPU: NaN bytes make a read-before-write
                // visible in the result.
                if (shared_bytes > 0) memset(g.dynamic_shared, 0xFF, (size_t)shared_bytes);
                if (__start_gbemu_shared != __stop_gbemu_shared) {
                    memset(__start_gbemu_shared, 0xFF,
                           (size_t)(__stop_gbemu_shared - __start_gbemu_shared));
                }
                for (int i = 0; i < nthreads; ++i) init_fiber(i);
                for (int w = 0; w < nwarps; ++w) g.warps[w].arrived = 0;
                g.done = 0;
                g.block_arrived = 0;
                while (g.done < nthreads) {
                    if (seed != 0) {
                        for (int i = nthreads - 1; i > 0; --i) {
                            int j = (int)(next_random(random_state) % (unsigned long long)(i + 1));
                            std::swap(g.order[i], g.order[j]);
                        }
                    }
                    bool ran = false;
                    for (int k = 0; k < nthreads && !g.failed; ++k) {
                        int i = g.order[k];
                        if (g.fibers[i].state != RUNNABLE) continue;
                        resume(i);
                        ran = true;
                    }
                    if (g.failed) {
                        snprintf(error, error_size, "block (%u,%u,%u) %s", bx, by, bz,
                                 g.message);
                        return 1;
                    }
                    if (!ran) {
                        char text[1536];
                        describe_deadlock(text, sizeof(text));
                        snprintf(error, error_size, "block (%u,%u,%u): %s", bx, by, bz, text);
                        return 1;
                    }
                }
            }
    return 0;
}

template <class F> static void invoke_body(void* context) { (*static_cast<F*>(context))(); }

template <class... A, size_t... I>
static int launch_with(void (*kernel)(A...), std::index_sequence<I...>, const long long* dims,
                       long long shared_bytes, void** args, unsigned long long seed,
                       char* error, int error_size) {
    (void)args;
    std::tuple<A...> values(*static_cast<A*>(args[I])...);
    auto call = [&]() { kernel(std::get<I>(values)...); };
    return run_grid(dims, shared_bytes, seed, error, error_size, &invoke_body<decltype(call)>,
                    &call);
}

template <class... A>
static int launch(void (*kernel)(A...), const long long* dims, long long shared_bytes,
                  void** args, unsigned long long seed, char* error, int error_size) {
    return launch_with(kernel, std::index_sequence_for<A...>{}, dims, shared_bytes, args, seed,
                       error, error_size);
}

// Parameter types as the compiler sees them (real_t and typedefs resolved), for the checks in
// launch.py: "p" pointer or "s" scalar, "c" const pointee or "m" mutable, then a NumPy-like
// code: f4 f8 i4 i8 u4 ... b1 (bool), v0 (void), x<size> (a struct).
template <class T> static void append_type_code(char* out, size_t size) {
    typedef typename std::remove_cv<T>::type U;
    char code[32];
    if constexpr (std::is_same<U, bool>::value) {
        snprintf(code, sizeof(code), "b1");
    } else if constexpr (std::is_floating_point<U>::value) {
        snprintf(code, sizeof(code), "f%zu", sizeof(U));
    } else if constexpr (std::is_integral<U>::value) {
        snprintf(code, sizeof(code), "%c%zu", std::is_signed<U>::value ? 'i' : 'u', sizeof(U));
    } else if constexpr (std::is_void<U>::value) {
        snprintf(code, sizeof(code), "v0");
    } else {
        snprintf(code, sizeof(code), "x%zu", sizeof(U));
    }
    size_t used = strlen(out);
    snprintf(out + used, size - used, "%s", code);
}

template <class T> static void append_param(char* out, size_t size) {
    size_t used = strlen(out);
    if constexpr (std::is_pointer<T>::value) {
        typedef typename std::remove_pointer<T>::type P;
        snprintf(out + used, size - used, "%sp%c", used ? " " : "",
                 std::is_const<P>::value ? 'c' : 'm');
        append_type_code<P>(out, size);
    } else {
        snprintf(out + used, size - used, "%ss-", used ? " " : "");
        append_type_code<T>(out, size);
    }
}

template <class... A> static const char* signature(void (*)(A...)) {
    static char text[2048];
    text[0] = 0;
    (append_param<A>(text, sizeof(text)), ...);
    return text;
}

}  // namespace gbemu

#endif  // GBEMU_CUDA_EMU_RUNTIME_H
