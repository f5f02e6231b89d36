// gemm_mma.cu: the dense layer's three matrix products on the tensor cores (sm_80 and later),
// fp32 accumulation, the layouts and epilogue of gemm.cu:
//
//   dense_forward_<p>          Y = f(X Wᵀ + b)   X (M,K), W (N,K), b (N,) → Y (M,N) [Z = X Wᵀ + b]
//   dense_backward_data_<p>    dX = δ W           δ (M,N), W (N,K) → dX (M,K)
//   dense_backward_weight_<p>  dW = δᵀ X          δ (M,N), X (M,K) → dW (N,K)
//
// (dense_forward_bf16, dense_backward_data_bf16, dense_backward_weight_bf16, dense_forward_tf32,
// dense_backward_data_tf32, dense_backward_weight_tf32) in two precisions <p>:
//   bf16  operands bf16 in memory (gb_bf16 bits), mma.sync m16n8k16 bf16 × bf16 → fp32; the
//         forward can also write Y in bf16 (y16), the next layer's operand.
//   tf32  operands fp32 in memory, rounded to tf32 (to nearest even, gb_round_tf32) as they go
//         into the fragments, mma.sync m16n8k8 tf32 × tf32 → fp32.
// The fused dW of the library's dense backward (2 launches: this one, then
// dense_backward_data_<p> on the δ it stored), in both precisions:
//   dense_backward_weight_act_<p>  dW = δᵀ X, db = Σ_m δ and δ   from dout, saved (fp32), X
// (dense_backward_weight_act_bf16, dense_backward_weight_act_tf32): δ = dout ⊙ f'(saved) formed
// in fp32 as the A operand is loaded, rounded to the precision for the products and the stored
// copy, db summed from the fp32 δ in a fixed order.
// Conversions: to_bf16 (fp32 → bf16, round to nearest even), which makes the bf16 operands, and
// add_bf16 (a residual sum c = a + b with its bf16 copy).
//
// Design (one version): a MMA_BM × MMA_BN block tile, 4 warps of 32 × 32 (2 × 4 mma tiles of
// 16 × 8), MMA_STAGES-deep pipeline of BK-deep slices copied global → shared with cp.async
// (16 bytes per copy, the edge chunks zero-filled through the copy's src-size) where the operand
// allows it (16-byte aligned, leading dimension a multiple of 16 bytes), guarded scalar copies
// elsewhere.  Fragments come from shared memory with ldmatrix: an operand whose rows run along
// the inner dimension (LAYOUT_INNER) is staged [r][p] and read plainly, one whose columns do
// (LAYOUT_OUTER) is staged [p][r] and read with ldmatrix.trans (bf16) or with scalar shared
// loads (tf32: .trans moves 16-bit elements only).  Rows are padded by 16 bytes so that the 8
// row addresses of an ldmatrix fall in distinct banks.  Any M, N, K ≥ 0 (K = 0 gives Y = f(b)).
// Every PTX instruction is a device function of ptx_twins.cuh; the bodies compile to a trap
// below sm_80, where the launchers never send a bf16 or tf32 layer.
#include "common.cuh"
#include "activations.cuh"
#include "ptx_twins.cuh"

#ifndef MMA_BM
#define MMA_BM 64
#endif
#ifndef MMA_BN
#define MMA_BN 64
#endif
#ifndef MMA_STAGES
#define MMA_STAGES 3
#endif

#define MMA_THREADS 128  // 4 warps, 2 × 2 over the block tile; the launcher uses the same
#define MMA_WARP_M (MMA_BM / 2)
#define MMA_WARP_N (MMA_BN / 2)
#define MMA_TILES_M (MMA_WARP_M / 16)
#define MMA_TILES_N (MMA_WARP_N / 8)

static_assert(MMA_BM % 32 == 0 && MMA_BN % 32 == 0, "MMA_BM and MMA_BN must be multiples of 32");
static_assert(MMA_STAGES >= 2, "at least two stages");

#define LAYOUT_INNER 0  // a[r * ld + p]
#define LAYOUT_OUTER 1  // a[p * ld + r]

struct PrecisionBf16 {
    typedef gb_bf16 elem;
    static constexpr int BK = 32;     // inner elements per slice
    static constexpr int KSTEP = 16;  // the mma's k
    static constexpr int CHUNK = 8;   // elements per 16-byte copy
};

struct PrecisionTf32 {
    typedef float elem;
    static constexpr int BK = 16;
    static constexpr int KSTEP = 8;
    static constexpr int CHUNK = 4;
};

