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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import capture as _capture
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
        self._pool: list[Any] | None = None  # a graph's warm-up allocations, while recorded
        self._capture: _capture.Capture | None = None

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
            _refuse_compile(label)
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
        if self._capture is not None:
            # Captured, not run: replay resolves the arrays' memory then, as a GPU graph does.
            self._capture.entries.append(("launch", module, kernel, grid, block, args, shared_mem))
            return
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
        """An array filled with the poison pattern (a signalling NaN with payload 0xA5...).
        During a capture: the next array the warm-up allocated (see capture.py)."""
        if self._capture is not None:
            return self._serve_from_pool(tuple(shape), np.dtype(dtype))
        array = poisoned_empty(shape, dtype)
        made = DeviceArray(array) if self.device_arrays else array
        if self._pool is not None:
            self._pool.append(made)
        return made

    # -- graphs -------------------------------------------------------------------------------
    def new_pool(self) -> list[Any]:
        """A graph's memory pool: here the list of the warm-up's allocations."""
        return []

    @contextmanager
    def allocating_from(self, pool: list[Any]) -> Iterator[None]:
        """Allocations inside are kept in ``pool`` (a list): the warm-up step before a
        capture, whose memory the captured graph then owns (a private pool on a GPU)."""
        saved, self._pool = self._pool, pool
        try:
            yield
        finally:
            self._pool = saved

    @contextmanager
    def capture(self, static: list[Any], pool: list[Any]) -> Iterator[dict[str, Any]]:
        """Record the launches made inside into a graph (``holder["graph"]`` afterwards); see
        capture.py for what is refused.  ``static``: the buffers inputs are copied into;
        ``pool``: the warm-up's allocations, served in order to the capture's."""
        if _capture.active_capture() is not None:
            raise _capture.GraphCaptureError("a graph capture is already in progress")
        state = _capture.Capture(list(static), pool)
        holder: dict[str, Any] = {}
        self._capture = state
        _capture.set_active(state)
        try:
            yield holder
        finally:
            self._capture = None
            _capture.set_active(None)
        holder["graph"] = EmuGraph(state.entries)

    def launch_graph(self, graph: EmuGraph) -> None:
        """Replay: every captured launch, in order, with the checks of an ordinary launch."""
        _capture.refuse_during_capture("launching a graph", "graphs do not nest here")
        for entry in graph.entries:
            if entry[0] == "launch":
                self.launch(*entry[1:])
            elif entry[0] == "elementwise":
                entry[1](*entry[2])
            elif entry[0] == "operation":  # Capture.record_operation: e.g. a collective
                entry[2]()
            else:  # "copy"
                self.copy_in(entry[1], entry[2])

    def copy_in(self, dst: Any, src: Any) -> None:
        """dst[...] = src: host data or a device array copied into device memory.  In a
        capture only into a static buffer (then recorded: replay copies what src holds then)."""
        if self._capture is not None:
            if id(dst) not in self._capture.static_ids:
                raise _capture.GraphCaptureError(
                    f"a host-to-device copy into an array of shape {tuple(dst.shape)} during "
                    "graph capture: it is not one of the static buffers the capture was given, "
                    "so the graph would copy into memory it does not own"
                )
            self._capture.entries.append(("copy", dst, src))
            return
        target = dst._host if isinstance(dst, DeviceArray) else dst
        target[...] = src._host if isinstance(src, DeviceArray) else src

    def _serve_from_pool(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        state = self._capture
        assert state is not None
        index = state.served
        if index < len(state.pool):
            candidate = state.pool[index]
            if tuple(candidate.shape) == shape and candidate.dtype == dtype:
                state.served += 1
                return candidate
        raise _capture.GraphCaptureError(
            f"a device allocation empty({shape}, {dtype}) during graph capture that the "
            f"warm-up step did not make (allocation {index} of the capture; the warm-up made "
            f"{len(state.pool)}): the step must allocate the same buffers every time"
        )

    # -- elementwise ----------------------------------------------------------------------------
    def elementwise(self, spec: Any, dtype: Any, preamble: str | None = None):
        """A callable ``f(*inputs[, *outputs])`` running ``spec`` over same-size arrays of
        ``dtype``; outputs left out are allocated (poisoned); returns the output(s).
        ``preamble``: the text before the kernel, if not the one spec.preamble_files make."""
        dtype = np.dtype(dtype)
        key = (spec.name, dtype.str, spec.in_params, spec.out_params, spec.operation, preamble)
        if key not in self._elementwise:
            _refuse_compile(f"elementwise {spec.name}")
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
        capture = self.seam._capture
        if capture is not None:
            n_inputs = len(self.params) - self.n_outputs
            if len(device_args) != len(self.params):
                raise _capture.GraphCaptureError(
                    f"elementwise {name!r} without its outputs during graph capture: it would "
                    "allocate them; pass preallocated outputs"
                )
            capture.entries.append(("elementwise", self, device_args))
            outputs = device_args[n_inputs:]
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
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


class EmuGraph:
    """A captured step: the launches, elementwise calls and static copies, in order."""

    def __init__(self, entries: list[tuple[Any, ...]]) -> None:
        self.entries = list(entries)

    @property
    def kernels(self) -> int:
        """Kernel launches in the graph, recorded operations (collectives) included; copies
        not counted."""
        return sum(1 for entry in self.entries if entry[0] != "copy")

    def operations(self) -> list[str]:
        """The labels of the recorded operations (Capture.record_operation), in order."""
        return [entry[1] for entry in self.entries if entry[0] == "operation"]


def _refuse_compile(label: str) -> None:
    _capture.refuse_during_capture(
        f"compiling {label}",
        "a kernel compile and module load cannot be captured; the warm-up step builds every "
        "kernel the step launches",
    )


def poisoned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.empty filled with the poison pattern, so that an element no kernel wrote is caught."""
    array = np.empty(shape, dtype=dtype)
    poison_fill(array)
    return array


def device_arrays_from_env() -> bool:
    """GPUBACKPROP_EMU_DEVICE_ARRAYS=1: the emu backend hands out DeviceArrays (CuPy's rules)."""
    return flag_from_env("GPUBACKPROP_EMU_DEVICE_ARRAYS")
