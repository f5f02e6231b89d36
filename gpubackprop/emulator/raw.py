"""CuPy's RawModule and RawKernel on the CPU emulator: run your own CUDA kernel by changing one
import.

    from gpubackprop.emulator import RawModule      # instead of: from cupy import RawModule
    module = RawModule(code=source, options=("-DTILE=16",), name_expressions=["scale<float>"])
    kernel = module.get_function("scale<float>")
    kernel((blocks,), (threads,), (x, y, np.float32(2.0), np.int32(n)), shared_mem=0)

Arrays are NumPy arrays (or the emulator's DeviceArrays) that the kernel writes in place;
scalars are NumPy scalars of exactly the parameter's type.  Every launch gets the emulator's
checks (launch.py): argument types, out-of-bounds writes, unwritten outputs, divergent barriers,
faults, races under GPUBACKPROP_EMU_SHUFFLE.  The source is compiled as CuPy compiles it: the
options given plus the ones CuPy adds itself (``-ftz=true``: float32 subnormals are flushed).

What the emulator cannot run as a GPU would is refused with an error naming it: a compiled
``path=`` (cubin/PTX), ``backend`` other than "nvrtc", ``translate_cucomplex``,
``enable_cooperative_groups`` (grid-wide sync), ``jitify``, fast-math options that change
rounding, ``-I`` folders (put the header's text in ``code``), streams, ``get_global`` and
``get_texref``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .device import EmuSeam
from .device_arrays import DeviceArray
from .launch import MAX_DYNAMIC_SHARED, EmuModule, launch

__all__ = ["RawKernel", "RawModule", "UnsupportedCupyFeature"]

MAX_OPT_IN_SHARED = 227 * 1024  # the most dynamic shared memory a block can opt in to (sm_90)

# Options that change nothing the emulator models (code generation, debug info, the
# execution space default, relaxed constexpr): accepted and ignored.
_IGNORED = re.compile(
    r"^-(-?(lineinfo|generate-line-info|G|device-debug|device-as-default-execution-space|"
    r"default-device|expt-relaxed-constexpr|extended-lambda|expt-extended-lambda|"
    r"restrict|dopt=on|dopt=off|dw|disable-warnings|Werror=all-warnings|"
    r"maxrregcount=\d+|fmad=true|prec-div=true|prec-sqrt=true|std=c\+\+(11|14|17)))$"
)
_ARCH = re.compile(r"^-(?:-gpu-architecture=|arch=|arch\s+)(?:sm|compute)_(\d+)[a-z]?$")
_DEFINE = re.compile(r"^-(?:D|-define-macro=)\s*(.+)$")
_UNDEFINE = re.compile(r"^-(?:U|-undefine-macro=)\s*(.+)$")
_STD = re.compile(r"^--?std=(c\+\+(?:20))$")
# Why some NVRTC options are refused (each changes results in a way the emulator cannot copy).
_REFUSED = {
    "use_fast_math": "approximate division, square root and transcendental functions",
    "prec-div=false": "approximate division",
    "prec-sqrt=false": "approximate square root",
    "fmad=false": "no fused multiply-add (the emulator's CPU code never fuses either, but a GPU "
    "build with fmad=true does: the emulator cannot tell the two apart)",
    "ftz": "CuPy passes -ftz=true itself; a second -ftz is an NVRTC error",
    "I": "an include folder: the emulator's cache (like CuPy's) keys on code alone; put the "
    "header's text in code",
    "include-path": "an include folder: put the header's text in code",
    "relocatable-device-code": "separate compilation (cudadevrt)",
    "rdc": "separate compilation (cudadevrt)",
}


class UnsupportedCupyFeature(ValueError):
    """A CuPy RawModule/RawKernel feature the emulator does not run; the message names it."""


def _nvrtc_to_gxx(options: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """g++ flags for NVRTC ``options`` (-D, -U, -std=c++20, -arch as __CUDA_ARCH__), and the
    option string shown in messages.  Refuses what the emulator cannot honour."""
    if isinstance(options, str) or not isinstance(options, (tuple, list)):
        raise TypeError(f"options={options!r}: expected a tuple of str, as CuPy takes them")
    flags: list[str] = []
    for option in options:
        if not isinstance(option, str):
            raise TypeError(f"options entry {option!r} is not a str")
        text = option.strip()
        bare = text.lstrip("-")
        if _IGNORED.match(text):
            continue
        if match := _ARCH.match(text):
            flags.append(f"-DGBEMU_CUDA_ARCH={int(match.group(1)) * 10}")
        elif match := _DEFINE.match(text):
            flags.append(f"-D{match.group(1).strip()}")
        elif match := _UNDEFINE.match(text):
            flags.append(f"-U{match.group(1).strip()}")
        elif match := _STD.match(text):
            flags.append(f"-std={match.group(1)}")
        else:
            key = "I" if text.startswith("-I") else bare.split("=", 1)[0]
            reason = _REFUSED.get(bare) or _REFUSED.get(key)
            raise UnsupportedCupyFeature(
                f"RawModule option {option!r} is not supported by the emulator"
                + (f" ({reason})" if reason else " (unknown to it)")
            )
    return tuple(flags), " ".join(options)


class RawModule:
    """``cupy.RawModule`` on the CPU emulator (keyword arguments as in CuPy).

    ``code``: CUDA C++ source; ``options``: NVRTC options (``-DNAME=value``, ``-std=c++17``,
    ``-arch=sm_80`` sets __CUDA_ARCH__, ...); ``name_expressions``: templated kernels to
    instantiate, e.g. ``["gemm<float, 64>"]``, each then found by ``get_function`` with the same
    string.  ``extern "C"`` kernels are found by their name.
    """

    def __init__(
        self,
        *,
        code: str | None = None,
        path: str | None = None,
        options: Sequence[str] = (),
        backend: str = "nvrtc",
        translate_cucomplex: bool = False,
        enable_cooperative_groups: bool = False,
        name_expressions: Sequence[str] | None = None,
        jitify: bool = False,
    ) -> None:
        refused = []
        if path is not None:
            refused.append(
                f"path={path!r} (a compiled cubin/PTX/fatbin cannot run on the CPU; pass the "
                "CUDA source as code=)"
            )
        if backend != "nvrtc":
            refused.append(f"backend={backend!r} (the emulator compiles as NVRTC does)")
        if translate_cucomplex:
            refused.append("translate_cucomplex=True (cuComplex is not emulated)")
        if enable_cooperative_groups:
            refused.append(
                "enable_cooperative_groups=True (grid-wide synchronisation; block and tile "
                "groups from cooperative_groups.h need no flag and are supported)"
            )
        if jitify:
            refused.append("jitify=True")
        if refused:
            raise UnsupportedCupyFeature(
                "the CPU emulator does not support RawModule " + "; ".join(refused)
            )
        if not isinstance(code, str) or not code.strip():
            raise TypeError(f"code={code!r}: expected the CUDA source as a non-empty str")
        if name_expressions is not None and (
            isinstance(name_expressions, str) or not isinstance(name_expressions, (tuple, list))
        ):
            raise TypeError(
                f"name_expressions={name_expressions!r}: expected a list of str such as "
                "['kern<float, 64>']"
            )
        self.code = code
        self.options = tuple(options) if isinstance(options, (tuple, list)) else options
        self.name_expressions = tuple(name_expressions or ())
        self._flags, _ = _nvrtc_to_gxx(self.options)
        self._module: EmuModule | None = None
        self._seam = EmuSeam()

    def compile(self, log_stream: Any = None) -> None:
        """Compile now (otherwise the first get_function does); raises EmuCompileError with
        the compiler's file:line diagnostics."""
        if self._module is None:
            # CuPy adds -ftz=true to every compile: float32 subnormals are flushed.
            self._module = self._seam.compile_text(
                self.code,
                "RawModule.cu",
                self.name_expressions,
                nvrtc_options=(*self.options, "-ftz=true"),
                extra_flags=self._flags,
            )

    def get_function(self, name: str) -> RawKernel:
        """The kernel ``name``: an ``extern "C"`` name or one of the name expressions."""
        self.compile()
        assert self._module is not None
        if name not in self._module.kernels:
            raise ValueError(
                f"get_function({name!r}): no such kernel; this module has "
                f"{sorted(self._module.kernels)} (a template is found by one of the "
                "name_expressions it was compiled with, as in CuPy)"
            )
        return RawKernel._bound(self._module, name, self._seam)

    def get_global(self, name: str) -> Any:
        raise UnsupportedCupyFeature(
            f"RawModule.get_global({name!r}): __device__/__constant__ globals set from the host "
            "are not supported by the emulator"
        )

    def get_texref(self, name: str) -> Any:
        raise UnsupportedCupyFeature(f"RawModule.get_texref({name!r}): textures are not emulated")