// One stage of one operand in shared memory: [BR][BK + CHUNK] (INNER) or [BK][BR + 8] (OUTER).
template <class P, int LAYOUT, int BR>
struct StageTile {
    static constexpr int STRIDE = LAYOUT == LAYOUT_INNER ? P::BK + P::CHUNK : BR + 8;
    static constexpr int ELEMS = LAYOUT == LAYOUT_INNER ? BR * STRIDE : P::BK * STRIDE;
    static constexpr int CHUNKS = BR * P::BK / P::CHUNK;
};

// Dynamic shared memory of a kernel: MMA_STAGES stages of its A and B tiles (gpubackprop's
// launcher computes the same, mma_shared_bytes in kernel_backend.py).
template <class P, int LAYOUT_A, int LAYOUT_B>
struct MmaShared {
    static constexpr int BYTES =
        MMA_STAGES * (StageTile<P, LAYOUT_A, MMA_BM>::ELEMS + StageTile<P, LAYOUT_B, MMA_BN>::ELEMS) *
        (int)sizeof(typename P::elem);
};

// 16-byte copies are possible when every chunk starts 16-byte aligned.
template <class P>
__device__ __forceinline__ int mma_vec_ok(const typename P::elem* a, long long ld) {
    return ld % P::CHUNK == 0 && (reinterpret_cast<unsigned long long>(a) & 15) == 0;
}

// Where chunk q of the slice at p0 of an operand with `rows` × `inner` logical elements (rows
// from r0) lies: `valid` elements of it exist (the rest are zero), at `offset` in global memory
// and at `dst` in its stage tile.
template <class P, int LAYOUT, int BR>
__device__ __forceinline__ void mma_chunk(int q, long long ld, int rows, int inner, int r0,
                                          int p0, int& valid, long long& offset, int& dst) {
    typedef StageTile<P, LAYOUT, BR> T;
    if (LAYOUT == LAYOUT_INNER) {  // CHUNK consecutive p of row r
        const int r = q / (P::BK / P::CHUNK), p = (q % (P::BK / P::CHUNK)) * P::CHUNK;
        valid = r0 + r < rows ? min(max(inner - (p0 + p), 0), P::CHUNK) : 0;
        offset = (long long)(r0 + r) * ld + (p0 + p);
        dst = r * T::STRIDE + p;
    } else {  // CHUNK consecutive r of inner index p
        const int p = q / (BR / P::CHUNK), r = (q % (BR / P::CHUNK)) * P::CHUNK;
        valid = p0 + p < inner ? min(max(rows - (r0 + r), 0), P::CHUNK) : 0;
        offset = (long long)(p0 + p) * ld + (r0 + r);
        dst = p * T::STRIDE + r;
    }
}

// Global → shared for the slice at p0 of an operand with `rows` × `inner` logical elements,
// rows from r0: cp.async where `vec`, else guarded loads and stores.  Out-of-range elements are
// zero (they add nothing to the products).
template <class P, int LAYOUT, int BR>
__device__ __forceinline__ void mma_load_stage(typename P::elem* tile,
                                               const typename P::elem* __restrict__ a,
                                               long long ld, int rows, int inner, int r0, int p0,
                                               int vec) {
    typedef StageTile<P, LAYOUT, BR> T;
    typedef typename P::elem elem;
    for (int q = threadIdx.x; q < T::CHUNKS; q += MMA_THREADS) {
        int valid, dst_at;
        long long offset;
        mma_chunk<P, LAYOUT, BR>(q, ld, rows, inner, r0, p0, valid, offset, dst_at);
        elem* dst = tile + dst_at;
        if (vec) {
            gb_cp_async_16(dst, valid > 0 ? a + offset : a, valid * (int)sizeof(elem));
        } else {
#pragma unroll
            for (int e = 0; e < P::CHUNK; ++e) dst[e] = e < valid ? a[offset + e] : (elem)0;
        }
    }
}

// ---- the A operand δ = ∂L/∂y ⊙ f'(saved), formed as it is loaded ----------------------------
//
// The backward kernels *_act read ∂L/∂y and the saved y or z in fp32, and form δ (fp32, exactly
// as the elementwise activation backward does) before it goes to shared memory in the
// precision's element type: rounded to bf16 there (round to nearest even), or kept fp32 for tf32
// (rounded as it goes into the fragments).  Each slice's fp32 values are fetched into registers
// before the previous slice is multiplied and stored after it, so the loads are in flight
// during the mma's (cp.async cannot transform what it copies).  The bias gradient db = Σ_m δ
// sums the fp32 δ (not the rounded one): each thread adds its chunks' values slice by slice,
// then mma_row_sums combines the threads' sums in a fixed order (deterministic).
struct MmaAct {
    const float* saved;
    int code;
    float alpha;
    void* delta_out;  // δ in the precision's element type, where the block writes it (else null)
    int vec_out;      // delta_out allows 16-byte stores
};

