// ptx_twins.cuh: every PTX instruction of the tensor-core kernels (gemm_mma.cu), one small
// device function each.  On a GPU the body is the inline asm; on the CPU emulator
// (GPUBACKPROP_EMULATOR) it is the twin in gpubackprop/emulator/ptx_twins.h, written from the
// PTX ISA: warp-collective (all 32 lanes), the ISA's fragment layouts, round-to-nearest-even
// conversions, fp32 accumulation, cp.async copies that land only at the wait.  The emulator
// accepts inline PTX in this file only, and only these instructions; tests/test_ptx_twins.py
// checks each twin against a NumPy model of the ISA's tables.
//
//   gb_cvt_bf16x2        cvt.rn.bf16x2.f32                                     (sm_80)
//   gb_mma_bf16_16816    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32  (sm_80)
//   gb_mma_tf32_1688     mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32   (sm_80)
//   gb_ldmatrix_x4       ldmatrix.sync.aligned.m8n8.x4.shared.b16             (sm_75)
//   gb_ldmatrix_x4_trans ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16       (sm_75)
//   gb_cp_async_16       cp.async.cg.shared.global, 16 bytes, zero fill       (sm_80)
//   gb_cp_async_commit   cp.async.commit_group                                (sm_80)
//   gb_cp_async_wait<N>  cp.async.wait_group N                                (sm_80)
//
// Below sm_80 the bodies trap: the launchers refuse bf16/tf32 on such a GPU before any launch,
// and every source still compiles for sm_75.
//
// Fragments (groupID g = lane / 4, threadID_in_group t = lane % 4; bf16 pairs low half first):
//   m16n8k16 bf16  A: a[r] = A[g + 8(r%2)][2t + 8(r/2) + {0,1}]   B: b[r] = B[2t + 8r + {0,1}][g]
//   m16n8k8  tf32  A: a[r] = A[g + 8(r%2)][t + 4(r/2)]            B: b[r] = B[t + 4r][g]
//   both           C, D: c[i] = C[g + 8(i/2)][2t + i%2]
#ifndef GB_PTX_TWINS_CUH
#define GB_PTX_TWINS_CUH

#if defined(GPUBACKPROP_EMULATOR) || __CUDA_ARCH__ >= 800
#define GB_HAS_TENSOR_CORES 1
#else
#define GB_HAS_TENSOR_CORES 0
#endif

// bf16 bits in global memory (NumPy: uint16 holding ml_dtypes.bfloat16 bits).
typedef unsigned short gb_bf16;

__device__ __forceinline__ float gb_bf16_to_float(gb_bf16 h) {
    return __uint_as_float((unsigned int)h << 16);
}

// fp32 → tf32 (1 + 8 + 10 bits), round to nearest even, in integer arithmetic (the same
// instructions on the GPU and the emulator).  Inf and NaN pass unchanged; a value that rounds
// past the largest tf32 becomes inf, as IEEE rounding does.
__device__ __forceinline__ float gb_round_tf32(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    u += 0xfffu + ((u >> 13) & 1u);
    return __uint_as_float(u & 0xffffe000u);
}

// Two fp32 → bf16 (round to nearest even), lo in bits 0-15, hi in bits 16-31.
__device__ __forceinline__ unsigned int gb_cvt_bf16x2(float lo, float hi) {
#if defined(GPUBACKPROP_EMULATOR)
    return gbemu::ptx::cvt_bf16x2(lo, hi);
#elif __CUDA_ARCH__ >= 800
    unsigned int d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    __trap();
    return 0u;
#endif
}

// d = A·B + c for one 16×8×16 bf16 tile; d may be c.
__device__ __forceinline__ void gb_mma_bf16_16816(float d[4], const unsigned int a[4],
                                                  const unsigned int b[2], const float c[4]) {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::mma_bf16_m16n8k16(d, a, b, c);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    __trap();
#endif
}

// d = A·B + c for one 16×8×8 tf32 tile (operands already rounded by gb_round_tf32).
__device__ __forceinline__ void gb_mma_tf32_1688(float d[4], const unsigned int a[4],
                                                 const unsigned int b[2], const float c[4]) {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::mma_tf32_m16n8k8(d, a, b, c);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    __trap();
#endif
}

// Four 8×8 b16 matrices from shared memory; lane 8i + j gives the address of row j of matrix
// i (16 bytes, 16-byte aligned).
__device__ __forceinline__ void gb_ldmatrix_x4(unsigned int r[4], const void* smem_row) {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::ldmatrix_x4<false>(r, smem_row);
#elif __CUDA_ARCH__ >= 800
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
#else
    __trap();
#endif
}

// As gb_ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void gb_ldmatrix_x4_trans(unsigned int r[4], const void* smem_row) {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::ldmatrix_x4<true>(r, smem_row);
#elif __CUDA_ARCH__ >= 800
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
#else
    __trap();
#endif
}

// 16 bytes global → shared, asynchronously: src_bytes (0..16) are read, the rest zero-filled.
// Both addresses 16-byte aligned; the data may be read only after gb_cp_async_wait retires the
// group and a barrier.
__device__ __forceinline__ void gb_cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::cp_async(smem, gmem, 16, src_bytes, "cp.async.cg.shared.global");
#elif __CUDA_ARCH__ >= 800
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
#else
    __trap();
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void gb_cp_async_commit() {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::cp_async_commit();
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    __trap();
#endif
}

// Waits until at most N of this thread's most recent committed groups are still in flight.
template <int N> __device__ __forceinline__ void gb_cp_async_wait() {
#if defined(GPUBACKPROP_EMULATOR)
    gbemu::ptx::cp_async_wait(N, "cp.async.wait_group");
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    __trap();
#endif
}

#endif  // GB_PTX_TWINS_CUH
