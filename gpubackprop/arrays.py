"""Facts about an array of any backend, read without converting it.

CuPy refuses implicit conversion (``np.asarray(cupy_array)`` raises TypeError: a hidden
device-to-host copy is a bug).  Code that accepts NumPy arrays, CuPy arrays or nested lists
reads shape and dtype through these helpers, and copies to the host only through ``to_host``.

Arrays from other libraries (PyTorch, JAX, CuPy on another backend, ...) come in through one
function, ``import_array``: DLPack where the array offers it, else the NumPy array protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "Array",
    "dlpack_device_type",
    "dtype_of",
    "import_array",
    "is_cupy_array",
    "is_device_array",
    "shape_of",
    "to_host",
]

# In annotations: a NumPy array, a CuPy array, an emulator DeviceArray, or (where data comes in
# from a user) anything np.asarray accepts.  The backends have no common array base class.
Array = Any


def shape_of(array: Any) -> tuple[int, ...]:
    """Shape of an array (its own attribute), or of a list or scalar as NumPy sees it."""
    if hasattr(array, "shape"):
        return tuple(array.shape)
    return np.shape(array)


def dtype_of(array: Any) -> np.dtype:
    """dtype of an array (its own attribute), or the dtype NumPy would give a list or scalar."""
    if hasattr(array, "dtype"):
        return np.dtype(array.dtype)
    return np.asarray(array).dtype


def to_host(array: Any) -> np.ndarray:
    """A NumPy array with the values of ``array``: a device array (CuPy's, or the emulator's
    DeviceArray) is copied with .get(), an array with ``__dlpack__`` is read through DLPack
    (import_array); anything else goes through np.asarray (so a pandas Series, whose .get is a
    lookup, is converted like any array-like)."""
    return np.asarray(import_array(array, np, "array"))


def is_device_array(array: Any) -> bool:
    """A cupy.ndarray or an emulator DeviceArray (arrays NumPy must not convert implicitly)."""
    from .emulator.device_arrays import DeviceArray

    return isinstance(array, DeviceArray) or is_cupy_array(array)


def is_cupy_array(array: Any) -> bool:
    """A cupy.ndarray, recognised without importing CuPy."""
    return type(array).__module__.split(".")[0] == "cupy"


# DLPack device types (dlpack.h, DLDeviceType) that matter here.
DLPACK_CPU = 1
DLPACK_CUDA = 2
_DLPACK_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 10: "rocm", 13: "cuda_managed"}
ACCEPTED_ARRAYS = (
    "NumPy arrays, nested lists, anything with the NumPy array protocol (__array__), and arrays "
    "with __dlpack__ (PyTorch, JAX, CuPy, ...) in host memory or, on the cupy backend, on a GPU"
)


def dlpack_device_type(array: Any) -> int | None:
    """The DLPack device type of an array that implements ``__dlpack_device__`` (1 CPU, 2 CUDA,
    ...), or None."""
    device = getattr(array, "__dlpack_device__", None)
    if device is None:
        return None
    try:
        return int(device()[0])
    except Exception:  # a broken producer: import_array reports it with its error
        return None


def _describe(array: Any) -> str:
    kind = f"{type(array).__module__}.{type(array).__qualname__}"
    parts = [f"shape {tuple(array.shape)}" if hasattr(array, "shape") else None]
    parts.append(f"dtype {array.dtype}" if hasattr(array, "dtype") else None)
    device = dlpack_device_type(array)
    if device is not None:
        parts.append(f"DLPack device {_DLPACK_DEVICE_NAMES.get(device, device)}")
    details = ", ".join(p for p in parts if p)
    return f"a {kind} ({details})" if details else f"a {kind}"


def _on_gpu(xp: Any) -> bool:
    """True for CuPy (the module, recognised without importing it): arrays in GPU memory."""
    return getattr(xp, "__name__", "") == "cupy"


def _on_current_gpu(array: Any, xp: Any) -> Any:
    """A CuPy array on the GPU the kernels launch on: itself, or a copy from another GPU
    (ndarray.copy copies onto the current device)."""
    return array if array.device.id == xp.cuda.Device().id else array.copy()


def import_array(array: Any, xp: Any, name: str = "x") -> Any:
    """``array`` in a form ``xp.asarray`` reads without misreading it; ``xp`` is a backend's array
    module (numpy, cupy, or the emulator's device_xp).

    - NumPy arrays, this backend's own arrays, lists and scalars are returned as they are.
    - A device array of another backend (a CuPy array on the numpy backend) is copied to the host;
      a CuPy array on another GPU than the current one is copied onto the current one.
    - An array with ``__dlpack__`` (PyTorch, JAX, CuPy, ...) is imported through DLPack: without a
      copy where it already is where ``xp`` computes (host memory for numpy and the emulator, the
      current GPU for cupy, where ``cupy.from_dlpack`` hands the producer CuPy's current stream
      so the two streams are ordered); otherwise it is copied once.  Strides come with it, so a
      transposed or strided view is read as it is; the backend's ``asarray`` then makes it
      contiguous (a copy) only when it is not.
    - Anything else is returned for ``xp.asarray`` (the NumPy array protocol).

    An array that cannot be read raises TypeError saying what it is and what is accepted."""
    if isinstance(array, np.ndarray):
        return array
    if is_device_array(array):
        if xp is not np and isinstance(array, xp.ndarray):
            return _on_current_gpu(array, xp) if _on_gpu(xp) else array
        return array.get()
    if not hasattr(array, "__dlpack__"):
        return array
    device = dlpack_device_type(array)
    try:
        if device == DLPACK_CUDA and _on_gpu(xp):
            return _on_current_gpu(xp.from_dlpack(array), xp)
        # Host memory is read in place; a device array is asked for a host copy (DLPack 1.0's
        # dl_device), which producers that cannot make one refuse.
        return np.from_dlpack(array, device="cpu")
    except Exception as error:
        hint = " (move it to the CPU first, e.g. tensor.cpu())" if device != DLPACK_CPU else ""
        raise TypeError(
            f"{name} is {_describe(array)}, which could not be read through DLPack{hint}: "
            f"{type(error).__name__}: {str(error).rstrip('.')}. Accepted: {ACCEPTED_ARRAYS}"
        ) from None