template <class P, int LAYOUT, int BR>
struct ActChunks {
    static constexpr int PER_THREAD = StageTile<P, LAYOUT, BR>::CHUNKS / MMA_THREADS;
    static_assert(StageTile<P, LAYOUT, BR>::CHUNKS % MMA_THREADS == 0,
                  "every thread forms the same number of δ chunks");
};

// CHUNK fp32 values at src[offset...], the first `valid` of them (the rest 0); 16-byte loads
// where `vec` (base 16-byte aligned, leading dimension a multiple of 4).
template <int CHUNK>
__device__ __forceinline__ void mma_load_f32(const float* __restrict__ src, long long offset,
                                             int valid, int vec, float v[CHUNK]) {
    if (vec && valid == CHUNK) {
#pragma unroll
        for (int e = 0; e < CHUNK; e += 4) {
            const float4 t = *reinterpret_cast<const float4*>(src + offset + e);
            v[e] = t.x, v[e + 1] = t.y, v[e + 2] = t.z, v[e + 3] = t.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) v[e] = e < valid ? src[offset + e] : 0.0f;
    }
}

// ∂L/∂y and saved of the thread's chunks of the slice at p0, into registers.
template <class P, int LAYOUT, int BR>
__device__ __forceinline__ void mma_fetch_act(const float* __restrict__ dout, MmaAct act,
                                              long long ld, int rows, int inner, int r0, int p0,
                                              int vec, float d[][P::CHUNK], float f[][P::CHUNK]) {
#pragma unroll
    for (int c = 0; c < ActChunks<P, LAYOUT, BR>::PER_THREAD; ++c) {
        int valid, dst;
        long long offset;
        mma_chunk<P, LAYOUT, BR>(threadIdx.x + c * MMA_THREADS, ld, rows, inner, r0, p0, valid,
                                 offset, dst);
        mma_load_f32<P::CHUNK>(dout, offset, valid, vec, d[c]);
        mma_load_f32<P::CHUNK>(act.saved, offset, valid, vec, f[c]);
    }
}

// The δ chunk as stored (bf16: pairs packed low half first; tf32: the fp32 values), into the
// stage tile and, with act.delta_out, into global memory (16-byte stores where allowed).
__device__ __forceinline__ void mma_put(gb_bf16* tile, const float v[8], MmaAct act,
                                        long long offset, int valid) {
    unsigned int w[4];
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        w[h] = gb_cvt_bf16x2(v[2 * h], v[2 * h + 1]);
        tile[2 * h] = (gb_bf16)(w[h] & 0xffffu);
        tile[2 * h + 1] = (gb_bf16)(w[h] >> 16);
    }
    if (act.delta_out == nullptr || valid <= 0) return;
    gb_bf16* out = reinterpret_cast<gb_bf16*>(act.delta_out) + offset;
    if (act.vec_out && valid == 8) {
        *reinterpret_cast<uint4*>(out) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)  // constant indices: w stays in registers
            if (e < valid) out[e] = (gb_bf16)((w[e / 2] >> (16 * (e % 2))) & 0xffffu);
    }
}

__device__ __forceinline__ void mma_put(float* tile, const float v[4], MmaAct act,
                                        long long offset, int valid) {
#pragma unroll
    for (int e = 0; e < 4; ++e) tile[e] = v[e];
    if (act.delta_out == nullptr || valid <= 0) return;
    float* out = reinterpret_cast<float*>(act.delta_out) + offset;
    if (act.vec_out && valid == 4) {
        *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (e < valid) out[e] = v[e];
    }
}

// δ of the fetched chunks (of the slice at p0) into the stage tile, and into act.delta_out
// where given; with SUMS, sums[e] += δ of element e of each chunk (an OUTER operand: a
// thread's chunks all cover the same CHUNK rows).  Out-of-range elements were fetched as 0 and
// give δ = 0 · f'(0) = 0 (and are not stored).
template <class P, int LAYOUT, int BR, bool SUMS>
__device__ __forceinline__ void mma_stash_act(typename P::elem* tile, MmaAct act, long long ld,
                                              int rows, int inner, int r0, int p0,
                                              float d[][P::CHUNK], float f[][P::CHUNK],
                                              float sums[P::CHUNK]) {
#pragma unroll
    for (int c = 0; c < ActChunks<P, LAYOUT, BR>::PER_THREAD; ++c) {
        int valid, dst;
        long long offset;
        mma_chunk<P, LAYOUT, BR>(threadIdx.x + c * MMA_THREADS, ld, rows, inner, r0, p0, valid,
                                 offset, dst);
        float delta[P::CHUNK];
#pragma unroll
        for (int e = 0; e < P::CHUNK; ++e) {
            delta[e] = (float)act_backward(act.code, (real_t)d[c][e], (real_t)f[c][e],
                                           (real_t)act.alpha);
            if (SUMS) sums[e] += delta[e];
        }
        mma_put(tile + dst, delta, act, offset, valid);
    }
}

