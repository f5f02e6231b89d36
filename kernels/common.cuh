// common.cuh: the scalar type, the dynamic shared memory macro and small helpers shared by every
// kernel source.  No kernels here.
//
// One source serves float32 and float64: the loader passes -DREAL_T=float or -DREAL_T=double
// (as a #define prepended to the text) and every kernel is written over real_t.
#ifndef GB_COMMON_CUH
#define GB_COMMON_CUH

#ifndef REAL_T
#define REAL_T float
#endif
typedef REAL_T real_t;

// Dynamic shared memory goes through this macro only: the CPU emulator predefines it its own way
// (an `extern __shared__` array cannot be emulated by `#define __shared__ static`).
#ifndef GB_DYNAMIC_SHARED
#define GB_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

#define GB_FULL_WARP_MASK 0xffffffffu

#endif  // GB_COMMON_CUH
