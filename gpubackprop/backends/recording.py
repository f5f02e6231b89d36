"""A device seam that records launches instead of running them, for measuring host cost.

On a GPU a small network's training step is bound by the host: the Python work of checking
arguments, choosing a launch configuration and handing the launch to CuPy.  ``RecordingSeam``
stands where CuPy's seam stands and keeps each launch (kernel, grid, block, arguments) in a
list, so that ``HostBackend`` (the kernel launchers over this seam) times exactly the
launchers' own Python cost on any machine, and tests can read what a step would launch.
Nothing is computed: outputs hold whatever ``numpy.empty`` gave.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .kernel_backend import KernelBackend
from .seam import ElementwiseSpec

__all__ = ["HostBackend", "Launch", "RecordingSeam"]


class Launch(NamedTuple):
    """One recorded launch.  ``grid`` is None for an elementwise kernel (its size is
    ``args``' element count, its grid CuPy's choice)."""

    file: str
    kernel: str
    grid: tuple[int, int, int] | None
    block: tuple[int, int, int] | None
    args: tuple[Any, ...]
    shared_mem: int


class RecordedModule:
    """What ``compile`` returns: the source file and its defines, compiled by nobody."""

    def __init__(self, file: str, defines: dict[str, str]) -> None:
        self.file = file
        self.defines = dict(defines)


class RecordingSeam:
    """DeviceSeam (seam.py) over NumPy memory that records launches; ``launches`` grows until
    ``clear()``."""

    name = "recording"
    xp = np

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.compiles: list[tuple[str, dict[str, str]]] = []

    def clear(self) -> None:
        self.launches.clear()

    def compile(self, source_file: str, defines: dict[str, str]) -> RecordedModule:
        self.compiles.append((source_file, dict(defines)))
        return RecordedModule(source_file, defines)

    def launch(
        self,
        module: RecordedModule,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: tuple[Any, ...],
        shared_mem: int = 0,
    ) -> None:
        self.launches.append(Launch(module.file, kernel, grid, block, args, shared_mem))

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def check_device(self, name: str, array: Any) -> None:
        """Host memory only: every NumPy array is where the (recorded) kernels would run."""

    def synchronize(self) -> None:
        """Nothing runs, so nothing is pending."""

    def device_name(self) -> str:
        return "host only (launches recorded, not run)"

    def elementwise(self, spec: ElementwiseSpec, dtype: Any):
        return _RecordedElementwise(self, spec, np.dtype(dtype))


class _RecordedElementwise:
    """An elementwise kernel that records its call; outputs left out are allocated."""

    def __init__(self, seam: RecordingSeam, spec: ElementwiseSpec, dtype: np.dtype) -> None:
        self.seam = seam
        self.spec = spec
        self.dtype = dtype
        self.n_inputs = len([p for p in spec.in_params.split(",") if p.strip()])
        self.n_outputs = len([p for p in spec.out_params.split(",") if p.strip()])

    def __call__(self, *args: Any) -> Any:
        if len(args) == self.n_inputs:
            shape = next(a.shape for a in args if isinstance(a, np.ndarray))
            outputs = tuple(np.empty(shape, self.dtype) for _ in range(self.n_outputs))
            args = args + outputs
        else:
            outputs = args[self.n_inputs :]
        self.seam.launches.append(Launch("<elementwise>", self.spec.name, None, None, args, 0))
        return outputs[0] if len(outputs) == 1 else outputs


class HostBackend(KernelBackend):
    """The kernel launchers over a RecordingSeam: every op does all of its host work (checks,
    launch configuration, scalar arguments) and records its launches instead of running them.
    For the ``host.*`` benchmark rows and for tests of what a step launches."""

    name = "host"

    def __init__(self, gemm_version: str = "tiled", gemm_tiles: dict | None = None) -> None:
        super().__init__(RecordingSeam(), gemm_version=gemm_version, gemm_tiles=gemm_tiles)