// The A fragments (MMA_TILES_M of them) of one k-step at kk, the warp's rows from wr.
template <int LAYOUT, int BR>
__device__ __forceinline__ void mma_fragments_a(const gb_bf16* tile, int wr, int kk,
                                                unsigned int frag[MMA_TILES_M][4]) {
    typedef StageTile<PrecisionBf16, LAYOUT, BR> T;
    const int lane = threadIdx.x % 32, m = lane / 8, j = lane % 8;
#pragma unroll
    for (int i = 0; i < MMA_TILES_M; ++i) {
        const int r = wr + 16 * i + (m % 2) * 8, k = kk + (m / 2) * 8;
        if (LAYOUT == LAYOUT_INNER) {
            gb_ldmatrix_x4(frag[i], tile + (r + j) * T::STRIDE + k);
        } else {
            gb_ldmatrix_x4_trans(frag[i], tile + (k + j) * T::STRIDE + r);
        }
    }
}

template <int LAYOUT, int BR>
__device__ __forceinline__ void mma_fragments_a(const float* tile, int wr, int kk,
                                                unsigned int frag[MMA_TILES_M][4]) {
    typedef StageTile<PrecisionTf32, LAYOUT, BR> T;
    const int lane = threadIdx.x % 32, m = lane / 8, j = lane % 8;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < MMA_TILES_M; ++i) {
        const int r = wr + 16 * i;
        if (LAYOUT == LAYOUT_INNER) {
            gb_ldmatrix_x4(frag[i], tile + (r + (m % 2) * 8 + j) * T::STRIDE + kk + (m / 2) * 4);
        } else {
            frag[i][0] = __float_as_uint(tile[(kk + t) * T::STRIDE + r + g]);
            frag[i][1] = __float_as_uint(tile[(kk + t) * T::STRIDE + r + g + 8]);
            frag[i][2] = __float_as_uint(tile[(kk + t + 4) * T::STRIDE + r + g]);
            frag[i][3] = __float_as_uint(tile[(kk + t + 4) * T::STRIDE + r + g + 8]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e)
            frag[i][e] = __float_as_uint(gb_round_tf32(__uint_as_float(frag[i][e])));
    }
}

// The B fragments (MMA_TILES_N of them, in pairs) of one k-step at kk, columns from wc.
template <int LAYOUT, int BR>
__device__ __forceinline__ void mma_fragments_b(const gb_bf16* tile, int wc, int kk,
                                                unsigned int frag[MMA_TILES_N][2]) {
    typedef StageTile<PrecisionBf16, LAYOUT, BR> T;
    const int lane = threadIdx.x % 32, m = lane / 8, j = lane % 8;
#pragma unroll
    for (int jp = 0; jp < MMA_TILES_N / 2; ++jp) {
        const int n = wc + 16 * jp + (m / 2) * 8, k = kk + (m % 2) * 8;
        unsigned int r[4];
        if (LAYOUT == LAYOUT_INNER) {
            gb_ldmatrix_x4(r, tile + (n + j) * T::STRIDE + k);
        } else {
            gb_ldmatrix_x4_trans(r, tile + (k + j) * T::STRIDE + n);
        }
        frag[2 * jp][0] = r[0];
        frag[2 * jp][1] = r[1];
        frag[2 * jp + 1][0] = r[2];
        frag[2 * jp + 1][1] = r[3];
    }
}

template <int LAYOUT, int BR>
__device__ __forceinline__ void mma_fragments_b(const float* tile, int wc, int kk,
                                                unsigned int frag[MMA_TILES_N][2]) {
    typedef StageTile<PrecisionTf32, LAYOUT, BR> T;
    const int lane = threadIdx.x % 32, m = lane / 8, j = lane % 8;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int jp = 0; jp < MMA_TILES_N / 2; ++jp) {
        const int n = wc + 16 * jp;
        if (LAYOUT == LAYOUT_INNER) {
            unsigned int r[4];
            gb_ldmatrix_x4(r, tile + (n + (m / 2) * 8 + j) * T::STRIDE + kk + (m % 2) * 4);
            frag[2 * jp][0] = r[0];
            frag[2 * jp][1] = r[1];
            frag[2 * jp + 1][0] = r[2];
            frag[2 * jp + 1][1] = r[3];
        } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                frag[2 * jp + h][0] = __float_as_uint(tile[(kk + t) * T::STRIDE + n + 8 * h + g]);
                frag[2 * jp + h][1] =
                    __float_as_uint(tile[(kk + t + 4) * T::STRIDE + n + 8 * h + g]);
            }
        }
    }
#pragma unroll
    for (int jn = 0; jn < MMA_TILES_N; ++jn)
