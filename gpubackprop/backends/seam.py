"""The device seam: the few calls a kernel launcher needs from a device.

Launchers (backends/kernel_backend.py) are written once against this interface.
``CupySeam`` implements it with CuPy on a CUDA GPU; ``EmuSeam`` implements it with
the CPU emulator (gpubackprop/emulator/).  Same source, grid, block, shared memory
and arguments on both, so the two backends share every launcher bug and fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ElementwiseSpec:
    """An elementwise kernel in CuPy's ElementwiseKernel terms.

    ``in_params``/``out_params`` use CuPy's syntax ("T x, T dout", "T y"); a parameter
    whose type is a concrete type (``float64 alpha``, ``int32 code``) is a scalar.
    ``operation`` is the loop body for element ``i``; ``preamble_files`` are headers
    from kernels/ (e.g. "activations.cuh") whose device functions the body calls.
    """

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble_files: tuple[str, ...] = field(default=())


class CompiledModule(Protocol):
    """A compiled kernels/ source; opaque to launchers."""


class DeviceSeam(Protocol):
    """Everything a launcher (kernel_backend.py, operands.py) calls on a device."""

    name: str
    xp: Any  # array module whose arrays the seam accepts (numpy for emu, cupy for cupy)

    def compile(
        self, source_file: str, defines: dict[str, str], name_expressions: tuple[str, ...] = ()
    ) -> CompiledModule:
        """Compile kernels/<source_file> with #defines (cached per source text, defines, name
        expressions, device).  ``name_expressions`` (``"gemm<float, 64>"``) instantiate
        templated kernels, launched by that same string, as CuPy's RawModule does."""
        ...

    def launch(
        self,
        module: CompiledModule,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: tuple[Any, ...],
        shared_mem: int = 0,
    ) -> None:
        """Launch ``kernel`` of ``module``.  ``args`` are arrays (passed as pointers) and
        NumPy scalars whose type matches the kernel's parameter (np.int32, np.float32, ...)."""
        ...

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Uninitialised array.  The emulator fills it with a poison bit pattern so that an
        element no kernel wrote is caught after the launch."""
        ...

    def elementwise(self, spec: ElementwiseSpec, dtype: Any) -> Any:
        """Return a callable ``f(*inputs, *outputs)`` running spec over same-size arrays."""
        ...

    def check_device(self, name: str, array: Any) -> None:
        """Raise ValueError naming ``name`` when ``array`` (of kind xp.ndarray) lives on
        another device than the one kernels launch on."""
        ...

    def synchronize(self) -> None:
        """Block until all queued work has finished."""
        ...

    def device_name(self) -> str:
        """The device kernels run on, in words (for `gpubackprop info` and benchmark records)."""
        ...
