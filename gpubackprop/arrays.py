"""Facts about an array of any backend, read without converting it.

CuPy refuses implicit conversion (``np.asarray(cupy_array)`` raises TypeError: a hidden
device-to-host copy is a bug).  Code that accepts NumPy arrays, CuPy arrays or nested lists
reads shape and dtype through these helpers, and copies to the host only through ``to_host``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Array", "dtype_of", "is_cupy_array", "is_device_array", "shape_of", "to_host"]

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
    DeviceArray) is copied with .get(); anything else goes through np.asarray (so a pandas
    Series, whose .get is a lookup, is converted like any array-like)."""
    if not isinstance(array, np.ndarray) and is_device_array(array):
        return array.get()
    return np.asarray(array)


def is_device_array(array: Any) -> bool:
    """A cupy.ndarray or an emulator DeviceArray (arrays NumPy must not convert implicitly)."""
    from .emulator.device_arrays import DeviceArray

    return isinstance(array, DeviceArray) or is_cupy_array(array)


def is_cupy_array(array: Any) -> bool:
    """A cupy.ndarray, recognised without importing CuPy."""
    return type(array).__module__.split(".")[0] == "cupy"