#pragma unroll
        for (int e = 0; e < 2; ++e)
            frag[jn][e] = __float_as_uint(gb_round_tf32(__uint_as_float(frag[jn][e])));
}

__device__ __forceinline__ void mma_tile(PrecisionBf16, float acc[4], const unsigned int a[4],
                                         const unsigned int b[2]) {
    gb_mma_bf16_16816(acc, a, b, acc);
}

__device__ __forceinline__ void mma_tile(PrecisionTf32, float acc[4], const unsigned int a[4],
                                         const unsigned int b[2]) {
    gb_mma_tf32_1688(acc, a, b, acc);
}

// acc[i][j][e] = Σ_p A(row, p) B(col, p) for the thread's accumulator elements:
// row = blockIdx.x·MMA_BM + warp row + 16 i + lane/4 + 8 (e/2), col = blockIdx.y·MMA_BN + warp
// column + 8 j + 2 (lane%4) + e%2 (the ISA's C fragment).
// With ACT_A, `a` is ∂L/∂y (fp32) and the A operand δ = a ⊙ f'(act.saved), formed on load;
// with ROW_SUMS also sums[e] = Σ_p δ over the thread's chunk rows (see mma_stash_act).
template <class P, int LAYOUT_A, int LAYOUT_B, bool ACT_A = false, bool ROW_SUMS = false,
          class AElem = typename P::elem>
__device__ __forceinline__ void mma_mainloop(const AElem* __restrict__ a, long long lda,
                                             const typename P::elem* __restrict__ b, long long ldb,
                                             int rows, int cols, int inner,
                                             float acc[MMA_TILES_M][MMA_TILES_N][4],
                                             MmaAct act = MmaAct{}, float* sums = nullptr) {
    typedef typename P::elem elem;
    static_assert(!ROW_SUMS || (ACT_A && LAYOUT_A == LAYOUT_OUTER),
                  "row sums are taken of a δ operand staged [p][r]");
    constexpr int ACT_PER = ACT_A ? ActChunks<P, LAYOUT_A, MMA_BM>::PER_THREAD : 1;
    float act_d[ACT_PER][P::CHUNK], act_f[ACT_PER][P::CHUNK];
    float no_sums[P::CHUNK];
    typedef StageTile<P, LAYOUT_A, MMA_BM> TA;
    typedef StageTile<P, LAYOUT_B, MMA_BN> TB;
    // Dynamic shared memory, MMA_STAGES × (A tile, B tile): mma_shared_bytes() of them, which
    // the launcher passes (static __shared__ would cap a GPU at 48 KiB).
    GB_DYNAMIC_SHARED(unsigned char, mma_smem);
    static_assert(MmaShared<P, LAYOUT_A, LAYOUT_B>::BYTES <= 48 * 1024,
                  "more than 48 KiB of dynamic shared memory needs an opt-in attribute");
    elem(*smem_a)[TA::ELEMS] = reinterpret_cast<elem(*)[TA::ELEMS]>(mma_smem);
    elem(*smem_b)[TB::ELEMS] =
        reinterpret_cast<elem(*)[TB::ELEMS]>(mma_smem + MMA_STAGES * TA::ELEMS * sizeof(elem));
    const int r0 = blockIdx.x * MMA_BM, c0 = blockIdx.y * MMA_BN;
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * MMA_WARP_M, wc = (warp % 2) * MMA_WARP_N;
    int vec_a;
    if constexpr (ACT_A) {
        vec_a = mma_vec_ok<PrecisionTf32>(a, lda) && mma_vec_ok<PrecisionTf32>(act.saved, lda);
    } else {
        vec_a = mma_vec_ok<P>(a, lda);
    }
    const int vec_b = mma_vec_ok<P>(b, ldb);
    float* row_sums = ROW_SUMS ? sums : no_sums;

#pragma unroll
    for (int i = 0; i < MMA_TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < MMA_TILES_N; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int slices = (inner + P::BK - 1) / P::BK;
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; ++s) {
        if (s < slices) {
            if constexpr (ACT_A) {
                mma_fetch_act<P, LAYOUT_A, MMA_BM>(a, act, lda, rows, inner, r0, s * P::BK, vec_a,
                                                   act_d, act_f);
                mma_stash_act<P, LAYOUT_A, MMA_BM, ROW_SUMS>(
                    smem_a[s], act, lda, rows, inner, r0, s * P::BK, act_d, act_f, row_sums);
            } else {
                mma_load_stage<P, LAYOUT_A, MMA_BM>(smem_a[s], a, lda, rows, inner, r0, s * P::BK,
                                                    vec_a);
            }
            mma_load_stage<P, LAYOUT_B, MMA_BN>(smem_b[s], b, ldb, cols, inner, c0, s * P::BK, vec_b);
        }
        gb_cp_async_commit();  // one group per slice, empty past the end
    }
    for (int slice = 0; slice < slices; ++slice) {
        gb_cp_async_wait<MMA_STAGES - 2>();  // this thread's copies of `slice` have landed
        __syncthreads();                     // ... and everyone's; the stage refilled below
                                             // was last read before this barrier
        const int next = slice + MMA_STAGES - 1;
        if (next < slices) {
            const int s = next % MMA_STAGES;
            if constexpr (ACT_A) {  // into registers now, δ into shared memory after the mma's
                mma_fetch_act<P, LAYOUT_A, MMA_BM>(a, act, lda, rows, inner, r0, next * P::BK,
                                                   vec_a, act_d, act_f);
            } else {
                mma_load_stage<P, LAYOUT_A, MMA_BM>(smem_a[s], a, lda, rows, inner, r0,
                                                    next * P::BK, vec_a);
            }
            mma_load_stage<P, LAYOUT_B, MMA_BN>(smem_b[s], b, ldb, cols, inner, c0, next * P::BK, vec_b);
        }
        gb_cp_async_commit();
        const elem* ta = smem_a[slice % MMA_STAGES];
        const elem* tb = smem_b[slice % MMA_STAGES];
#pragma unroll
        for (int kk = 0; kk < P::BK; kk += P::KSTEP) {
            unsigned int fa[MMA_TILES_M][4], fb[MMA_TILES_N][2];
            mma_fragments_a<LAYOUT_A, MMA_BM>(ta, wr, kk, fa);
            mma_fragments_b<LAYOUT_B, MMA_BN>(tb, wc, kk, fb);
#pragma unroll
            for (int i = 0; i < MMA_TILES_M; ++i)
#pragma unroll
                for (int j = 0; j < MMA_TILES_N; ++j) mma_tile(P(), acc[i][j], fa[i], fb[j]);
        }
        if constexpr (ACT_A) {
            // Stage `next` was last read in the previous iteration, before this one's barrier;
            // it is read after the next barrier.
            if (next < slices)
                mma_stash_act<P, LAYOUT_A, MMA_BM, ROW_SUMS>(smem_a[next % MMA_STAGES], act, lda,
                                                             rows, inner, r0, next * P::BK, act_d,
                                                             act_f, row_sums);
        }
    }
    gb_cp_async_wait<0>();  // only empty groups remain; nothing is left in flight at exit
}

