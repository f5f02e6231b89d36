// cuda_emu.h: the CUDA device dialect on the CPU, for gpubackprop's emulator.
//
// Included (with cuda_emu_runtime.h) before one kernels/ source; the whole translation unit is
// built with g++ into a shared library and launched from Python (gpubackprop/emulator/launch.py).
//
// The model: the blocks of a grid run one after another on the calling OS thread; the threads
// of a block run as fibers (one stack each) that switch only at barriers: __syncthreads(),
// __syncwarp() and the warp shuffles/votes.  So
//   - `__shared__` is `static`: one copy per block is right because blocks never overlap;
//   - dynamic shared memory (`extern __shared__ T name[];`, which compiler.py rewrites, or
//     kernels/common.cuh's GB_DYNAMIC_SHARED) points at one buffer sized by the launch and
//     refilled with 0xFF (NaN) for each block;
//   - threadIdx/blockIdx are plain globals that the scheduler sets before it resumes a fiber;
//   - atomics are plain read-modify-write: no fiber switch can happen inside one;
//   - warp-synchronous code without __syncwarp() runs lane by lane, not in lockstep: such code
//     is a race on Volta and later GPUs too, and the emulator's wrong answer shows it.
//
// __CUDA_ARCH__ is defined (GBEMU_CUDA_ARCH, default 800): every kernel source is device code,
// and code guarded by it must take the device path here as it does under NVRTC.  Inline PTX
// (asm) is refused before compiling (compiler.py names the file and line); anything else this
// header and the emulator's CUDA headers (include/: cuda_fp16.h, cuda_bf16.h) do not provide
// (textures, ...) is a compile error, never a silently different path.
#ifndef GBEMU_CUDA_EMU_H
#define GBEMU_CUDA_EMU_H

#include <math.h>  // libstdc++'s math.h also brings the float overloads (exp(float), ...)

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#ifndef GBEMU_CUDA_ARCH
#define GBEMU_CUDA_ARCH 800
#endif
#define __CUDA_ARCH__ GBEMU_CUDA_ARCH
#define GPUBACKPROP_EMULATOR 1

// ---- declaration specifiers -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
// Every static __shared__ variable lands in one ELF section, which the scheduler refills with
// 0xFF bytes (NaN) before each block: shared memory is uninitialised on a GPU, and a value left
// by the previous block (or launch) would hide a read-before-write or a missing barrier.
#define __shared__ __attribute__((section("gbemu_shared"), aligned(16))) static
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__
// __restrict__ is a g++ keyword already.

