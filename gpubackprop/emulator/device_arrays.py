"""Emulated device arrays: host memory that behaves like ``cupy.ndarray`` where it matters.

With ``GPUBACKPROP_EMU_DEVICE_ARRAYS=1`` (or ``EmuBackend(device_arrays=True)``) the emu
backend hands out DeviceArray instead of NumPy arrays, so that code which would break on a GPU
breaks on the CPU first:

- no implicit conversion: ``np.asarray(a)`` raises TypeError, as CuPy does; ``a.get()`` (or
  ``backend.to_numpy(a)``) copies to the host;
- no mixing: a NumPy function or operator given a DeviceArray and a NumPy array raises
  TypeError, as CuPy does (scalars are fine);
- reductions return 0-d arrays, not Python or NumPy scalars (``float(a)`` works, as in CuPy);
- ``a.data.ptr`` is the address of the first element and ``a.device.id`` is 0.

Everything else (``np.sum(a)``, ``a @ b``, ``a[1:]``, ``a.astype``) runs NumPy on the host
memory, through NumPy's ``__array_function__`` and ``__array_ufunc__`` protocols, the ones CuPy
implements too.  The module-like ``device_xp`` plays ``cupy``: ``device_xp.asarray(host)`` is
the explicit host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from . import capture as _capture

__all__ = ["DeviceArray", "device_xp", "to_host_memory"]

_DEVICE = SimpleNamespace(id=0)


class DeviceArray(NDArrayOperatorsMixin):
    """A NumPy array behind the rules of a CuPy array (see the module docstring)."""

    __slots__ = ("_host",)

    def __init__(self, host: np.ndarray) -> None:
        if not isinstance(host, np.ndarray):
            raise TypeError(f"DeviceArray wraps a numpy.ndarray, got {type(host).__name__}")
        self._host = host

    # -- what CuPy refuses, and what it offers instead ----------------------------------------
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed: this array lives on the "
            "(emulated) device, like a cupy.ndarray; copy it with .get() or backend.to_numpy()"
        )

    def get(self) -> np.ndarray:
        """A NumPy copy (cupy.ndarray.get)."""
        _refuse_read("DeviceArray.get()")
        return self._host.copy()

    def set(self, host: Any) -> None:
        """Copy host data into this array (cupy.ndarray.set): an explicit host-to-device copy,
        refused during a capture as ``__setitem__`` is."""
        _capture.refuse_during_capture(
            "DeviceArray.set (a host-to-device copy)",
            "it would run once now instead of at every replay; copy inputs into the static "
            "buffers before launching the graph",
        )
        if isinstance(host, DeviceArray):
            raise TypeError("DeviceArray.set takes host data (a numpy.ndarray), not a device array")
        source = np.asarray(host)
        if source.shape != self._host.shape or source.dtype != self._host.dtype:
            raise ValueError(  # CuPy refuses a shape or a dtype that differs, too
                f"set: a {source.dtype} array of shape {source.shape} into a {self.dtype} "
                f"array of shape {self.shape}"
            )
        self._host[...] = source

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack export, as cupy.ndarray has (``torch.from_dlpack(a)`` shares the memory).  The
        emulated device's memory is host memory, so the capsule says CPU where CuPy's says CUDA;
        the consumer gets the same elements without a copy either way."""
        return self._host.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._host.__dlpack_device__()

    @property
    def data(self) -> SimpleNamespace:
        return SimpleNamespace(ptr=self._host.ctypes.data)

    @property
    def device(self) -> SimpleNamespace:
        return _DEVICE

    # -- attributes and conversions CuPy has ----------------------------------------------------
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: self._host.flags)
    itemsize = property(lambda self: self._host.itemsize)
    nbytes = property(lambda self: self._host.nbytes)
    T = property(lambda self: DeviceArray(self._host.T))

    def __len__(self) -> int:
        return len(self._host)

    def __float__(self) -> float:
        _refuse_read("float(DeviceArray)")
        return float(self._host)

    def __int__(self) -> int:
        _refuse_read("int(DeviceArray)")
        return int(self._host)

    def __bool__(self) -> bool:
        _refuse_read("bool(DeviceArray)")
        return bool(self._host)

    def __iter__(self):
        return (_to_device(row) for row in self._host)

    def __repr__(self) -> str:
        return f"DeviceArray({self._host!r})"

    def __getitem__(self, key: Any) -> Any:
        return _to_device(self._host[to_host_memory(key, "indexing")])

    def __setitem__(self, key: Any, value: Any) -> None:
        _capture.refuse_during_capture(
            "DeviceArray.__setitem__ (a copy into device memory)",
            "it would run once now instead of at every replay; copy inputs into the static "
            "buffers before launching the graph",
        )
        # cupy allows a NumPy value here (an explicit host-to-device copy of the right side).
        self._host[to_host_memory(key, "indexing")] = (
            value._host if isinstance(value, DeviceArray) else value
        )

    def __getattr__(self, name: str) -> Any:
        # Methods (astype, reshape, sum, argmax, ...) run on the host memory; dunder lookups
        # (__array_interface__, __array_struct__, buffer) must fail, or NumPy would convert.
        if name.startswith("__"):
            raise AttributeError(name)
        attribute = getattr(self._host, name)
        if not callable(attribute):
            return _to_device(attribute)
        return _on_device(attribute, f"DeviceArray.{name}", view_only=name in _VIEW_METHODS)

    # -- NumPy's dispatch protocols -------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        where = f"numpy.{ufunc.__name__}"
        _refuse_compute(where)
        out = kwargs.pop("out", None)
        inputs, kwargs = to_host_memory(inputs, where), to_host_memory(kwargs, where)
        if out is not None:
            kwargs["out"] = to_host_memory(out, where)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is None:
            return _to_device(result)
        # The outputs given are returned as themselves; any left as None come back new.
        results = result if isinstance(result, tuple) else (result,)
        returned = tuple(
            given if given is not None else _to_device(made)
            for given, made in zip(out, results, strict=True)
        )
        return returned[0] if len(returned) == 1 else returned

    def __array_function__(self, func: Callable, types: Any, args: Any, kwargs: Any) -> Any:
        where = f"numpy.{func.__name__}"
        _refuse_compute(where)
        return _to_device(func(*to_host_memory(args, where), **to_host_memory(kwargs, where)))