__device__ __forceinline__ int mma_row(int i, int e) {
    return blockIdx.x * MMA_BM + ((threadIdx.x / 32) / 2) * MMA_WARP_M + 16 * i +
           (threadIdx.x % 32) / 4 + 8 * (e / 2);
}

__device__ __forceinline__ int mma_col(int j, int e) {
    return blockIdx.y * MMA_BN + ((threadIdx.x / 32) % 2) * MMA_WARP_N + 8 * j +
           2 * (threadIdx.x % 4) + e % 2;
}

__device__ __forceinline__ void mma_store(float* __restrict__ c, int rows, int cols,
                                          float acc[MMA_TILES_M][MMA_TILES_N][4]) {
#pragma unroll
    for (int i = 0; i < MMA_TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < MMA_TILES_N; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = mma_row(i, e), col = mma_col(j, e);
                if (r < rows && col < cols) c[(long long)r * cols + col] = acc[i][j][e];
            }
}

// Y = f(acc + b), Z = acc + b when write_z, Y in bf16 (y16) when write_y16.
__device__ __forceinline__ void mma_forward_epilogue(const float* __restrict__ bias,
                                                     float* __restrict__ y, float* __restrict__ z,
                                                     gb_bf16* __restrict__ y16, int M, int N,
                                                     int has_bias, int write_z, int write_y16,
                                                     int act_code, float alpha,
                                                     float acc[MMA_TILES_M][MMA_TILES_N][4]) {
#pragma unroll
    for (int j = 0; j < MMA_TILES_N; ++j) {
        float b[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int col = mma_col(j, e);
            b[e] = (has_bias && col < N) ? bias[col] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < MMA_TILES_M; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // rows lane/4 and lane/4 + 8
                const int r = mma_row(i, 2 * h);
                if (r >= M) continue;
                float out[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = mma_col(j, e);
                    const float pre = acc[i][j][2 * h + e] + b[e];
                    out[e] = (float)act_forward(act_code, (real_t)pre, (real_t)alpha);
                    if (col < N) {
                        const long long at = (long long)r * N + col;
                        if (write_z) z[at] = pre;
                        y[at] = out[e];
                    }
                }
                if (write_y16) {
                    const unsigned int pair = gb_cvt_bf16x2(out[0], out[1]);
                    const int col = mma_col(j, 0);
                    const long long at = (long long)r * N + col;
                    if (col < N) y16[at] = (gb_bf16)(pair & 0xffffu);
                    if (col + 1 < N) y16[at + 1] = (gb_bf16)(pair >> 16);
                }
            }
    }
}