// ---- vector types (same sizes and alignments as CUDA's vector_types.h) ------------------
// A GPU loads and stores a whole float2/float4/double2/... with one vector instruction that
// faults ("misaligned address") unless the address is a multiple of the type's alignment; g++
// splits such a copy into scalar accesses that work anywhere.  So the types whose alignment
// exceeds their element's check it in the copy constructor (a load: `float4 v = p[i];`) and the
// copy assignment (a store, `p[i] = v;`, and its load), and report the source line of the copy.
// Unlike CUDA's, these types are then not trivially copyable; value constructors keep the
// brace initialisation of the aggregates (`float4 v = {a, b, c, d};`, `= {}`, `= {0}`).
namespace gbemu {
__attribute__((noinline, cold)) static void misaligned_vector(const void* address,
                                                              unsigned int alignment,
                                                              const char* type,
                                                              const char* access,
                                                              const char* file,
                                                              unsigned int line);
}  // namespace gbemu
#define GBEMU_CHECK_ALIGNED(A, p, N, access, file, line)                               \
    if (__builtin_expect((reinterpret_cast<unsigned long>(p) & ((A) - 1)) != 0, 0)) \
    gbemu::misaligned_vector(p, A, #N, access, file, line)
#define GBEMU_VEC_COPY(T, N, A, COPY)                                                       \
    N() = default;                                                                          \
    N(const N& o, const char* gbemu_file = __builtin_FILE(),                               \
      unsigned int gbemu_line = __builtin_LINE()) {                                         \
        GBEMU_CHECK_ALIGNED(A, &o, N, "a load of", gbemu_file, gbemu_line);                \
        COPY;                                                                               \
    }                                                                                       \
    N& operator=(const N& o) {                                                              \
        GBEMU_CHECK_ALIGNED(A, &o, N, "a load of", nullptr, 0);                             \
        GBEMU_CHECK_ALIGNED(A, this, N, "a store to", nullptr, 0);                          \
        COPY;                                                                               \
        return *this;                                                                       \
    }
#define GBEMU_VEC2(T, N, A) \
    struct __attribute__((aligned(A))) N { \
        T x, y; \
        GBEMU_VEC_COPY(T, N, A, (x = o.x, y = o.y)) \
        constexpr N(T vx, T vy = 0) : x(vx), y(vy) {} \
    }; \
    static inline N make_##N(T x, T y) { N v; v.x = x; v.y = y; return v; }
#define GBEMU_VEC3(T, N) \
    struct N { T x, y, z; }; \
    static inline N make_##N(T x, T y, T z) { N v; v.x = x; v.y = y; v.z = z; return v; }
#define GBEMU_VEC4(T, N, A) \
    struct __attribute__((aligned(A))) N { \
        T x, y, z, w; \
        GBEMU_VEC_COPY(T, N, A, (x = o.x, y = o.y, z = o.z, w = o.w)) \
        constexpr N(T vx, T vy = 0, T vz = 0, T vw = 0) : x(vx), y(vy), z(vz), w(vw) {} \
    }; \
    static inline N make_##N(T x, T y, T z, T w) { N v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }

GBEMU_VEC2(float, float2, 8)
GBEMU_VEC3(float, float3)
GBEMU_VEC4(float, float4, 16)
GBEMU_VEC2(double, double2, 16)
GBEMU_VEC3(double, double3)
GBEMU_VEC4(double, double4, 16)
GBEMU_VEC2(int, int2, 8)
GBEMU_VEC3(int, int3)
GBEMU_VEC4(int, int4, 16)
GBEMU_VEC2(unsigned int, uint2, 8)
GBEMU_VEC4(unsigned int, uint4, 16)
GBEMU_VEC2(long long, longlong2, 16)
GBEMU_VEC2(unsigned long long, ulonglong2, 16)
GBEMU_VEC2(short, short2, 4)
GBEMU_VEC4(short, short4, 8)
GBEMU_VEC4(signed char, char4, 4)
GBEMU_VEC4(unsigned char, uchar4, 4)

struct uint3 {
    unsigned int x, y, z;
};
static inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) {
    uint3 v;
    v.x = x;
    v.y = y;
    v.z = z;
    return v;
}
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    operator uint3() const { return make_uint3(x, y, z); }
};

// ---- built-in variables: globals switched by the scheduler, not thread_local ------------
static uint3 threadIdx;
static uint3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;
static const int warpSize = 32;

