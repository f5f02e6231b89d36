"""Parameters and the flat buffers they live in.

All parameters of a model share one flat data buffer and one flat gradient buffer;
each Parameter's ``data`` and ``grad`` are views into them.  An optimizer then
updates the whole model in one launch and the gradient norm is one reduction.

A model placed with precision="bf16" also owns a flat uint16 buffer ``bf16`` of the same
layout: bf16(θ) (round to nearest even) of every parameter, biases included (they cost two
bytes each and keep the copy one contiguous launch; the GEMMs read only the weights'). It is
written at placement, by every optimizer update (the same launch that writes θ), and by
``refresh_bf16()`` after any other write of the parameters (load_state_dict, a broadcast);
the bf16 GEMMs read it instead of converting the fp32 weights on every call.  Each
Parameter's ``bf16`` is its view into it (None without the copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arrays import to_host
from .precision import bf16_bits

# Each parameter starts on a 64-element boundary (256 bytes in float32), so that every
# view is aligned for 16-byte vector loads like a fresh allocation would be.  The
# padding holds zeros in data, grad and optimizer state, so it changes no result.
ALIGN_ELEMENTS = 64


@dataclass(eq=False)
class Parameter:
    """A trainable tensor: ``data`` and ``grad`` (same shape) on the model's backend."""

    name: str
    data: Any
    grad: Any = None
    store: FlatStore | None = field(default=None, repr=False)
    bf16: Any = field(default=None, repr=False)  # bf16(data) bits (uint16), see FlatStore

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype})"


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class FlatStore:
    """One flat data buffer and one flat gradient buffer for a list of parameters.

    Building a store rebinds each Parameter's ``data``, ``grad``, ``store`` and ``bf16`` to
    views of the new buffers (values copied from wherever they were), so Parameter objects
    keep their identity when a model moves between backends or dtypes.  ``bf16_copy``: also
    keep the flat bf16 copy (float32 only; see the module docstring)."""

    def __init__(self, backend, dtype, parameters: list[Parameter], bf16_copy: bool = False):
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.parameters = list(parameters)
        self.offsets: list[int] = []
        offset = 0
        for parameter in self.parameters:
            self.offsets.append(offset)
            offset = _round_up(offset + parameter.size, ALIGN_ELEMENTS)
        self.size = max(offset, ALIGN_ELEMENTS)
        host = np.zeros(self.size, dtype=self.dtype)
        for parameter, start in zip(self.parameters, self.offsets):
            host[start : start + parameter.size] = to_host(parameter.data).ravel()
        self.data = backend.asarray(host, self.dtype)
        self.grad = backend.zeros((self.size,), self.dtype)
        self.bf16 = None
        if bf16_copy:
            if self.dtype != np.float32:
                raise ValueError(f"a bf16 copy needs float32 parameters; got {self.dtype}")
            self.bf16 = _bf16_copy(backend, self.data)
        for i, parameter in enumerate(self.parameters):
            shape = parameter.shape
            parameter.data = self.view(self.data, i, shape)
            parameter.grad = self.view(self.grad, i, shape)
            parameter.bf16 = None if self.bf16 is None else self.view(self.bf16, i, shape)
            parameter.store = self

    def refresh_bf16(self) -> None:
        """Rewrite the bf16 copy from ``data`` in place (one launch; nothing without a copy).
        Whoever writes ``data`` other than through an optimizer calls it."""
        if self.bf16 is not None:
            _bf16_copy(self.backend, self.data, self.bf16)

    def view(self, flat, index: int, shape: tuple[int, ...]):
        start = self.offsets[index]
        return flat[start : start + int(np.prod(shape))].reshape(shape)

    def covers(self, parameters: list[Parameter]) -> bool:
        """True when ``parameters`` are exactly this store's, in order (one flat update)."""
        return len(parameters) == len(self.parameters) and all(
            a is b for a, b in zip(parameters, self.parameters)
        )


def _bf16_copy(backend, data, out=None):
    """bf16(data) bits (round to nearest even) into ``out`` (a new uint16 array when None): the
    kernel backends' to_bf16 launch, or on the NumPy backend the same rounding on the host."""
    if hasattr(backend, "to_bf16"):
        return backend.to_bf16(data, out=out)
    bits = bf16_bits(data).reshape(data.shape)
    if out is None:
        return bits
    np.copyto(out, bits)
    return out
