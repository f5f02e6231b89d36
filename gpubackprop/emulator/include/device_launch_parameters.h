// device_launch_parameters.h for the CPU emulator: threadIdx, blockIdx, blockDim, gridDim and
// warpSize come from cuda_emu.h.
#ifndef GBEMU_DEVICE_LAUNCH_PARAMETERS_H
#define GBEMU_DEVICE_LAUNCH_PARAMETERS_H
#endif  // GBEMU_DEVICE_LAUNCH_PARAMETERS_H
