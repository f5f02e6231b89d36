// cuda_emu_runtime.h: the block/fiber scheduler behind cuda_emu.h.
//
// A launch runs the blocks of the grid one after another (in blockIdx order, or with a shuffle
// seed in a random order: a GPU promises none, and a kernel that assumes one, e.g. that the
// highest blockIdx finishes last, shows it).  The threads of a block are fibers on
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
//
// Faults.  Where a GPU stops the kernel with an error, the emulator must not take the Python
// process down with it.  During a launch, SIGSEGV, SIGBUS, SIGFPE and SIGILL are handled on an
// alternate signal stack (so that a fiber stack overflow can be handled too): the handler
// records the signal, address, block and thread and siglongjmps back to run_grid on the calling
// thread's own stack, which abandons every fiber of the launch and returns an error.  The
// previous handlers and alternate stack (Python's faulthandler) are restored after each launch.
// Misaligned vector accesses need not fault on x86-64 (g++ splits a float4 load into four scalar
// loads): the vector types of cuda_emu.h check the alignment in their copy constructor and
// assignment, and misaligned_vector() below stops the launch with the type, address and line.
#ifndef GBEMU_CUDA_EMU_RUNTIME_H
#define GBEMU_CUDA_EMU_RUNTIME_H

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
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

// Stack per fiber, in KiB: $GPUBACKPROP_EMU_STACK_KIB at each launch, else this.  Untouched
// pages cost no memory.
#ifndef GBEMU_STACK_KIB
#define GBEMU_STACK_KIB 256
#endif
// PROT_NONE bytes below each fiber stack; one page is enough because -fstack-clash-protection
// probes every page of a big frame.  (64 KiB measured 20% slower on the tiled SGEMM: a stride
// with no low bits set maps every fiber's stack top to the same cache sets.)
#define GBEMU_STACK_GUARD 4096

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
    std::vector<unsigned long long> block_order;  // linear block numbers, when shuffled
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
    int flush_denormals = 0;                // set by gbemu_set_flush_denormals before a launch
    unsigned long long saved_fp_control = 0;  // the caller's MXCSR/FPCR, restored after it
    char message[2048];
    void (*body)(void*) = nullptr;
    void* body_context = nullptr;
    unsigned long long block_serial = 0;  // counts blocks run, for per-block state (ptx_twins.h)
    int shared_fill = 0xFF;  // the byte uninitialised shared memory holds in this launch
#if GBEMU_ASM_SWITCH
    void* scheduler_sp = nullptr;
#else
    ucontext_t scheduler_context;
#endif
    size_t stack_kib = 0;    // usable stack per fiber of the current mapping
    size_t stack_guard = 0;  // guard bytes below each stack
    // Fault handling (see the top of this file).  Written by the signal handler.
    volatile sig_atomic_t in_launch = 0;
    volatile sig_atomic_t in_fiber = 0;
    pthread_t launch_thread;
    sigjmp_buf fault_jump;
    volatile int fault_signal = 0;
    volatile int fault_code = 0;
    void* volatile fault_address = nullptr;
    struct sigaction previous_action[4];
    stack_t previous_altstack;
    void* altstack = nullptr;
};
static State g;

static const int fault_signals[4] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};

static inline unsigned char* dynamic_shared() { return g.dynamic_shared; }

// The dynamic shared buffer is reserved once at its largest size, so its address never changes:
// `extern __shared__ T name[];` (GBEMU_EXTERN_SHARED) is a constant pointer to it, even at file
// scope.  228 KiB: the most a block of any GPU can opt in to.
#ifndef GBEMU_MAX_DYNAMIC_SHARED
#define GBEMU_MAX_DYNAMIC_SHARED (228 * 1024)
#endif
#define GBEMU_SHARED_GUARD 1024  // bytes checked past the end of the launch's dynamic shared memory
static unsigned char* dynamic_shared_base() {
    const size_t capacity = (size_t)GBEMU_MAX_DYNAMIC_SHARED + GBEMU_SHARED_GUARD + 256;
    if (g.dynamic_shared_storage.capacity() < capacity) g.dynamic_shared_storage.reserve(capacity);
    return (unsigned char*)(((uintptr_t)g.dynamic_shared_storage.data() + 255) & ~(uintptr_t)255);
}

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
    g.in_fiber = 1;
#if GBEMU_ASM_SWITCH
    gbemu_switch_context(&g.scheduler_sp, f.sp);
#else
    swapcontext(&g.scheduler_context, &f.context);
#endif
    g.in_fiber = 0;
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
    char* base = g.stacks + (size_t)index * g.stack_stride + g.stack_guard;
    size_t size = g.stack_stride - g.stack_guard;
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

