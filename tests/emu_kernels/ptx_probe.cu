// Probes for the PTX twins of kernels/ptx_twins.cuh (tests/test_ptx_twins.py): each kernel
// feeds one instruction the registers or shared memory a NumPy model of the PTX ISA prepared,
// and writes back what the instruction produced.  The test prepends ptx_twins.cuh.

// One m16n8k16 bf16 mma per warp: lane i's registers are a[4i..], b[2i..], c[4i..].
extern "C" __global__ void probe_mma_bf16(const unsigned int* a, const unsigned int* b,
                                          const float* c, float* d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int ra[4] = {a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]};
    unsigned int rb[2] = {b[2 * i], b[2 * i + 1]};
    float rc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
    float rd[4];
    gb_mma_bf16_16816(rd, ra, rb, rc);
    for (int j = 0; j < 4; ++j) d[4 * i + j] = rd[j];
}

// One m16n8k8 tf32 mma per warp, registers as above.
extern "C" __global__ void probe_mma_tf32(const unsigned int* a, const unsigned int* b,
                                          const float* c, float* d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int ra[4] = {a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]};
    unsigned int rb[2] = {b[2 * i], b[2 * i + 1]};
    float rc[4];
    for (int j = 0; j < 4; ++j) rc[j] = c[4 * i + j];
    gb_mma_tf32_1688(rc, ra, rb, rc);  // d aliases c, as the kernels accumulate
    for (int j = 0; j < 4; ++j) d[4 * i + j] = rc[j];
}

// src (1024 b16) is copied to shared memory; lane l gives row address tile + offset[l].
extern "C" __global__ void probe_ldmatrix(const unsigned short* src, const int* offset,
                                          int trans, unsigned int* out) {
    __shared__ __align__(16) unsigned short tile[1024];
    for (int i = threadIdx.x; i < 1024; i += blockDim.x) tile[i] = src[i];
    __syncthreads();
    unsigned int r[4];
    if (trans) {
        gb_ldmatrix_x4_trans(r, tile + offset[threadIdx.x]);
    } else {
        gb_ldmatrix_x4(r, tile + offset[threadIdx.x]);
    }
    for (int j = 0; j < 4; ++j) out[4 * threadIdx.x + j] = r[j];
}

// ldmatrix straight from global memory: not allowed (ldmatrix reads shared memory only).
extern "C" __global__ void probe_ldmatrix_global(const unsigned short* src, unsigned int* out) {
    unsigned int r[4];
    gb_ldmatrix_x4(r, src + 8 * threadIdx.x);
    for (int j = 0; j < 4; ++j) out[4 * threadIdx.x + j] = r[j];
}

// Three groups of one 16-byte copy per thread (the third copies src_bytes of 16).  `early`
// is what the thread reads of its own destinations after wait_group 1 (groups 0 and 1 have
// landed, group 2 may not have); `out` what it reads of its neighbour's after wait_group 0 and
// a barrier.
// The copies and reads of probe_cp_async on a given buffer[3][128].
__device__ __forceinline__ void cp_async_probe(float (*buffer)[128], const float* src,
                                               int src_bytes, float* early, float* out) {
    const int t = threadIdx.x;
    for (int group = 0; group < 3; ++group) {
        gb_cp_async_16(&buffer[group][4 * t], src + group * 128 + 4 * t,
                       group == 2 ? src_bytes : 16);
        gb_cp_async_commit();
    }
    gb_cp_async_wait<1>();
    for (int group = 0; group < 3; ++group)
        for (int j = 0; j < 4; ++j) early[12 * t + 4 * group + j] = buffer[group][4 * t + j];
    gb_cp_async_wait<0>();
    __syncthreads();
    const int next = (t + 1) % 32;
    for (int group = 0; group < 3; ++group)
        for (int j = 0; j < 4; ++j) out[12 * t + 4 * group + j] = buffer[group][4 * next + j];
}

extern "C" __global__ void probe_cp_async(const float* src, int src_bytes, float* early,
                                          float* out) {
    __shared__ __align__(16) float buffer[3][128];
    cp_async_probe(buffer, src, src_bytes, early, out);
}

// The same with the buffer a template's static __shared__ (which the emulator keeps apart).
template <int GROUPS>
__device__ void cp_async_probe_in_template(const float* src, int src_bytes, float* early,
                                           float* out) {
    __shared__ __align__(16) float buffer[GROUPS][128];
    cp_async_probe(buffer, src, src_bytes, early, out);
}

extern "C" __global__ void probe_cp_async_template(const float* src, int src_bytes,
                                                   float* early, float* out) {
    cp_async_probe_in_template<3>(src, src_bytes, early, out);
}

// ldmatrix of data whose cp.async has not been waited for: a race the emulator must report.
extern "C" __global__ void probe_ldmatrix_before_wait(const unsigned short* src,
                                                      unsigned int* out) {
    __shared__ __align__(16) unsigned short tile[256];
    gb_cp_async_16(tile + 8 * threadIdx.x, src + 8 * threadIdx.x, 16);
    gb_cp_async_commit();
    __syncthreads();
    unsigned int r[4];
    gb_ldmatrix_x4(r, tile + 8 * threadIdx.x);
    gb_cp_async_wait<0>();
    for (int j = 0; j < 4; ++j) out[4 * threadIdx.x + j] = r[j];
}

// A shared-memory store to a destination whose cp.async is still in flight.
extern "C" __global__ void probe_store_during_copy(const float* src, float* out) {
    __shared__ __align__(16) float buffer[128];
    gb_cp_async_16(&buffer[4 * threadIdx.x], src + 4 * threadIdx.x, 16);
    gb_cp_async_commit();
    buffer[4 * threadIdx.x] = 1.0f;
    gb_cp_async_wait<0>();
    out[threadIdx.x] = buffer[4 * threadIdx.x];
}

// out[i] = the bf16 pair (x[2i], x[2i+1]) of cvt.rn.bf16x2.f32.
extern "C" __global__ void probe_cvt_bf16x2(const float* x, unsigned int* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = gb_cvt_bf16x2(x[2 * i], x[2 * i + 1]);
}

// y = x rounded to tf32 (to nearest even).
extern "C" __global__ void probe_round_tf32(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = gb_round_tf32(x[i]);
}
