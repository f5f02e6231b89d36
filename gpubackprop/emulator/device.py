"""EmuSeam: the device seam (backends/seam.py) over the CPU emulator.

Arrays are NumPy arrays; ``compile`` builds a kernels/ source with g++ (cached on disk),
``launch`` runs a kernel with the checks of launch.py, ``empty`` poisons its memory, and an
ElementwiseSpec becomes the same body in a one-thread grid-stride kernel over the same device
functions (kernels.elementwise_as_kernel_source), run by the same launcher and checks.

With ``device_arrays=True`` the seam's arrays are DeviceArrays (device_arrays.py), which refuse
implicit conversion to NumPy as CuPy's arrays do, and a launch refuses NumPy arrays as CuPy's
kernels do.
"""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import numpy as np

from . import compiler
from .device_arrays import DeviceArray, device_xp, to_host_memory
from .launch import SCALAR_TYPES, EmuModule, flag_from_env, launch, poison_fill

__all__ = ["EmuSeam"]


class EmuSeam:
    """DeviceSeam for the emulator (name "emu"; xp is numpy, or device_xp with device_arrays)."""

    name = "emu"

    def __init__(self, shuffle_seed: int | None = None, device_arrays: bool = False) -> None:
        # None: read GPUBACKPROP_EMU_SHUFFLE at each launch.
        self.shuffle_seed = shuffle_seed
        self.device_arrays = device_arrays
        self.xp = device_xp if device_arrays else np
        self._modules: dict[str, EmuModule] = {}
        self._elementwise: dict[tuple, Any] = {}

    # -- compile ----------------------------------------------------------------------------
    def compile(
        self, source_file: str, defines: dict[str, str], name_expressions: tuple[str, ...] = ()
    ) -> EmuModule:
        """Compile kernels/<source_file> with ``defines`` (cached in memory and on disk);
        ``name_expressions`` instantiate templated kernels (``"kern<float, 64>"``), as CuPy's
        RawModule does, and are launched by that string."""
        from ..kernels import load_source, note_compiled

        source = load_source(source_file, defines)
        module = self.compile_text(source.text, source.file, name_expressions)
        note_compiled(source)
        return module

    def compile_text(
        self,
        text: str,
        label: str,
        name_expressions: tuple[str, ...] = (),
        nvrtc_options: tuple[str, ...] | None = None,
        extra_flags: tuple[str, ...] = (),
    ) -> EmuModule:
        """Compile a source text; ``label`` names it in messages.  ``nvrtc_options``: the
        options a GPU build compiles it with (default: the project's, kernels.NVRTC_OPTIONS plus
        what CuPy adds), whose -ftz decides whether float32 subnormals are flushed to zero."""
        from ..kernels import CUPY_ADDED_OPTIONS, NVRTC_OPTIONS

        if nvrtc_options is None:
            nvrtc_options = (*NVRTC_OPTIONS, *CUPY_ADDED_OPTIONS)
        flush = compiler.flushes_denormals(nvrtc_options)
        name_expressions = tuple(name_expressions)
        key = (
            hashlib.sha256(text.encode()).hexdigest(),
            label,
            name_expressions,
            flush,
            compiler.compile_flags() + tuple(extra_flags),
        )
        if key not in self._modules:
            path, decls = compiler.build(text, label, name_expressions, tuple(extra_flags))
            self._modules[key] = EmuModule(path, label, decls, flush)
        return self._modules[key]

    # -- launch -------------------------------------------------------------------------------
    def launch(
        self,
        module: EmuModule,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: tuple[Any, ...],
        shared_mem: int = 0,
    ) -> None:
        args = self.host_arguments(args, f"kernel {kernel!r}")
        launch(module, kernel, grid, block, args, shared_mem, self.shuffle_seed)

    def host_arguments(self, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
        """The NumPy memory behind each DeviceArray argument.  With device arrays a NumPy array
        is refused, as CuPy refuses host memory in a kernel launch."""
        return to_host_memory(tuple(args), where) if self.device_arrays else tuple(args)

    def check_device(self, name: str, array: Any) -> None:
        """One emulated device: every array of the seam's kind is on it."""

    def synchronize(self) -> None:
        """Launches run to completion before they return."""

    def device_name(self) -> str:
        compiler_path = compiler.find_compiler()
        try:
            identity = compiler.compiler_identity(compiler_path)
        except Exception as error:  # a compiler that cannot report its version still names it
            identity = f"{compiler_path} ({type(error).__name__})"
        ucontext = "-DGBEMU_USE_UCONTEXT" in compiler.compile_flags()
        x86 = platform.machine() in ("x86_64", "AMD64")
        switch = "x86-64 context switch" if x86 and not ucontext else "ucontext"
        arrays = "; CuPy-like device arrays" if self.device_arrays else ""
        return f"CPU emulator ({identity}; fibers: {switch}{arrays})"

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An array filled with the poison pattern (a signalling NaN with payload 0xA5...)."""
        array = poisoned_empty(shape, dtype)
        return DeviceArray(array) if self.device_arrays else array

    # -- elementwise ----------------------------------------------------------------------------
    def elementwise(self, spec: Any, dtype: Any, preamble: str | None = None):
        """A callable ``f(*inputs[, *outputs])`` running ``spec`` over same-size arrays of
        ``dtype``; outputs left out are allocated (poisoned); returns the output(s).
        ``preamble``: the text before the kernel, if not the one spec.preamble_files make."""
        dtype = np.dtype(dtype)
        key = (spec.name, dtype.str, spec.in_params, spec.out_params, spec.operation, preamble)
        if key not in self._elementwise:
            from ..kernels import elementwise_as_kernel_source

            text = elementwise_as_kernel_source(spec, dtype, preamble)
            module = self.compile_text(text, f"elementwise {spec.name}")
            self._elementwise[key] = _Elementwise(self, spec, dtype, module)
        return self._elementwise[key]


class _Elementwise:
    def __init__(self, seam: EmuSeam, spec: Any, dtype: np.dtype, module: EmuModule) -> None:
        self.seam = seam
        self.spec = spec
        self.dtype = dtype
        self.module = module
        self.kernel = module.kernels[spec.name]
        self.params = self.kernel.params[:-1]  # the last is `long long n`
        self.n_outputs = len([p for p in spec.out_params.split(",") if p.strip()])

    def __call__(self, *device_args: Any) -> Any:
        name = self.spec.name
        args = self.seam.host_arguments(device_args, f"elementwise {name!r}")
        n_inputs = len(self.params) - self.n_outputs
        if len(args) not in (n_inputs, len(self.params)):
            raise TypeError(
                f"elementwise {name!r} takes {n_inputs} inputs ({self.spec.in_params}) and "
                f"optionally {self.n_outputs} outputs ({self.spec.out_params}); got {len(args)} "
                "arguments"
            )
        arrays = [a for a, p in zip(args, self.params, strict=False) if p.pointer]
        if not arrays and len(args) == n_inputs:
            raise TypeError(f"elementwise {name!r}: no array argument gives the output shape")
        size = None
        for value, param in zip(args, self.params, strict=False):  # outputs may be absent
            if not param.pointer:
                continue
            if not isinstance(value, np.ndarray) or value.dtype != self.dtype:
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise TypeError(
                    f"elementwise {name!r}: argument {param.name.removesuffix('_array')!r} must "
                    f"be a {self.dtype} array, got {got}"
                )
            if size is None:
                size, shape = value.size, value.shape
            elif value.size != size:
                raise ValueError(
                    f"elementwise {name!r}: argument {param.name.removesuffix('_array')!r} has "
                    f"{value.size} elements, the others {size}; all arrays must have one size"
                )
        full = list(args)
        if len(args) == n_inputs:
            full += [poisoned_empty(shape, self.dtype) for _ in range(self.n_outputs)]
        call = []
        for index, (value, param) in enumerate(zip(full, self.params, strict=True)):
            if param.pointer:
                # a strided input is copied; a strided output is refused by the launcher
                contiguous = value.flags.c_contiguous or index >= n_inputs
                call.append(value if contiguous else np.ascontiguousarray(value))
            else:
                call.append(_scalar(name, param, value))
        call.append(np.int64(size or 0))
        launch(self.module, name, (1, 1, 1), (1, 1, 1), tuple(call), 0, self.seam.shuffle_seed)
        if len(device_args) > n_inputs:
            outputs = list(device_args[n_inputs:])
        elif self.seam.device_arrays:
            outputs = [DeviceArray(a) for a in full[n_inputs:]]
        else:
            outputs = full[n_inputs:]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _scalar(name: str, param: Any, value: Any) -> Any:
    """Python scalars are converted (as CuPy does); NumPy scalars must have the exact type."""
    expected = SCALAR_TYPES.get(param.code)
    if expected is None:
        return value  # the launcher reports the unsupported type
    if isinstance(value, np.generic):
        return value  # checked exactly by the launcher
    if isinstance(value, (bool, int, float)):
        return expected(value)
    raise TypeError(
        f"elementwise {name!r}: scalar {param.name!r} ({param.c_type}) got {type(value).__name__}"
    )


def poisoned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.empty filled with the poison pattern, so that an element no kernel wrote is caught."""
    array = np.empty(shape, dtype=dtype)
    poison_fill(array)
    return array


def device_arrays_from_env() -> bool:
    """GPUBACKPROP_EMU_DEVICE_ARRAYS=1: the emu backend hands out DeviceArrays (CuPy's rules)."""
    return flag_from_env("GPUBACKPROP_EMU_DEVICE_ARRAYS")
