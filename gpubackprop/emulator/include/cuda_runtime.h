// cuda_runtime.h for the CPU emulator: kernels often include it for the device built-ins, which
// cuda_emu.h already provides (the host runtime API -- cudaMalloc, streams -- is not emulated:
// kernels are launched from Python).
#ifndef GBEMU_CUDA_RUNTIME_H
#define GBEMU_CUDA_RUNTIME_H
#endif  // GBEMU_CUDA_RUNTIME_H