// A whole-vector load or store (float4, double2, ...) at an address that is not a multiple of
// the type's alignment: the GPU's "misaligned address" error (the check is in cuda_emu.h).
// `file` is null for an assignment, whose operator cannot take the caller's line.
static void misaligned_vector(const void* address, unsigned int alignment, const char* type,
                              const char* access, const char* file, unsigned int line) {
    if (!g.in_fiber) return;  // the emulator's own code, which never gets here
    char where[512];
    if (file) {
        snprintf(where, sizeof(where), "at %s:%u", file, line);
    } else {
        snprintf(where, sizeof(where), "in an assignment (`p[i] = v;`)");
    }
    trap("misaligned address %p: %s %s, which needs %u-byte alignment (address %% %u = %u), "
         "%s; on a GPU: misaligned address error",
         address, access, type, alignment, alignment,
         (unsigned int)((uintptr_t)address & (alignment - 1)), where);
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

// The byte uninitialised shared memory holds: $GBEMU_SHARED_FILL (two hex digits, set by
// launch.py for its guard-check run), else 0xFF (NaN for every float).
static int shared_fill_byte() {
    const char* text = getenv("GBEMU_SHARED_FILL");
    if (!text || !*text) return 0xFF;
    return (int)(strtol(text, nullptr, 16) & 0xFF);
}

// A function-scope static __shared__ variable outside the gbemu_shared section: g++ drops the
// section attribute of a template's static locals (they become unique symbols in .bss), so
// the per-block refill of the section misses them.  compiler.py puts GBEMU_FILL_SHARED(name)
// after each function-scope declaration: the first thread of a block to reach it fills the
// variable like the section (later threads of the block, which may already have written it,
// leave it alone), so a template's shared memory is as uninitialised as any other's.
// The variables outside the section that fill_static_shared has seen (a handful): shared
// memory too, for the cp.async twins' tracking of copies in flight (ptx_twins.h).
struct OutsideShared {
    unsigned char* begin;
    size_t bytes;
    unsigned long long block;  // the block_serial of its last fill
};
static std::vector<OutsideShared>& outside_shared() {
    static std::vector<OutsideShared> variables;
    return variables;
}

static void fill_static_shared(void* address, size_t bytes) {
    unsigned char* p = (unsigned char*)address;
    if (+__start_gbemu_shared != +__stop_gbemu_shared && p >= __start_gbemu_shared &&
        p < __stop_gbemu_shared) {
        return;  // in the section: refilled before every block already
    }
    for (OutsideShared& v : outside_shared()) {
        if (v.begin == p) {
            if (v.block == g.block_serial) return;
            v.block = g.block_serial;
            memset(p, g.shared_fill, bytes);
            return;
        }
    }
    outside_shared().push_back({p, bytes, g.block_serial});
    memset(p, g.shared_fill, bytes);
}

// $GPUBACKPROP_EMU_STACK_KIB, else GBEMU_STACK_KIB; 0 if the variable is not a number in
// [16, 1048576] (launch.py checks it first and names it).
static size_t stack_kib_setting() {
    const char* text = getenv("GPUBACKPROP_EMU_STACK_KIB");
    if (!text || !*text) return GBEMU_STACK_KIB;
    char* end = nullptr;
    long long value = strtoll(text, &end, 10);
    if (*end != 0 || value < 16 || value > 1048576) return 0;
    return (size_t)value;
}

// Stacks for `count` fibers of `kib` KiB each, with a PROT_NONE guard zone below each one: an
// overflow faults (and is reported) instead of corrupting the neighbouring fiber's stack.
static void ensure_stacks(size_t count, size_t kib) {
    if (count <= g.stack_count && kib == g.stack_kib) return;
    if (g.stacks) munmap(g.stacks, g.stack_count * g.stack_stride);
    if (count < g.stack_count) count = g.stack_count;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    g.stack_guard = ((size_t)GBEMU_STACK_GUARD + page - 1) / page * page;
    g.stack_stride = (kib * 1024 + page - 1) / page * page + g.stack_guard;
    void* memory = mmap(nullptr, count * g.stack_stride, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
        g.stacks = nullptr;
        g.stack_count = 0;
        g.stack_kib = 0;
        return;
    }
    g.stacks = (char*)memory;
    g.stack_count = count;
    g.stack_kib = kib;
    for (size_t i = 0; i < count; ++i) {
        mprotect(g.stacks + i * g.stack_stride, g.stack_guard, PROT_NONE);
    }
}

// ---- fault handling -----------------------------------------------------------------------

static void fault_handler(int signal, siginfo_t* info, void* context) {
    (void)context;
    if (!g.in_launch || !pthread_equal(pthread_self(), g.launch_thread)) {
        // Not ours (another thread): give the signal back to whoever handled it before.  The
        // faulting instruction runs again and faults into the previous handler.
        for (int i = 0; i < 4; ++i) sigaction(fault_signals[i], &g.previous_action[i], nullptr);
        if (info->si_code <= 0) raise(signal);  // sent, not a fault: delivered on return
        return;
    }
    g.fault_signal = signal;
    g.fault_code = info->si_code;
    g.fault_address = info->si_addr;
    siglongjmp(g.fault_jump, 1);
}

// Returns false (with a message) if the handlers could not be installed.
static bool install_fault_handlers(char* error, int error_size) {
    const size_t altstack_size = 256 * 1024;  // more than SIGSTKSZ: the handler is small
    if (!g.altstack) {
        void* memory = mmap(nullptr, altstack_size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) {
            snprintf(error, error_size, "could not map an alternate signal stack");
            return false;
        }
        g.altstack = memory;
    }
    stack_t stack;
    stack.ss_sp = g.altstack;
    stack.ss_size = altstack_size;
    stack.ss_flags = 0;
    if (sigaltstack(&stack, &g.previous_altstack) != 0) {
        snprintf(error, error_size, "sigaltstack failed");
        return false;
    }
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = &fault_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 4; ++i) sigaction(fault_signals[i], &action, &g.previous_action[i]);
    g.launch_thread = pthread_self();
    g.in_fiber = 0;
    g.in_launch = 1;
    return true;
}