class RawKernel:
    """``cupy.RawKernel(code, name, options=...)``, or a kernel from RawModule.get_function:
    called as ``kernel(grid, block, args, shared_mem=0)`` with tuple grid and block (as CuPy
    requires), array arguments written in place."""

    def __init__(
        self,
        code: str,
        name: str,
        options: Sequence[str] = (),
        backend: str = "nvrtc",
        translate_cucomplex: bool = False,
        enable_cooperative_groups: bool = False,
        jitify: bool = False,
    ) -> None:
        module = RawModule(
            code=code,
            options=options,
            backend=backend,
            translate_cucomplex=translate_cucomplex,
            enable_cooperative_groups=enable_cooperative_groups,
            jitify=jitify,
            name_expressions=[name] if "<" in name else None,
        )
        bound = module.get_function(name)
        self.__dict__.update(bound.__dict__)

    @classmethod
    def _bound(cls, module: EmuModule, name: str, seam: EmuSeam) -> RawKernel:
        kernel = cls.__new__(cls)
        kernel.name = name
        kernel._module = module
        kernel._seam = seam
        kernel.max_dynamic_shared_size_bytes = MAX_DYNAMIC_SHARED
        return kernel

    name: str
    max_dynamic_shared_size_bytes: int

    def __call__(
        self,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple[Any, ...],
        *,
        shared_mem: int = 0,
        stream: Any = None,
        enable_cooperative_groups: bool = False,
    ) -> None:
        where = f"kernel {self.name!r}"
        for what, value in (("grid", grid), ("block", block)):
            if type(value) is not tuple:  # CuPy declares them `tuple`: a list is a TypeError
                raise TypeError(f"{where}: {what} must be a tuple, got {type(value).__name__}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{where}: args must be a tuple, got {type(args).__name__}")
        if stream is not None:
            raise UnsupportedCupyFeature(
                f"{where}: stream={stream!r}; the emulator runs every launch to completion in "
                "order (pass no stream)"
            )
        if enable_cooperative_groups:
            raise UnsupportedCupyFeature(
                f"{where}: enable_cooperative_groups=True (a cooperative grid launch)"
            )
        limit = int(self.max_dynamic_shared_size_bytes)
        if not MAX_DYNAMIC_SHARED <= limit <= MAX_OPT_IN_SHARED:
            raise ValueError(
                f"{where}: max_dynamic_shared_size_bytes={limit}; expected "
                f"{MAX_DYNAMIC_SHARED} to {MAX_OPT_IN_SHARED}"
            )
        host = tuple(a._host if isinstance(a, DeviceArray) else a for a in args)
        launch(self._module, self.name, grid, block, host, shared_mem, None, limit)