def to_host_memory(value: Any, where: str) -> Any:
    """DeviceArrays replaced by the NumPy arrays holding their elements (no copy: what NumPy
    and the emulator's kernels work on), through tuples, lists and dicts; a NumPy array among
    them is refused, as CuPy refuses to mix host and device arrays.  Not a CuPy API: code meant
    for a GPU copies with ``.get()``."""
    if isinstance(value, DeviceArray):
        return value._host
    if isinstance(value, np.ndarray):
        raise TypeError(
            f"{where} got a numpy.ndarray {value.shape} beside device arrays; copy it to the "
            "device first (backend.asarray), as CuPy requires"
        )
    if isinstance(value, (tuple, list)):
        return type(value)(to_host_memory(v, where) for v in value)
    if isinstance(value, dict):
        return {k: to_host_memory(v, where) for k, v in value.items()}
    return value


def _to_device(value: Any) -> Any:
    """Arrays and NumPy scalars become DeviceArrays (a reduction gives a 0-d array, as in
    CuPy); tuples and lists are converted element by element; anything else is returned."""
    if isinstance(value, np.ndarray):
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v) for v in value)
    return value


# Methods that give a view of the same memory: a captured step may take them (launchers
# reshape and slice their operands); anything that computes is refused during a capture.
_VIEW_METHODS = frozenset({"reshape", "view", "ravel", "squeeze", "transpose"})


def _refuse_read(what: str) -> None:
    _capture.refuse_during_capture(
        f"{what} (a device-to-host copy, which synchronises)",
        "a captured step cannot read device memory on the host: return the 0-d device array "
        "and read it after the step",
    )


def _refuse_compute(where: str) -> None:
    _capture.refuse_during_capture(
        f"{where} on device arrays",
        "the emulator records only kernel launches through the device seam; this would run "
        "once, now, and be missing from every replay",
    )


def _on_device(function: Callable, where: str, view_only: bool = False) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        if not view_only:
            _refuse_compute(where)
        result = function(*to_host_memory(args, where), **to_host_memory(kwargs, where))
        if isinstance(result, np.ndarray) and result.flags.owndata:
            _refuse_compute(where)  # a copy, not a view
        return _to_device(result)

    call.__name__ = getattr(function, "__name__", where)
    return call


class _DeviceNamespace:
    """``cupy`` for DeviceArrays: NumPy's functions, taking and returning device arrays."""

    __name__ = "gpubackprop.emulator.device_arrays.device_xp"
    ndarray = DeviceArray

    @staticmethod
    def asarray(a: Any, dtype: Any = None) -> DeviceArray:
        """A device array: ``a`` itself (cast if ``dtype`` differs) or a copy of host data."""
        if isinstance(a, DeviceArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        _capture.refuse_during_capture(
            "device_xp.asarray of host data (an allocation and a host-to-device copy)",
            "copy inputs into the static buffers before launching the graph",
        )
        return DeviceArray(np.array(a, dtype=dtype))

    @staticmethod
    def ascontiguousarray(a: Any, dtype: Any = None) -> DeviceArray:
        """A contiguous device array; like cupy.ascontiguousarray it takes device arrays only."""
        if not isinstance(a, DeviceArray):
            raise TypeError(
                f"ascontiguousarray takes a device array, got {type(a).__name__}; "
                "use device_xp.asarray for host data"
            )
        contiguous = np.ascontiguousarray(a._host, dtype=dtype)
        if contiguous is not a._host:
            _refuse_compute("device_xp.ascontiguousarray (a copy)")
        return DeviceArray(contiguous)

    @staticmethod
    def asnumpy(a: Any) -> np.ndarray:
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(np, name)
        if callable(attribute) and not isinstance(attribute, type):
            return _on_device(attribute, f"device_xp.{name}", view_only=name in _VIEW_METHODS)
        return attribute


device_xp = _DeviceNamespace()