// db[r0 + r] = Σ over the threads holding rows r of their sums (mma_stash_act), in thread
// order, for the block's MMA_BM rows: the partial sums go through shared memory (the stages,
// free once every warp has finished its mma's).  Called by the whole block.
template <class P>
__device__ __forceinline__ void mma_row_sums(const float sums[P::CHUNK], float* __restrict__ db,
                                             int rows, int r0) {
    constexpr int GROUPS = MMA_BM / P::CHUNK;  // chunks across a stage row; a thread owns one
    constexpr int PLANES = MMA_THREADS / GROUPS;
    static_assert(MMA_THREADS % GROUPS == 0 && MMA_BM <= MMA_THREADS, "row sums layout");
    GB_DYNAMIC_SHARED(unsigned char, mma_smem);
    float* part = reinterpret_cast<float*>(mma_smem);  // [PLANES][MMA_BM]
    __syncthreads();
    const int plane = threadIdx.x / GROUPS, r = (threadIdx.x % GROUPS) * P::CHUNK;
#pragma unroll
    for (int e = 0; e < P::CHUNK; ++e) part[plane * MMA_BM + r + e] = sums[e];
    __syncthreads();
    if (threadIdx.x < MMA_BM && r0 + (int)threadIdx.x < rows) {
        float total = 0.0f;
        for (int q = 0; q < PLANES; ++q) total += part[q * MMA_BM + threadIdx.x];
        db[r0 + threadIdx.x] = total;
    }
}

// The fused dW of one precision P: dW (N,K) = δᵀ X with db (N) = Σ_m δ when has_bias, δ = ∂L/∂y
// ⊙ f'(saved) formed on load from fp32 dout and saved; with write_delta the blocks of column
// tile 0 (they load every δ once) also store δ in P's element type (delta_out, (M,N)), the
// operand of the dX GEMM that follows.
template <class P>
__device__ __forceinline__ void mma_backward_weight_act(
    const float* __restrict__ dout, const float* __restrict__ saved,
    const typename P::elem* __restrict__ x, float* __restrict__ dw, float* __restrict__ db,
    typename P::elem* __restrict__ delta_out, int M, int N, int K, int act_code, float alpha,
    int has_bias, int write_delta) {
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    float sums[P::CHUNK];
#pragma unroll
    for (int e = 0; e < P::CHUNK; ++e) sums[e] = 0.0f;
    const bool store = write_delta && blockIdx.y == 0;
    const MmaAct act{saved, act_code, alpha, store ? delta_out : nullptr,
                     store && mma_vec_ok<P>(delta_out, N)};
    mma_mainloop<P, LAYOUT_OUTER, LAYOUT_OUTER, true, true, float>(dout, N, x, K, N, K, M, acc,
                                                                   act, sums);
    mma_store(dw, N, K, acc);
    if (has_bias && blockIdx.y == 0) mma_row_sums<P>(sums, db, N, blockIdx.x * MMA_BM);
}

// ---- bf16 ------------------------------------------------------------------------------------

// grid (⌈M/MMA_BM⌉, ⌈N/MMA_BN⌉), block MMA_THREADS.  z is written only when write_z, y16 (Y in
// bf16) only when write_y16 (else any valid pointer).
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_forward_bf16(const gb_bf16* __restrict__ x, const gb_bf16* __restrict__ w,
                   const float* __restrict__ bias, float* __restrict__ y, float* __restrict__ z,
                   gb_bf16* __restrict__ y16, int M, int N, int K, int has_bias, int write_z,
                   int write_y16, int act_code, float alpha) {
#if GB_HAS_TENSOR_CORES
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    mma_mainloop<PrecisionBf16, LAYOUT_INNER, LAYOUT_INNER>(x, K, w, K, M, N, K, acc);
    mma_forward_epilogue(bias, y, z, y16, M, N, has_bias, write_z, write_y16, act_code, alpha,
                         acc);
#else
    __trap();
#endif
}

// dX (M,K) = δ W.  grid (⌈M/MMA_BM⌉, ⌈K/MMA_BN⌉).
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_backward_data_bf16(const gb_bf16* __restrict__ delta, const gb_bf16* __restrict__ w,
                         float* __restrict__ dx, int M, int N, int K) {
#if GB_HAS_TENSOR_CORES
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    mma_mainloop<PrecisionBf16, LAYOUT_INNER, LAYOUT_OUTER>(delta, N, w, K, M, K, N, acc);
    mma_store(dx, M, K, acc);
#else
    __trap();
#endif
}