static void restore_fault_handlers() {
    g.in_launch = 0;
    g.in_fiber = 0;
    for (int i = 0; i < 4; ++i) sigaction(fault_signals[i], &g.previous_action[i], nullptr);
    sigaltstack(&g.previous_altstack, nullptr);
}

static const char* signal_name(int signal) {
    switch (signal) {
        case SIGSEGV: return "SIGSEGV (segmentation fault)";
        case SIGBUS: return "SIGBUS (bus error)";
        case SIGFPE: return "SIGFPE (arithmetic exception)";
        case SIGILL: return "SIGILL (illegal instruction)";
        default: return "an unexpected signal";
    }
}

// The message for the fault recorded by fault_handler; `block` is the running block,
// `in_fiber` whether kernel code (the current fiber) was running.
static void describe_fault(char* out, size_t size, uint3 block, bool in_fiber) {
    const uintptr_t address = (uintptr_t)g.fault_address;
    int overflow = -1;  // the fiber whose guard zone holds the address
    if (g.stacks && g.fault_signal == SIGSEGV) {
        const uintptr_t start = (uintptr_t)g.stacks;
        if (address >= start && address < start + g.stack_count * g.stack_stride &&
            (address - start) % g.stack_stride < g.stack_guard) {
            overflow = (int)((address - start) / g.stack_stride);
        }
    }
    char where[160];
    if (in_fiber) {
        const Fiber& f = current_fiber();
        snprintf(where, sizeof(where), "block (%u,%u,%u) thread (%u,%u,%u)", block.x, block.y,
                 block.z, f.tid.x, f.tid.y, f.tid.z);
    } else {
        snprintf(where, sizeof(where),
                 "block (%u,%u,%u), in the emulator's scheduler rather than in a thread",
                 block.x, block.y, block.z);
    }
    char at[96];
    if (g.fault_signal == SIGSEGV && g.fault_code == SI_KERNEL) {
        // A general-protection fault reports no address: a misaligned SSE access (movaps) or
        // a pointer outside the canonical address range.
        snprintf(at, sizeof(at), "at an address the CPU does not report (general protection)");
    } else if (g.fault_signal == SIGFPE || g.fault_signal == SIGILL) {
        snprintf(at, sizeof(at), "at instruction 0x%lx", (unsigned long)address);
    } else if (overflow >= 0) {
        snprintf(at, sizeof(at), "at 0x%lx, in the guard page below fiber %d's stack",
                 (unsigned long)address, overflow);
    } else {
        snprintf(at, sizeof(at), "at address 0x%lx", (unsigned long)address);
    }
    char hint[320];
    if (overflow >= 0) {
        snprintf(hint, sizeof(hint),
                 "fiber stack overflow: the kernel uses more than %zu KiB of stack per thread "
                 "(GPUBACKPROP_EMU_STACK_KIB to raise it); deep recursion or big local arrays",
                 g.stack_kib);
    } else if (g.fault_signal == SIGFPE) {
        snprintf(hint, sizeof(hint),
                 "integer division by zero (or INT_MIN / -1); a GPU gives an undefined value "
                 "instead");
    } else if (g.fault_signal == SIGILL) {
        snprintf(hint, sizeof(hint),
                 "an illegal instruction: __builtin_trap(), or code g++ proved undefined (a "
                 "null pointer dereference, a missing return value)");
    } else {
        snprintf(hint, sizeof(hint),
                 "%san out-of-bounds access beyond the guard zones, a null pointer, or a "
                 "misaligned vector (float2/float4/double2) access -- on a GPU: illegal or "
                 "misaligned address",
                 address < 4096 && g.fault_code != SI_KERNEL ? "a null pointer (address < 4096); "
                                                             : "");
    }
    snprintf(out, size, "%s: %s %s: %s; the launch was abandoned", where,
             signal_name(g.fault_signal), at, hint);
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

static int run_blocks(const long long* dims, long long shared_bytes, unsigned long long seed,
                      char* error, int error_size, void (*body)(void*), void* context);

// Flush-to-zero, as a GPU build with -ftz=true does for float32: subnormal results become zero
// (x86 MXCSR.FTZ, bit 15) and subnormal inputs read as zero (MXCSR.DAZ, bit 6); on AArch64 the
// FPCR.FZ bit does both.  The bits apply to double too, so launch.py turns them on only for
// kernels without a double parameter (the float32 builds), where a GPU flushes.  Every fiber
// runs on the launching OS thread, so setting the register around the launch covers them all.
#if defined(__x86_64__) || defined(__i386__)
static inline unsigned long long fp_control() {
    unsigned int csr;
    __asm__ __volatile__("stmxcsr %0" : "=m"(csr));
    return csr;
}
static inline void set_fp_control(unsigned long long value) {
    unsigned int csr = (unsigned int)value;
    __asm__ __volatile__("ldmxcsr %0" : : "m"(csr));
}
static const unsigned long long FP_FLUSH_BITS = 0x8040ull;
#define GBEMU_HAS_FLUSH_CONTROL 1
#elif defined(__aarch64__)
static inline unsigned long long fp_control() {
    unsigned long long value;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(value));
    return value;
}
static inline void set_fp_control(unsigned long long value) {
    __asm__ __volatile__("msr fpcr, %0" : : "r"(value));
}
static const unsigned long long FP_FLUSH_BITS = 1ull << 24;
#define GBEMU_HAS_FLUSH_CONTROL 1
#else
#define GBEMU_HAS_FLUSH_CONTROL 0
#endif

