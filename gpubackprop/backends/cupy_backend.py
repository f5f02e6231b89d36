"""CuPy backend: the launchers of kernel_backend.py on a CUDA GPU.

CupySeam implements the device seam with CuPy: a kernels/ source becomes a cupy.RawModule
(compiled by NVRTC, cached per source text and device, and on disk by CuPy), an ElementwiseSpec
becomes a cupy.ElementwiseKernel whose preamble defines REAL_T as the dtype and inlines the
shared device functions.

CuPy is imported lazily, in CupyBackend's constructor, which never raises: without CuPy, a GPU
or a driver the backend reports ``available = False`` and keeps the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Any

import numpy as np

from ..kernels import (
    NVRTC_OPTIONS,
    KernelCompileError,
    elementwise_label,
    elementwise_preamble,
    format_compile_error,
    load_source,
    note_compiled,
)
from ..precision import PRECISIONS, check_precision
from .kernel_backend import KernelBackend
from .seam import ElementwiseSpec

__all__ = ["CPU_BACKENDS_HINT", "CupyBackend", "CupySeam", "nvidia_driver_present"]

CPU_BACKENDS_HINT = (
    "use backend 'numpy' (the NumPy reference) or 'emu' (the same CUDA kernels on the CPU "
    "emulator) on this machine"
)
_DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


# CuPy 14 compiles against the CUDA toolkit's headers and loads cuBLAS and friends at run time;
# a machine with only the NVIDIA driver has neither, and CuPy says "Failed to find CUDA headers"
# (or NVRTC cannot open cuda_runtime.h / vector_types.h).  The [ctk] extra of CuPy's wheel
# installs them from PyPI.
TOOLKIT_HINT = (
    "CuPy cannot find the CUDA toolkit headers and libraries it compiles kernels with; install "
    "them with pip install 'gpubackprop[cuda13]' (or [cuda12]), which pulls "
    "cupy-cuda13x[ctk] (cupy-cuda12x[ctk]), or install the CUDA toolkit"
)
_MISSING_TOOLKIT_SIGNS = (
    "failed to find cuda headers",
    'cannot open source file "cuda',
    'cannot open source file "vector_types.h"',
    'cannot open source file "cuda_fp16',
)


def missing_toolkit_error(error: BaseException, what: str) -> KernelCompileError | None:
    """A KernelCompileError saying what to install when ``error`` (raised compiling ``what``)
    comes from a missing CUDA toolkit; None for any other error."""
    text = str(error)
    get_message = getattr(error, "get_message", None)
    if callable(get_message):
        with contextlib.suppress(Exception):
            text += "\n" + str(get_message())
    if not any(sign in text.lower() for sign in _MISSING_TOOLKIT_SIGNS):
        return None
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return KernelCompileError(
        f"CUDA compile of {what} failed: {TOOLKIT_HINT} ({first_line})", what, text
    )


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver's CUDA library loads: without it there is no usable NVIDIA
    GPU, whatever error the CUDA runtime gives."""
    try:
        ctypes.CDLL(_DRIVER_LIBRARY)
    except OSError:
        return False
    return True


class _Module:
    """A compiled RawModule and its functions, looked up once."""

    def __init__(self, raw: Any, file: str) -> None:
        self.raw = raw
        self.file = file
        self.functions: dict[str, Any] = {}

    def function(self, kernel: str) -> Any:
        if kernel not in self.functions:
            try:
                self.functions[kernel] = self.raw.get_function(kernel)
            except Exception as error:
                raise ValueError(
                    f"kernel {kernel!r} is not an entry point of kernels/{self.file}: {error}"
                ) from error
        return self.functions[kernel]


class CupySeam:
    """DeviceSeam over CuPy (see seam.py)."""

    name = "cupy"

    def __init__(self, cupy: Any, device_name: str = "") -> None:
        self.cupy = cupy
        self.xp = cupy
        self._device_name = device_name
        self._modules: dict[tuple[str, int], _Module] = {}
        self._elementwise: dict[tuple[str, str, int], Any] = {}

    def _device(self) -> int:
        return int(self.cupy.cuda.Device().id)

    def compile(
        self, source_file: str, defines: dict[str, str], name_expressions: tuple[str, ...] = ()
    ) -> _Module:
        source = load_source(source_file, defines)
        name_expressions = tuple(name_expressions)
        key = (source.key, name_expressions, self._device())
        if key not in self._modules:
            from cupy.cuda.compiler import CompileException

            # Templated kernels are instantiated by name expression and looked up by it.
            extra = {"name_expressions": list(name_expressions)} if name_expressions else {}
            raw = self.cupy.RawModule(code=source.text, options=NVRTC_OPTIONS, **extra)
            try:
                raw.compile()
            except Exception as error:
                missing = missing_toolkit_error(error, f"kernels/{source.file}")
                if missing is not None:
                    raise missing from None
                if not isinstance(error, CompileException):
                    raise
                log = error.get_message()
                raise KernelCompileError(
                    format_compile_error(source.file, source.text, log), source.file, log
                ) from None
            self._modules[key] = _Module(raw, source.file)
            note_compiled(source)
        return self._modules[key]

    def launch(
        self,
        module: _Module,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: tuple[Any, ...],
        shared_mem: int = 0,
    ) -> None:
        module.function(kernel)(grid, block, args, shared_mem=shared_mem)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.cupy.empty(shape, dtype=dtype)

    def check_device(self, name: str, array: Any) -> None:
        """Kernels launch on the current device; an operand elsewhere would be misread."""
        current = self._device()
        if array.device.id != current:
            raise ValueError(
                f"{name} is on GPU {array.device.id} but the kernels run on GPU {current}; "
                f"copy it there first (with cupy.cuda.Device({current}): cupy.asarray(...))"
            )

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def device_name(self) -> str:
        return self._device_name

    def elementwise(self, spec: ElementwiseSpec, dtype: Any):
        key = (spec.name, np.dtype(dtype).str, self._device())
        if key not in self._elementwise:
            kernel = self.cupy.ElementwiseKernel(
                spec.in_params,
                spec.out_params,
                spec.operation,
                spec.name,
                preamble=elementwise_preamble(spec, dtype),
                options=NVRTC_OPTIONS,
            )
            self._elementwise[key] = _Elementwise(kernel, spec)
        return self._elementwise[key]


