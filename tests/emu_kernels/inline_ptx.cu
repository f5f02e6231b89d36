// Inline PTX: the emulator must refuse it, naming this file and line 5.
extern "C" __global__ void uses_ptx(unsigned int* out) {
    unsigned int lane;
    // asm("this comment must not count");
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    out[threadIdx.x] = lane;
}