// Returns false (with a message) if flushing was asked for on a CPU this file cannot set up.
static bool enter_fp_mode(char* error, int error_size) {
#if GBEMU_HAS_FLUSH_CONTROL
    g.saved_fp_control = fp_control();
    if (g.flush_denormals) set_fp_control(g.saved_fp_control | FP_FLUSH_BITS);
    return true;
#else
    if (g.flush_denormals) {
        snprintf(error, error_size,
                 "the kernel is built with -ftz=true (float32 subnormals flushed to zero), "
                 "which the emulator implements on x86-64 and AArch64 only");
        return false;
    }
    return true;
#endif
}
static void leave_fp_mode() {
#if GBEMU_HAS_FLUSH_CONTROL
    set_fp_control(g.saved_fp_control);
#endif
}

// Runs the whole grid.  Returns 0, or 1 with a message in `error`.
static int run_grid(const long long* dims, long long shared_bytes, unsigned long long seed,
                    char* error, int error_size, void (*body)(void*), void* context) {
    error[0] = 0;
    if (!enter_fp_mode(error, error_size)) return 1;
    if (!install_fault_handlers(error, error_size)) {
        leave_fp_mode();
        return 1;
    }
    // Nothing in this frame changes after sigsetjmp, so nothing here needs to be volatile.
    if (sigsetjmp(g.fault_jump, 1) != 0) {
        // Back from fault_handler: every fiber of the launch is abandoned; the next launch
        // re-initialises fibers, warps and barrier state from scratch.
        const uint3 block = blockIdx;
        const bool in_fiber = g.in_fiber != 0;
        leave_fp_mode();
        restore_fault_handlers();
        describe_fault(error, (size_t)error_size, block, in_fiber);
        g.failed = true;
        return 1;
    }
    const int status = run_blocks(dims, shared_bytes, seed, error, error_size, body, context);
    leave_fp_mode();
    restore_fault_handlers();
    return status;
}