class _Elementwise:
    """A cupy.ElementwiseKernel whose compile error (raised by CuPy at the first call, with the
    code CuPy generated) becomes a KernelCompileError naming the spec and its source lines."""

    def __init__(self, kernel: Any, spec: ElementwiseSpec) -> None:
        self.kernel = kernel
        self.spec = spec

    def __call__(self, *args: Any) -> Any:
        from cupy.cuda.compiler import CompileException

        try:
            return self.kernel(*args)
        except Exception as error:
            missing = missing_toolkit_error(error, elementwise_label(self.spec))
            if missing is not None:
                raise missing from None
            if not isinstance(error, CompileException):
                raise
            log = error.get_message()
            files = list(self.spec.preamble_files)
            label = f"ElementwiseKernel {self.spec.name} (preamble {files})"
            raise KernelCompileError(
                format_compile_error(elementwise_label(self.spec), error.source, log, label=label),
                elementwise_label(self.spec),
                log,
            ) from None


def tensor_core_precisions(compute_capability: tuple[int, int]) -> tuple[str, ...]:
    """The GEMM precisions a GPU of ``compute_capability`` runs: all from 8.0 on, else fp32."""
    return PRECISIONS if tuple(compute_capability) >= (8, 0) else ("fp32",)


class CupyBackend(KernelBackend):
    """The kernels of kernels/ on the current CUDA device."""

    name = "cupy"

    def __init__(self, gemm_version: str = "tiled", gemm_tiles: dict | None = None) -> None:
        self.available = False
        self.reason = ""
        self.compute_capability = (0, 0)
        self.seam = None
        self.xp = None
        try:
            import cupy
        except Exception as error:  # ImportError, or a broken CUDA installation
            self.reason = (
                f"CuPy is not importable ({type(error).__name__}: {error}); "
                "install gpubackprop[cuda12] or gpubackprop[cuda13]"
            )
            return
        try:
            count = cupy.cuda.runtime.getDeviceCount()
            if count < 1:
                self.reason = f"CuPy found no CUDA device; {CPU_BACKENDS_HINT}"
                return
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        except cupy.cuda.runtime.CUDARuntimeError as error:
            if not nvidia_driver_present():
                # Without libcuda the CUDA runtime reports "driver version is insufficient",
                # which would send the user to upgrade a driver the machine does not have.
                self.reason = (
                    f"no NVIDIA GPU found (the NVIDIA driver library {_DRIVER_LIBRARY} is not "
                    f"installed); {CPU_BACKENDS_HINT}"
                )
            else:
                self.reason = f"no usable CUDA GPU or driver: {error}"
            return
        except Exception as error:
            self.reason = f"CUDA initialisation failed: {type(error).__name__}: {error}"
            return
        name = props.get("name", b"")
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        self.compute_capability = (int(props.get("major", 0)), int(props.get("minor", 0)))
        super().__init__(CupySeam(cupy, name), gemm_version=gemm_version, gemm_tiles=gemm_tiles)
        self.available = True

    def precisions(self) -> tuple[str, ...]:
        """bf16 and tf32 mma.sync need compute capability 8.0 (Ampere) or later."""
        return tensor_core_precisions(self.compute_capability)

    def check_precision(self, precision: str) -> str:
        check_precision(precision)
        allowed = self.precisions()
        if precision not in allowed:
            major, minor = self.compute_capability
            raise ValueError(
                f"precision={precision!r} is not available on {self.device_name()} (compute "
                f"capability {major}.{minor}): bf16 and tf32 GEMMs need the tensor-core "
                f"mma.sync of compute capability 8.0 or later; this GPU can use "
                f"{', '.join(repr(p) for p in allowed)}"
            )
        return precision

    def synchronize(self) -> None:
        if self.seam is not None:
            self.seam.synchronize()
