"""The elementwise kernels, read from their device functions in kernels/.

Every ``GB_ELEMENTWISE <name>_element(...)`` function of the headers in ELEMENTWISE_HEADERS is
the loop body of one elementwise kernel called ``<name>``.  Its signature is the kernel's
interface: a ``const real_t`` parameter is an input array (CuPy type ``T``), a ``real_t&``
parameter an output array, a ``const double``/``const int`` parameter a scalar (``float64`` /
``int32``).  The spec built here hands CuPy's ElementwiseKernel (and the emulator's wrapper of
it) exactly that interface and an operation that only calls the function, so every CUDA line
stays in kernels/.
"""

from __future__ import annotations

import functools
import re

from ..kernels import kernel_dir
from .seam import ElementwiseSpec

__all__ = ["ELEMENTWISE_HEADERS", "elementwise_spec", "elementwise_specs"]

# Headers of elementwise device functions: the activations and add, the optimizer updates.
ELEMENTWISE_HEADERS = ("elementwise.cuh", "optimizers.cuh")

_FUNCTION = re.compile(r"GB_ELEMENTWISE\s+(\w+)_element\s*\(([^)]*)\)")
_PARAMETER = re.compile(r"^(const\s+)?(real_t|double|int)\s*(&)?\s*(\w+)$")
# The CuPy type of each C parameter type (real_t is the kernel's T).
_CUPY_TYPE = {"real_t": "T", "double": "float64", "int": "int32"}


def _parse(header: str, name: str, parameters: str) -> ElementwiseSpec:
    inputs, outputs, names = [], [], []
    for text in parameters.split(","):
        text = " ".join(text.split())
        match = _PARAMETER.match(text)
        if match is None:
            raise ValueError(
                f"kernels/{header}: parameter {text!r} of {name}_element is not accepted; "
                "expected 'const real_t x', 'const double s', 'const int i' or 'real_t& out'"
            )
        const, c_type, reference, param = match.groups()
        if reference and (const or c_type != "real_t"):
            raise ValueError(f"kernels/{header}: output {param!r} of {name} must be 'real_t&'")
        if not reference and not const:
            raise ValueError(f"kernels/{header}: input {param!r} of {name} must be const")
        (outputs if reference else inputs).append(f"{_CUPY_TYPE[c_type]} {param}")
        names.append(param)
    return ElementwiseSpec(
        name=name,
        in_params=", ".join(inputs),
        out_params=", ".join(outputs),
        operation=f"{name}_element({', '.join(names)});",
        preamble_files=(header,),
    )


@functools.cache
def _specs() -> dict[str, ElementwiseSpec]:
    specs: dict[str, ElementwiseSpec] = {}
    for header in ELEMENTWISE_HEADERS:
        text = (kernel_dir() / header).read_text(encoding="utf-8")
        for name, parameters in _FUNCTION.findall(text):
            if name in specs:
                raise ValueError(f"kernels/{header}: elementwise kernel {name!r} is defined twice")
            specs[name] = _parse(header, name, parameters)
    return specs


def elementwise_specs() -> list[ElementwiseSpec]:
    """Every elementwise kernel of ELEMENTWISE_HEADERS, in the order the headers define them."""
    return list(_specs().values())


def elementwise_spec(name: str) -> ElementwiseSpec:
    """The elementwise kernel ``name`` (e.g. "gb_adam")."""
    specs = _specs()
    if name not in specs:
        raise ValueError(
            f"elementwise kernel {name!r} is not defined; expected one of {list(specs)}"
        )
    return specs[name]