__attribute__((noinline)) static int run_blocks(const long long* dims, long long shared_bytes,
                                                unsigned long long seed, char* error,
                                                int error_size, void (*body)(void*),
                                                void* context) {
    const unsigned int grid_x = (unsigned int)dims[0], grid_y = (unsigned int)dims[1],
                       grid_z = (unsigned int)dims[2];
    const unsigned int block_x = (unsigned int)dims[3], block_y = (unsigned int)dims[4],
                       block_z = (unsigned int)dims[5];
    const int nthreads = (int)(block_x * block_y * block_z);
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
    const size_t stack_kib = stack_kib_setting();
    if (stack_kib == 0) {
        snprintf(error, error_size,
                 "GPUBACKPROP_EMU_STACK_KIB=%s is not a whole number of KiB in [16, 1048576]",
                 getenv("GPUBACKPROP_EMU_STACK_KIB"));
        return 1;
    }
    ensure_stacks((size_t)nthreads, stack_kib);
    if (g.stack_count < (size_t)nthreads) {
        snprintf(error, error_size, "could not map fiber stacks for %d threads of %zu KiB",
                 nthreads, stack_kib);
        return 1;
    }
    if (shared_bytes < 0 || shared_bytes > GBEMU_MAX_DYNAMIC_SHARED) {
        snprintf(error, error_size, "shared_mem=%lld bytes of dynamic shared memory; at most %d",
                 shared_bytes, GBEMU_MAX_DYNAMIC_SHARED);
        return 1;
    }
    g.dynamic_shared = dynamic_shared_base();
    // Within the capacity reserved by dynamic_shared_base: the buffer never moves.
    g.dynamic_shared_storage.resize((size_t)shared_bytes + GBEMU_SHARED_GUARD + 256);
    g.body = body;
    g.body_context = context;
    g.failed = false;
    gridDim = dim3(grid_x, grid_y, grid_z);
    blockDim = dim3(block_x, block_y, block_z);
    unsigned long long random_state = seed;
    const int fill = g.shared_fill = shared_fill_byte();
    // The order the blocks run in: linear block numbers (x fastest), shuffled when a seed is
    // given (the permutation is only stored then).
    const unsigned long long nblocks = (unsigned long long)grid_x * grid_y * grid_z;
    if (seed != 0) {
        g.block_order.resize(nblocks);
        for (unsigned long long b = 0; b < nblocks; ++b) g.block_order[b] = b;
        for (unsigned long long b = nblocks; b > 1; --b) {
            std::swap(g.block_order[b - 1], g.block_order[next_random(random_state) % b]);
        }
    }
    for (unsigned long long serial = 0; serial < nblocks; ++serial) {
        const unsigned long long linear = seed != 0 ? g.block_order[serial] : serial;
        const unsigned int bx = (unsigned int)(linear % grid_x),
                           by = (unsigned int)(linear / grid_x % grid_y),
                           bz = (unsigned int)(linear / grid_x / grid_y);
        blockIdx = make_uint3(bx, by, bz);
        ++g.block_serial;
        // Shared memory is uninitialised on a GPU: NaN bytes make a read-before-write
        // visible in the result (and the guard-check run's 0x7F bytes one that fmaxf
        // would hide).
        // The bytes past the launch's dynamic shared memory are filled too: a write
        // there is reported after the block, a read shows up like any unwritten byte.
        memset(g.dynamic_shared, fill, (size_t)shared_bytes + GBEMU_SHARED_GUARD);
        if (+__start_gbemu_shared != +__stop_gbemu_shared) {
            memset(__start_gbemu_shared, fill,
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
        const unsigned char* guard = g.dynamic_shared + shared_bytes;
        for (int b = 0; b < GBEMU_SHARED_GUARD; ++b) {
            if (guard[b] != (unsigned char)fill) {
                snprintf(error, error_size,
                         "block (%u,%u,%u) wrote past the end of its dynamic shared "
                         "memory (shared_mem=%lld bytes; first byte written: %lld); on "
                         "a GPU: an illegal address, or another block's data",
                         bx, by, bz, shared_bytes, shared_bytes + b);
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
// A type whose code is not derived from its kind: specialised by the emulator's cuda_fp16.h
// ("f2", NumPy's float16) and cuda_bf16.h ("bf2").
template <class T> struct type_code {
    static constexpr const char* value = nullptr;
};

template <class T> static void append_type_code(char* out, size_t size) {
    typedef typename std::remove_cv<T>::type U;
    char code[32];
    if constexpr (type_code<U>::value != nullptr) {
        snprintf(code, sizeof(code), "%s", type_code<U>::value);
    } else if constexpr (std::is_same<U, bool>::value) {
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
