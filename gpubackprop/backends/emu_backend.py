"""Emu backend: the launchers of kernel_backend.py on the CPU emulator (gpubackprop/emulator/).

The kernels of kernels/ are compiled with g++ against an emulation header and run with one
fiber per CUDA thread, blocks one after another, with checks a GPU does not give: argument
types, out-of-bounds writes, unwritten outputs, divergent barriers.  What a GPU stops with an
error (a fault in kernel code, a misaligned float4/double2 access, a fiber stack overflow)
raises EmuLaunchError; the process survives and the next launch works.  Slow (a 129³ tiled
SGEMM takes ~15 ms) but it runs every kernel on every CI machine.  With device_arrays=True
(GPUBACKPROP_EMU_DEVICE_ARRAYS=1) its arrays refuse implicit conversion to NumPy as CuPy's do.

The constructor never raises: without a C++ compiler the backend is ``available = False``
with the reason.
"""

from __future__ import annotations

from ..emulator import EmuSeam, find_compiler
from ..kernels import kernel_dir
from .kernel_backend import KernelBackend

__all__ = ["EmuBackend", "EmuSeam"]


class EmuBackend(KernelBackend):
    """The kernels of kernels/ on the CPU emulator."""

    name = "emu"

    def __init__(
        self,
        gemm_version: str = "tiled",
        shuffle_seed: int | None = None,
        device_arrays: bool = False,
    ) -> None:
        """``device_arrays``: hand out arrays with CuPy's rules (emulator/device_arrays.py)."""
        super().__init__(EmuSeam(shuffle_seed, device_arrays), gemm_version=gemm_version)
        self.available = False
        self.reason = ""
        if find_compiler() is None:
            self.reason = (
                "no C++ compiler for the CPU emulator: install g++ or set CXX / GPUBACKPROP_EMU_CXX"
            )
            return
        try:
            kernel_dir()
        except FileNotFoundError as error:
            self.reason = str(error)
            return
        self.available = True
