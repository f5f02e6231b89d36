"""Backend registry: ``get_backend("auto" | "numpy" | "cupy" | "emu")``.

Backends are built lazily and once.  Building one never raises for a missing CuPy,
GPU or compiler: the backend reports ``available = False`` and keeps the reason.
"""

from __future__ import annotations

import logging
import os

from .base import ACTIVATIONS, Backend
from .numpy_backend import NumpyBackend

__all__ = [
    "ACTIVATIONS",
    "BACKEND_NAMES",
    "DEVICE_BACKENDS",
    "Backend",
    "auto_reason",
    "available_backends",
    "describe_choice",
    "get_backend",
]

# The backends that run the ops; "auto" picks cupy when usable, else numpy.
DEVICE_BACKENDS = ("numpy", "cupy", "emu")
BACKEND_NAMES = ("auto", *DEVICE_BACKENDS)
ENV_VARIABLE = "GPUBACKPROP_BACKEND"

logger = logging.getLogger("gpubackprop")
_instances: dict[str, Backend] = {}
_auto_choice_logged = False


def _build(name: str) -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "cupy":
        from .cupy_backend import CupyBackend

        return CupyBackend()
    if name == "emu":
        from ..emulator import device_arrays_from_env
        from .emu_backend import EmuBackend

        # CuPy's rules for arrays (no implicit conversion to NumPy) on the CPU, for testing code
        # that will run on a GPU; read once, when the backend is first built.
        return EmuBackend(device_arrays=device_arrays_from_env())
    raise AssertionError(name)


class UnavailableBackend(Backend):
    """Stands in for a backend whose module failed to import; keeps the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.available, self.reason = name, False, reason


def _instance(name: str) -> Backend:
    if name not in _instances:
        try:
            _instances[name] = _build(name)
        except Exception as error:  # e.g. a broken optional install: report, never crash
            _instances[name] = UnavailableBackend(name, f"{type(error).__name__}: {error}")
    return _instances[name]


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name``.

    ``None`` reads the GPUBACKPROP_BACKEND environment variable (unset or empty means
    "auto"): the CuPy backend when CuPy and a GPU are usable, else NumPy; the choice
    and its reason are logged once.  Asking for an unavailable backend by name raises
    RuntimeError with the reason.
    """
    global _auto_choice_logged
    if isinstance(name, Backend):
        return name
    source = "argument"
    if name is None:
        # An empty value (GPUBACKPROP_BACKEND= in a shell) means "not set", as for other tools.
        name, source = os.environ.get(ENV_VARIABLE, "").strip() or "auto", ENV_VARIABLE
    key = str(name).strip().lower()
    if key not in BACKEND_NAMES:
        where = f"{ENV_VARIABLE}={name!r}" if source == ENV_VARIABLE else f"backend={name!r}"
        raise ValueError(f"{where} is not a backend; expected one of {BACKEND_NAMES}")
    if key == "auto":
        cupy_backend = _instance("cupy")
        chosen = cupy_backend if cupy_backend.available else _instance("numpy")
        if not _auto_choice_logged:
            why = "CuPy and a GPU are usable" if cupy_backend.available else cupy_backend.reason
            logger.info("backend 'auto' chose %r: %s", chosen.name, why)
            _auto_choice_logged = True
        return chosen
    backend = _instance(key)
    if not backend.available:
        raise RuntimeError(f"backend {key!r} is not available: {backend.reason}")
    return backend


def auto_reason() -> str:
    """Why "auto" picks the backend it picks: CuPy is usable, or the first clause of the reason
    it is not (the backend's full reason also says what to do about it)."""
    cupy_backend = _instance("cupy")
    if cupy_backend.available:
        return "CuPy and a GPU are usable"
    return cupy_backend.reason.split(";")[0].strip() or "the cupy backend is unavailable"


def describe_choice(requested: str | None, used: str) -> str:
    """``used``, and how it was chosen when the user did not name it: "numpy (auto: no NVIDIA
    GPU found ...)", "emu (GPUBACKPROP_BACKEND=emu)"."""
    if requested is None:
        from_environment = os.environ.get(ENV_VARIABLE, "").strip()
        if from_environment and from_environment.lower() != "auto":
            return f"{used} ({ENV_VARIABLE}={from_environment})"
        requested = "auto"
    if str(requested).strip().lower() == "auto":
        return f"{used} (auto: {auto_reason()})"
    return used


def available_backends() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every concrete backend, for `gpubackprop info`."""
    return {name: (_instance(name).available, _instance(name).reason) for name in DEVICE_BACKENDS}
