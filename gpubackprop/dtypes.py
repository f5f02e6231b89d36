"""The floating-point types every backend, kernel, data loader and checkpoint supports.

One list: the kernels are compiled for exactly these (REAL_T float / double), so a new dtype is
added here and nowhere else in the Python code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["C_TYPES", "DTYPES", "FLOAT_DTYPES", "check_dtype"]

# NumPy name -> the C type the kernels are compiled with (REAL_T).
C_TYPES: dict[str, str] = {"float32": "float", "float64": "double"}
DTYPES: tuple[str, ...] = tuple(C_TYPES)
FLOAT_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(name) for name in DTYPES)


def check_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy dtype if it is one of DTYPES; ValueError naming it otherwise."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in FLOAT_DTYPES:
        raise ValueError(f"{name}={dtype!r} is not supported; expected one of {DTYPES}")
    return resolved
