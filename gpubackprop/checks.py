"""Checks of numeric arguments, shared by the library and the command line.

One rule for every count, size and hyper-parameter: ``check_int`` and ``check_number`` accept a
finite value inside an interval and otherwise raise ValueError naming the argument, the value
and what is accepted ("batch_size=0 is not accepted; expected an integer >= 1").  The CLI's
argparse types (cli.py) parse the text and apply the same checks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_number", "describe_range"]


def describe_range(
    kind: type, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> str:
    """'an integer in [1, inf)', 'a number in (0, 1)': the interval a check accepts."""
    left = "(" if low_open else "["
    right = ")" if high_open or math.isinf(high) else "]"
    noun = "an integer" if kind is int else "a number"
    return f"{noun} in {left}{low:g}, {high:g}{right}"


def _inside(value: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return math.isfinite(value) and above and below


def check_int(name: str, value: Any, minimum: int = 1, maximum: float = math.inf) -> int:
    """``value`` as an int if it is an integer (not a bool) in [minimum, maximum]."""
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not integral or not _inside(int(value), minimum, maximum, False, False):
        what = (
            f"an integer >= {minimum}"
            if math.isinf(maximum)
            else describe_range(int, minimum, maximum)
        )
        raise ValueError(f"{name}={value!r} is not accepted; expected {what}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number in the interval (low, high), each end
    closed unless ``low_open`` / ``high_open``."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if not real or not _inside(float(value), low, high, low_open, high_open):
        what = describe_range(float, low, high, low_open, high_open)
        raise ValueError(f"{name}={value!r} is not accepted; expected {what}")
    return float(value)
