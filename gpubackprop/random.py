"""The library's one random generator: weight init and shuffling draw from it, so
``gb.seed(n)`` makes a whole run reproducible bit for bit."""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def seed(value: int) -> None:
    """Reseed the generator used for weight initialisation and shuffling."""
    global _generator
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"seed={value!r} is not a non-negative integer")
    _generator = np.random.default_rng(int(value))


def generator() -> np.random.Generator:
    return _generator
