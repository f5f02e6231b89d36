"""CPU emulator for CUDA kernels: g++-compiled, one fiber per CUDA thread.

``RawModule``/``RawKernel`` (raw.py) mirror CuPy's, so a kernel of your own runs on the CPU by
changing one import; docs/emulator.md says what the emulator runs, checks and refuses.

See cuda_emu.h for the execution model and launch.py for the checks it adds (out-of-bounds
writes, unwritten outputs, divergent barriers, argument types, faults and misaligned vector
accesses in kernel code, reported as EmuLaunchError instead of killing the process).
Environment variables:

- GPUBACKPROP_EMU_SHUFFLE=<seed>  run the blocks of a grid in a shuffled order, and the
  threads of a block in a shuffled order between barriers, to expose races (0 or unset:
  blockIdx and thread order).
- GPUBACKPROP_EMU_DEBUG=1         build with -O0 -g, for gdb.
- GPUBACKPROP_EMU_UCONTEXT=1      use the portable ucontext fiber switch instead of the
  x86-64 assembly one.
- GPUBACKPROP_EMU_STACK_KIB=<KiB> the stack of each emulated thread (default 256); a kernel
  that needs more is stopped with "fiber stack overflow".
- GPUBACKPROP_EMU_GUARD_CHECK=1   run each launch twice with different guard bytes: an output
  that changes was computed from a read out of bounds.
- GPUBACKPROP_EMU_DEVICE_ARRAYS=1 the emu backend's arrays follow CuPy's rules: no implicit
  conversion to NumPy, no mixing with NumPy arrays (device_arrays.py).
- GPUBACKPROP_EMU_CXX / CXX       the compiler (default g++).
- GPUBACKPROP_CACHE_DIR / XDG_CACHE_HOME  where compiled libraries are cached (…/emu).
"""

from __future__ import annotations

from .compiler import EmuCompileError, EmuUnsupportedError, cache_dir, find_compiler
from .device import EmuSeam, device_arrays_from_env
from .launch import EmuLaunchError, EmuModule
from .raw import RawKernel, RawModule, UnsupportedCupyFeature

__all__ = [
    "EmuCompileError",
    "EmuLaunchError",
    "EmuModule",
    "EmuSeam",
    "EmuUnsupportedError",
    "RawKernel",
    "RawModule",
    "UnsupportedCupyFeature",
    "cache_dir",
    "device_arrays_from_env",
    "find_compiler",
]
