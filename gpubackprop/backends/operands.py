"""The argument checks of the kernel launchers (kernel_backend.py).

A kernel cannot check what it is given, so the launchers check it first: the kind of array and
its device, the dtype (one of dtypes.FLOAT_DTYPES, all operands alike), the shape, contiguity,
and that each dimension fits the kernels' C ints.  A non-contiguous input is copied; an output
the caller provides (written in place) must be contiguous.  Every error names the argument, the
value and what is accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dtypes import DTYPES, FLOAT_DTYPES
from .seam import DeviceSeam

__all__ = [
    "check_array",
    "check_int32",
    "float_operand",
    "output",
    "same_shape",
    "updated_buffer",
    "vec4_flag",
]

INT32_MAX = 2**31 - 1


def check_array(seam: DeviceSeam, name: str, a: Any) -> None:
    """An array of the seam's kind, on the device the kernels run on."""
    if not isinstance(a, seam.xp.ndarray):
        raise TypeError(
            f"{name} is a {type(a).__name__}; expected a {seam.xp.__name__}.ndarray "
            f"(move it with backend.asarray)"
        )
    seam.check_device(name, a)


def _float_dtype(name: str, a: Any) -> None:
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype={a.dtype} is not supported; expected one of {DTYPES}")


def float_operand(
    seam: DeviceSeam, name: str, a: Any, dtype: np.dtype | None = None, ndim: int | None = None
) -> Any:
    """Check a floating operand; return it C-contiguous (copied if it was not)."""
    check_array(seam, name, a)
    _float_dtype(name, a)
    if dtype is not None and a.dtype != dtype:
        raise ValueError(
            f"{name}.dtype={a.dtype} differs from the other operands' {dtype}; "
            "all operands must share one dtype"
        )
    if ndim is not None and a.ndim != ndim:
        raise ValueError(
            f"{name}.shape={tuple(a.shape)} is not accepted; expected {ndim} dimensions"
        )
    return a if a.flags.c_contiguous else seam.xp.ascontiguousarray(a)


def output(seam: DeviceSeam, name: str, a: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    """Check a caller-provided output (written in place, so never copied)."""
    check_array(seam, name, a)
    if a.dtype != dtype:
        raise ValueError(f"{name}.dtype={a.dtype} is not accepted; expected {dtype}")
    same_shape(name, a, shape)
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name} is not C-contiguous (strides {a.strides}); kernels write "
            "outputs in place, so pass a contiguous array"
        )
    return a


def updated_buffer(
    seam: DeviceSeam,
    name: str,
    a: Any,
    dtype: np.dtype | None = None,
    shape: tuple[int, ...] | None = None,
) -> Any:
    """A buffer an optimizer updates in place: a float array, contiguous, of ``dtype`` and
    ``shape`` (its own when None)."""
    check_array(seam, name, a)
    _float_dtype(name, a)
    dtype = a.dtype if dtype is None else dtype
    return output(seam, name, a, dtype, tuple(a.shape) if shape is None else shape)


def same_shape(name: str, a: Any, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}.shape={tuple(a.shape)} is not accepted; expected {shape}")


def check_int32(shape_name: str, shape: tuple[int, ...]) -> None:
    """The GEMM and loss kernels take each dimension as a C int (products are 64-bit)."""
    if any(d > INT32_MAX for d in shape):
        raise ValueError(
            f"{shape_name}={tuple(shape)} is not accepted; each dimension must be "
            f"at most {INT32_MAX}"
        )


def vec4_flag(a: Any, leading: int) -> np.int32:
    """1 when 16-byte loads of 4 consecutive elements are aligned: base address a multiple
    of 16 and a leading dimension that is a multiple of 4."""
    return np.int32(leading % 4 == 0 and data_address(a) % 16 == 0)


def data_address(a: Any) -> int:
    """Device (or host) address of a's first element."""
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is not None:
        return int(ptr)
    return int(a.__array_interface__["data"][0])