// ---- math: <cmath> gives expf, logf, log1pf, tanhf, erff, sqrtf, fmaf, fmaxf, ... and the
// type-generic overloads; below are CUDA's extra functions and intrinsics. -----------------
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
static inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752440); }
// glibc declares __expf, __logf, __sinf, ... without exporting them: ours get other names.
static inline float gbemu__expf(float x) { return expf(x); }
#define __expf gbemu__expf
static inline float gbemu__exp10f(float x) { return powf(10.0f, x); }
#define __exp10f gbemu__exp10f
static inline float gbemu__logf(float x) { return logf(x); }
#define __logf gbemu__logf
static inline float gbemu__log2f(float x) { return log2f(x); }
#define __log2f gbemu__log2f
static inline float gbemu__log10f(float x) { return log10f(x); }
#define __log10f gbemu__log10f
static inline float gbemu__powf(float x, float y) { return powf(x, y); }
#define __powf gbemu__powf
static inline float gbemu__sinf(float x) { return sinf(x); }
#define __sinf gbemu__sinf
static inline float gbemu__cosf(float x) { return cosf(x); }
#define __cosf gbemu__cosf
static inline float gbemu__tanf(float x) { return tanf(x); }
#define __tanf gbemu__tanf
static inline float gbemu__tanhf(float x) { return tanhf(x); }
#define __tanhf gbemu__tanhf
static inline void gbemu__sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
#define __sincosf gbemu__sincosf
static inline float __fdividef(float a, float b) { return a / b; }
static inline float fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline double __drcp_rn(double x) { return 1.0 / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline double __dsqrt_rn(double x) { return sqrt(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
static inline int __double2int_rn(double x) { return (int)nearbyint(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __double2float_rn(double x) { return (float)x; }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned int x) { float f; memcpy(&f, &x, 4); return f; }
static inline unsigned int __float_as_uint(float x) { unsigned int i; memcpy(&i, &x, 4); return i; }
static inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
static inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned int __brev(unsigned int x) {
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline int __mul24(int a, int b) { return a * b; }
static inline unsigned int __umul24(unsigned int a, unsigned int b) { return a * b; }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }

// min/max over any two arithmetic types, as CUDA's overload set does; floating point through
// fmin/fmax (the non-NaN operand wins, as on the GPU).
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value &&
                                          std::is_arithmetic<B>::value>::type>
static inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if constexpr (std::is_floating_point<C>::value) return (C)fmin((C)a, (C)b);
    else return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value &&
                                          std::is_arithmetic<B>::value>::type>
static inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if constexpr (std::is_floating_point<C>::value) return (C)fmax((C)a, (C)b);
    else return (C)a > (C)b ? (C)a : (C)b;
}

// Read-only / cache-hint loads and stores are plain memory accesses here.
template <class T> static inline T __ldg(const T* p) { return *p; }
template <class T> static inline T __ldcg(const T* p) { return *p; }
template <class T> static inline T __ldca(const T* p) { return *p; }
template <class T> static inline T __ldcs(const T* p) { return *p; }
template <class T> static inline T __ldlu(const T* p) { return *p; }
template <class T> static inline T __ldcv(const T* p) { return *p; }
template <class T> static inline void __stcg(T* p, T v) { *p = v; }
template <class T> static inline void __stcs(T* p, T v) { *p = v; }
template <class T> static inline void __stwb(T* p, T v) { *p = v; }
template <class T> static inline void __stwt(T* p, T v) { *p = v; }

// Memory fences order nothing on one OS thread; a compiler barrier keeps the intent.
static inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
static inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }
static inline void __threadfence_system() { __asm__ __volatile__("" ::: "memory"); }

// ---- atomics: CUDA's overload set, nothing wider (a kernel that compiles here must compile
// under NVRTC too).  Fibers switch only at barriers, so a plain read-modify-write is atomic. --
#define GBEMU_ATOMIC_RMW(fn, T, expr) \
    static inline T fn(T* address, T val) { T old = *address; *address = (expr); return old; }
GBEMU_ATOMIC_RMW(atomicAdd, int, old + val)
GBEMU_ATOMIC_RMW(atomicAdd, unsigned int, old + val)
GBEMU_ATOMIC_RMW(atomicAdd, unsigned long long, old + val)
GBEMU_ATOMIC_RMW(atomicAdd, float, old + val)
GBEMU_ATOMIC_RMW(atomicAdd, double, old + val)
GBEMU_ATOMIC_RMW(atomicSub, int, old - val)
GBEMU_ATOMIC_RMW(atomicSub, unsigned int, old - val)
GBEMU_ATOMIC_RMW(atomicExch, int, val)
GBEMU_ATOMIC_RMW(atomicExch, unsigned int, val)
GBEMU_ATOMIC_RMW(atomicExch, unsigned long long, val)
GBEMU_ATOMIC_RMW(atomicExch, float, val)
GBEMU_ATOMIC_RMW(atomicMax, int, old > val ? old : val)
GBEMU_ATOMIC_RMW(atomicMax, unsigned int, old > val ? old : val)
GBEMU_ATOMIC_RMW(atomicMax, long long, old > val ? old : val)
GBEMU_ATOMIC_RMW(atomicMax, unsigned long long, old > val ? old : val)
GBEMU_ATOMIC_RMW(atomicMin, int, old < val ? old : val)
GBEMU_ATOMIC_RMW(atomicMin, unsigned int, old < val ? old : val)
GBEMU_ATOMIC_RMW(atomicMin, long long, old < val ? old : val)
GBEMU_ATOMIC_RMW(atomicMin, unsigned long long, old < val ? old : val)
GBEMU_ATOMIC_RMW(atomicAnd, int, old & val)
GBEMU_ATOMIC_RMW(atomicAnd, unsigned int, old & val)
GBEMU_ATOMIC_RMW(atomicAnd, unsigned long long, old & val)
GBEMU_ATOMIC_RMW(atomicOr, int, old | val)
GBEMU_ATOMIC_RMW(atomicOr, unsigned int, old | val)
GBEMU_ATOMIC_RMW(atomicOr, unsigned long long, old | val)
GBEMU_ATOMIC_RMW(atomicXor, int, old ^ val)
GBEMU_ATOMIC_RMW(atomicXor, unsigned int, old ^ val)
GBEMU_ATOMIC_RMW(atomicXor, unsigned long long, old ^ val)
GBEMU_ATOMIC_RMW(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
GBEMU_ATOMIC_RMW(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef GBEMU_ATOMIC_RMW
#define GBEMU_ATOMIC_CAS(T) \
    static inline T atomicCAS(T* address, T compare, T val) { \
        T old = *address; \
        if (old == compare) *address = val; \
        return old; \
    }
GBEMU_ATOMIC_CAS(int)
GBEMU_ATOMIC_CAS(unsigned int)
GBEMU_ATOMIC_CAS(unsigned long long)
GBEMU_ATOMIC_CAS(unsigned short)
#undef GBEMU_ATOMIC_CAS

#include "cuda_emu_runtime.h"
#include "ptx_twins.h"  // the emulator bodies of kernels/ptx_twins.cuh

// ---- barriers, warp exchange and dynamic shared memory (implemented in the runtime) ------
static inline void __syncthreads() { gbemu::block_barrier(0, 0); }
static inline int __syncthreads_count(int pred) { return gbemu::block_barrier(1, pred != 0); }
static inline int __syncthreads_and(int pred) { return gbemu::block_barrier(2, pred != 0); }
static inline int __syncthreads_or(int pred) { return gbemu::block_barrier(3, pred != 0); }
static inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    gbemu::warp_barrier(mask, "__syncwarp");
}
static inline unsigned int __activemask() { return gbemu::active_mask(); }

template <class T>
static inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = 32) {
    return gbemu::warp_exchange(mask, var, gbemu::SHFL_IDX, src_lane, width, "__shfl_sync");
}
template <class T>
static inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return gbemu::warp_exchange(mask, var, gbemu::SHFL_UP, (int)delta, width, "__shfl_up_sync");
}
template <class T>
static inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return gbemu::warp_exchange(mask, var, gbemu::SHFL_DOWN, (int)delta, width,
                                "__shfl_down_sync");
}
template <class T>
static inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
    return gbemu::warp_exchange(mask, var, gbemu::SHFL_XOR, lane_mask, width, "__shfl_xor_sync");
}
static inline unsigned int __ballot_sync(unsigned int mask, int pred) {
    return gbemu::warp_vote(mask, pred, "__ballot_sync");
}
static inline int __any_sync(unsigned int mask, int pred) {
    return gbemu::warp_vote(mask, pred, "__any_sync") != 0u;
}
static inline int __all_sync(unsigned int mask, int pred) {
    unsigned int ballot = gbemu::warp_vote(mask, pred, "__all_sync");
    return ballot == (mask & gbemu::warp_exist_mask());
}

static inline void __trap() { gbemu::trap("the kernel called __trap()"); }
static inline void __brkpt() { gbemu::trap("the kernel called __brkpt()"); }

// Device-side assert: report the failed condition instead of aborting the Python process.
#undef assert
#define assert(e) \
    ((e) ? (void)0 : gbemu::assert_fail(#e, __FILE__, __LINE__))

// `extern __shared__ T name[];` as written in CUDA, rewritten by compiler.py into this: a
// constant pointer to the launch's dynamic shared memory (at file or function scope).
// After a function-scope `__shared__` declaration (compiler.py adds it): see fill_static_shared.
#define GBEMU_FILL_SHARED(name) ::gbemu::fill_static_shared((void*)&(name), sizeof(name))
#define GBEMU_EXTERN_SHARED(type, name) \
    static type* const name = reinterpret_cast<type*>(gbemu::dynamic_shared_base())

// Must be used inside a function body (kernels/common.cuh documents it for kernels).
#define GB_DYNAMIC_SHARED(type, name) \
    type* const name = reinterpret_cast<type*>(gbemu::dynamic_shared())

#endif  // GBEMU_CUDA_EMU_H