// dW (N,K) = δᵀ X.  grid (⌈N/MMA_BM⌉, ⌈K/MMA_BN⌉).  M = 0 gives zeros.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_backward_weight_bf16(const gb_bf16* __restrict__ delta, const gb_bf16* __restrict__ x,
                           float* __restrict__ dw, int M, int N, int K) {
#if GB_HAS_TENSOR_CORES
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    mma_mainloop<PrecisionBf16, LAYOUT_OUTER, LAYOUT_OUTER>(delta, N, x, K, N, K, M, acc);
    mma_store(dw, N, K, acc);
#else
    __trap();
#endif
}

// dW (N,K) = δᵀ X and, with has_bias, db (N) = Σ_m δ (fp32), δ = dout ⊙ f'(saved) formed on
// load and rounded to bf16 for the products; with write_delta also bf16(δ) into delta16 (M,N),
// dense_backward_data_bf16's operand.  grid (⌈N/MMA_BM⌉, ⌈K/MMA_BN⌉), K ≥ 1.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_backward_weight_act_bf16(const float* __restrict__ dout, const float* __restrict__ saved,
                               const gb_bf16* __restrict__ x, float* __restrict__ dw,
                               float* __restrict__ db, gb_bf16* __restrict__ delta16, int M, int N,
                               int K, int act_code, float alpha, int has_bias, int write_delta) {
#if GB_HAS_TENSOR_CORES
    mma_backward_weight_act<PrecisionBf16>(dout, saved, x, dw, db, delta16, M, N, K, act_code,
                                           alpha, has_bias, write_delta);
#else
    __trap();
#endif
}

// ---- tf32 ------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_forward_tf32(const float* __restrict__ x, const float* __restrict__ w,
                   const float* __restrict__ bias, float* __restrict__ y, float* __restrict__ z,
                   int M, int N, int K, int has_bias, int write_z, int act_code, float alpha) {
#if GB_HAS_TENSOR_CORES
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    mma_mainloop<PrecisionTf32, LAYOUT_INNER, LAYOUT_INNER>(x, K, w, K, M, N, K, acc);
    mma_forward_epilogue(bias, y, z, nullptr, M, N, has_bias, write_z, 0, act_code, alpha, acc);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_backward_data_tf32(const float* __restrict__ delta, const float* __restrict__ w,
                         float* __restrict__ dx, int M, int N, int K) {
#if GB_HAS_TENSOR_CORES
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    mma_mainloop<PrecisionTf32, LAYOUT_INNER, LAYOUT_OUTER>(delta, N, w, K, M, K, N, acc);
    mma_store(dx, M, K, acc);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_backward_weight_tf32(const float* __restrict__ delta, const float* __restrict__ x,
                           float* __restrict__ dw, int M, int N, int K) {
#if GB_HAS_TENSOR_CORES
    float acc[MMA_TILES_M][MMA_TILES_N][4];
    mma_mainloop<PrecisionTf32, LAYOUT_OUTER, LAYOUT_OUTER>(delta, N, x, K, N, K, M, acc);
    mma_store(dw, N, K, acc);
#else
    __trap();
#endif
}

// As dense_backward_weight_act_bf16, δ kept fp32 (rounded to tf32 in the fragments); with
// write_delta δ (fp32) into delta (M,N), dense_backward_data_tf32's operand.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_backward_weight_act_tf32(const float* __restrict__ dout, const float* __restrict__ saved,
                               const float* __restrict__ x, float* __restrict__ dw,
                               float* __restrict__ db, float* __restrict__ delta, int M, int N,
                               int K, int act_code, float alpha, int has_bias, int write_delta) {
#if GB_HAS_TENSOR_CORES
    mma_backward_weight_act<PrecisionTf32>(dout, saved, x, dw, db, delta, M, N, K, act_code,
                                           alpha, has_bias, write_delta);
#else
    __trap();
#endif
}

// ---- conversion --------------------------------------------------------------------------------

// out = bf16(x), round to nearest even; any grid (grid-stride loop over n elements).
extern "C" __global__ void to_bf16(const float* __restrict__ x, gb_bf16* __restrict__ out,
                                   long long n) {
#if GB_HAS_TENSOR_CORES
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = (gb_bf16)(gb_cvt_bf16x2(x[i], 0.0f) & 0xffffu);
    }
#else
    __trap();
#endif
}

// c = a + b (a residual block's sum) and c16 = bf16(c) (round to nearest even), the next
// layer's operand, in one pass; any grid (grid-stride loop over n elements).
extern "C" __global__ void add_bf16(const float* __restrict__ a, const float* __restrict__ b,
                                    float* __restrict__ c, gb_bf16* __restrict__ c16, long long n) {
#if GB_HAS_TENSOR_CORES
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float sum = a[i] + b[i];
        c[i] = sum;
        c16[i] = (gb_bf16)(gb_cvt_bf16x2(sum, 0.0f) & 0xffffu);
    }
#else
    __trap();
#endif
}
